"""Token ids into tensors: padded batches and packed blocks.

- `left_pad`: prompts for `generate`, which appends after the last column.
- `right_pad`: whole sequences for a forward pass (training, scoring); `pad_labeled` adds labels.
- `pack_blocks`: a text corpus into fixed-length blocks (pretraining, PPO-ptx).
- `pack_examples`: labeled examples concatenated into blocks (SFT packing).

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
