"""Token ids into tensors: padded batches and packed blocks.

- `left_pad`: prompts for `generate`, which appends after the last column.
- `right_pad`: whole sequences for a forward pass (training, scoring); `pad_labeled` adds labels.
- `pack_blocks`: a text corpus into fixed-length blocks (pretraining, PPO-ptx).
- `pack_examples`: labeled examples concatenated into blocks (SFT packing).
- `pack_padding_free`: labeled examples whole into rows, each attending to itself (SFT).
- `pack_shared_prompts`: the answers of a prompt in one row, the prompt computed once (reward).

A packed batch's forward pass (`pipeline.packed.packed_forward`) runs its real tokens only; the
rows are where attention applies the block mask.

Padding is always found from the lengths, never by comparing ids with the pad id, which may be
the EOS that ends every answer.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.tokenizer import IGNORE_INDEX


def _padded(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(seq) for seq in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        if seq:
            columns = slice(width - len(seq), width) if left else slice(0, len(seq))
            input_ids[row, columns] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, columns] = 1
    return input_ids, attention_mask


def left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token id lists into `(input_ids, attention_mask)`, both long tensors (B, T).

    Left padding puts every prompt's last token in the last column, where `generate` appends.
    """
    if not seqs:
        raise ValueError("left_pad needs at least one sequence")
    return _padded(seqs, pad_id, left=True)


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists into `(input_ids, attention_mask)`, both long tensors (B, T)."""
    return _padded(seqs, pad_id, left=False)


def pad_labeled(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad `{"input_ids", "labels"}` examples into (B, T) `input_ids`, `attention_mask` and
    `labels` tensors; padding gets `pad_id`, attention 0 and label IGNORE_INDEX."""
    input_ids, attention_mask = right_pad([example["input_ids"] for example in examples], pad_id)
    labels, _ = right_pad([example["labels"] for example in examples], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_blocks(texts: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """Concatenate documents with EOS between them and cut into (N, seq_len) blocks."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    flat = np.fromiter((t for doc in ids for t in (*doc, eos)), dtype=np.int64)
    n_blocks = len(flat) // seq_len
    return torch.from_numpy(flat[: n_blocks * seq_len].reshape(n_blocks, seq_len).copy())


def pack_examples(examples: list[dict], block_size: int) -> list[dict]:
    """Concatenate encoded examples and cut the stream into blocks of `block_size` tokens.

    Labels travel with their tokens, so only answer tokens stay trainable. The last block may be
    shorter (the collator pads it). A block with no answer token has no loss and is left out.
    """
    input_ids = [token for example in examples for token in example["input_ids"]]
    labels = [label for example in examples for label in example["labels"]]
    blocks = []
    for start in range(0, len(input_ids), block_size):
        block_labels = labels[start: start + block_size]
        if any(label != IGNORE_INDEX for label in block_labels):
            blocks.append({"input_ids": input_ids[start: start + block_size],
                           "labels": block_labels})
    return blocks


# -- shared-prompt packing ------------------------------------------------------------------------
# A prompt's K answers are encoded as K sequences that start with the same tokens (the prompt).
# Packed, the shared start is computed once: a block holds the shared tokens, then each answer's
# own tokens; a block mask lets an answer see its block's shared tokens and itself, never another
# answer or block, and its position ids continue the shared part's, so each answer's hidden states
# (and its score at its last token) equal those of its own sequence. Short blocks share a row, so
# a batch carries little padding.
SHARED_SEGMENT = -1  # segment id of a block's shared tokens; answers are 0..K−1
PAD_SEGMENT = -2     # segment and block id of padding


def shared_prefix_length(seqs: list[list[int]]) -> int:
    """Tokens that every sequence starts with, leaving each at least its last token of its own
    (where its score is read): [[5, 6, 7, 0], [5, 6, 9, 0]] -> 2; [[5, 6], [5, 6, 7]] -> 1."""
    limit = min(len(seq) for seq in seqs) - 1
    length = 0
    while length < limit and all(seq[length] == seqs[0][length] for seq in seqs):
        length += 1
    return length


def pack_group(seqs: list[list[int]]) -> tuple[list[int], list[int], list[int], list[int]]:
    """One prompt's answer sequences as one block: (token ids, position ids, segment ids, and the
    column of each answer's last token).

    [[5, 6, 7, 0], [5, 6, 9, 9, 0]] -> ids [5, 6, 7, 0, 9, 9, 0], positions [0, 1, 2, 3, 2, 3, 4],
    segments [-1, -1, 0, 0, 1, 1, 1], last columns [3, 6].
    """
    shared = shared_prefix_length(seqs)
    ids, positions = list(seqs[0][:shared]), list(range(shared))
    segments = [SHARED_SEGMENT] * shared
    last_columns = []
    for answer, seq in enumerate(seqs):
        ids.extend(seq[shared:])
        positions.extend(range(shared, len(seq)))
        segments.extend([answer] * (len(seq) - shared))
        last_columns.append(len(ids) - 1)
    return ids, positions, segments, last_columns


def fill_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Blocks of the given lengths placed into rows of `width` (no block longer), first fit in
    order of decreasing length: indices of the blocks in each row. [5, 2, 3, 4] in width 5 ->
    [[0], [3], [2, 1]]."""
    rows: list[list[int]] = []
    free: list[int] = []
    for block in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, space in enumerate(free) if space >= lengths[block]), None)
        if row is None:
            rows.append([])
            free.append(width)
            row = len(rows) - 1
        rows[row].append(block)
        free[row] -= lengths[block]
    return rows


def place_blocks(blocks: list[dict[str, list[int]]], width: int,
                 pads: dict[str, int]) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """Blocks (each a dict of equally long token-aligned lists, one of them input_ids) placed into
    rows of `width` (`fill_rows`), each list right-padded with `pads[key]`.

    Returns the (B, L) long tensors of those keys, plus attention_mask (1 = token, 0 = padding)
    and block_ids (which block of its row a token is in, PAD_SEGMENT on padding); and for each
    block, the (row, column) where it starts.
    """
    rows = fill_rows([len(block["input_ids"]) for block in blocks], width)
    columns = {key: [] for key in blocks[0]} | {"block_ids": []}
    where = [(0, 0)] * len(blocks)
    for row, members in enumerate(rows):
        placed = {key: [] for key in columns}
        for position, index in enumerate(members):
            where[index] = (row, len(placed["input_ids"]))
            for key, values in blocks[index].items():
                placed[key] += values
            placed["block_ids"] += [position] * len(blocks[index]["input_ids"])
        for key, values in placed.items():
            columns[key].append(values)
    pads = {**pads, "block_ids": PAD_SEGMENT}
    input_ids, attention_mask = right_pad(columns.pop("input_ids"), pads["input_ids"])
    tensors = {key: right_pad(values, pads[key])[0] for key, values in columns.items()}
    return {"input_ids": input_ids, "attention_mask": attention_mask, **tensors}, where


def pack_shared_prompts(groups: list[list[list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pack each group (one prompt's answer sequences) into one block, and the blocks into right-
    padded rows no longer than the longest block (`place_blocks`).

    Returns input_ids, attention_mask (1 = token, 0 = padding), position_ids, block_ids (which
    block of its row a token is in) and segment_ids, all (B, L) long; score_rows and score_columns
    (N,) long: where answer n of the flattened groups ends, in group order.
    `block_attention_mask(block_ids, segment_ids)` gives the mask a forward pass takes.
    """
    packed = [pack_group(seqs) for seqs in groups]
    blocks = [{"input_ids": ids, "position_ids": positions, "segment_ids": segments}
              for ids, positions, segments, _ in packed]
    batch, where = place_blocks(blocks, max(len(block["input_ids"]) for block in blocks),
                                {"input_ids": pad_id, "position_ids": 0,
                                 "segment_ids": PAD_SEGMENT})
    ends = [(group, column) for group, (*_, last_columns) in enumerate(packed)
            for column in last_columns]
    score_rows = [where[group][0] for group, _ in ends]
    score_columns = [where[group][1] + column for group, column in ends]
    return {**batch, "score_rows": torch.tensor(score_rows, dtype=torch.long),
            "score_columns": torch.tensor(score_columns, dtype=torch.long)}


def block_attention_mask(block_ids: torch.Tensor, segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) block and segment ids -> (B, 1, L, L) bool, True where query row i may attend to key
    column j: causal (j ≤ i), the same block, and j a shared token or in i's own segment. Padding
    attends to earlier padding only, so no row is empty (an empty row would make softmax NaN)."""
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same_block = block_ids.unsqueeze(2) == block_ids.unsqueeze(1)  # (B, L, L)
    same_segment = segment_ids.unsqueeze(2) == segment_ids.unsqueeze(1)
    shared_key = (segment_ids == SHARED_SEGMENT).unsqueeze(1)  # (B, 1, L)
    return (causal & same_block & (same_segment | shared_key)).unsqueeze(1)


# -- padding-free rows ----------------------------------------------------------------------------
def pack_padding_free(examples: list[dict], width: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Labeled examples placed whole into right-padded rows of `width` tokens (`place_blocks`;
    wider when an example is longer), each a block that attends only to itself: the batch
    `pad_labeled` would give, without the padding's compute.

    Returns input_ids, attention_mask (1 = token, 0 = padding), labels, position_ids (restarting
    at 0 in each example), block_ids and segment_ids (B, L) long, for `block_attention_mask`.
    Each example's first label is IGNORE_INDEX: the model shifts labels along a row, so the
    previous example's last token would otherwise learn to predict it (in its own sequence no
    token precedes it, so this changes nothing).
    """
    blocks = [{"input_ids": example["input_ids"],
               "labels": [IGNORE_INDEX, *example["labels"][1:]],
               "position_ids": list(range(len(example["input_ids"]))),
               "segment_ids": [0] * len(example["input_ids"])} for example in examples]
    width = max(width, *(len(block["input_ids"]) for block in blocks))
    batch, _ = place_blocks(blocks, width, {"input_ids": pad_id, "labels": IGNORE_INDEX,
                                            "position_ids": 0, "segment_ids": PAD_SEGMENT})
    return batch
