"""Reward models: how they are built, loaded and asked for scores.

A reward model here is a `AutoModelForSequenceClassification` with one label whose score is read at
the last token of `prompt + answer` as `pipeline.tokenizer.encode_prompt_response` encodes it: the
EOS that ends the answer. Batches are right-padded with the model's `config.pad_token_id`, and
transformers reads the score at the last token that is not padding, so the pad token must differ
from the EOS: `reward_tokenizer` gives a tokenizer whose pad is its EOS a pad token of its own.

The reward stage publishes a plain Hugging Face directory plus `reward_model.json`, which marks it as
a reward model and holds the normalization shift (the mean raw score of the SFT answers) and the
held-out metrics. transformers' `LlamaForSequenceClassification` has a score head without a bias and
no setting to add one, so plain `from_pretrained` returns raw scores; `load_reward_model` adds the
bias −shift to the head, and every caller in this project scores with normalized values.

The reward stage, PPO, `rlhf score`, `rlhf chat --reward` and the labeling page use
`load_reward_model` and `score_texts`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

import torch

from pipeline import console
from pipeline.data.packing import (pack_shared_prompts, right_pad,
                                   shared_prefix_length)
from pipeline.errors import UserError, first_line
from pipeline.guard import REWARD_MARKER, require_reward_model
from pipeline.models import inner_model
from pipeline.packed import PACKABLE_ATTENTION, packed_forward, row_layout, token_index
from pipeline.registry import Resolved

MARKER_KIND = "reward_model"


# -- building and loading ------------------------------------------------------------------------
def reward_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None):
    """The parent's tokenizer, with a pad token distinct from its EOS.

    transformers reads a sequence's score at its last token that is not `pad_token_id`; with
    pad == EOS that would be the token before the EOS. A new `<|pad|>` is added in that case (the
    model's embedding grows by one row, see `build_reward_model`); it never occurs in text.
    """
    from pipeline.tokenizer import PAD_TOKEN, load_tokenizer

    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code, revision=revision)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return tokenizer


def build_reward_model(parent: Resolved, tokenizer, seed: int, trust_remote_code: bool = False,
                       dtype: torch.dtype = torch.float32):
    """A one-label sequence classifier with the parent causal LM's backbone and a new score head,
    its weights in `dtype`.

    The parent may be a full model or a LoRA adapter (merged first). The head is initialized from
    `seed`. Dropout is switched off; the embedding grows to `len(tokenizer)` when needed.
    """
    from transformers import AutoModelForSequenceClassification

    from pipeline.models import load_causal_lm, merge_adapter

    causal_lm = merge_adapter(load_causal_lm(parent, trust_remote_code=trust_remote_code,
                                             trainable_adapter=False, dtype=dtype))
    config = causal_lm.config
    config.num_labels = 1
    zero_dropout(config)
    torch.manual_seed(seed)
    reward_model = AutoModelForSequenceClassification.from_config(
        config, trust_remote_code=trust_remote_code, dtype=torch.float32).to(dtype)
    backbone(reward_model).load_state_dict(backbone(causal_lm).state_dict())
    if len(tokenizer) > reward_model.get_input_embeddings().num_embeddings:
        reward_model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    return reward_model


def backbone(model):
    """The transformer body under a task head (`model.model` for Llama)."""
    return getattr(model, model.base_model_prefix)


def zero_dropout(config) -> None:
    """Set every dropout probability of a model config to 0 (before the model is built, since
    attention modules copy theirs at construction)."""
    for name, value in config.to_dict().items():
        if ("dropout" in name or "pdrop" in name) and isinstance(value, float):
            setattr(config, name, 0.0)


def load_reward_model(resolved: Resolved, trust_remote_code: bool = False,
                      role: str = "reward model", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a reward checkpoint, in eval mode, scoring normalized values, its
    weights in `dtype`.

    Accepts a directory this project published (with `reward_model.json`) and any plain one-label
    sequence-classification checkpoint (no shift; it is scored with its own pad token, as it was
    trained). Anything else is refused by the guard, naming `role` (the setting that gave it): a
    causal LM is not a reward model.
    """
    from transformers import AutoModelForSequenceClassification

    from pipeline.models import loading_errors, warn_remote_code
    from pipeline.tokenizer import load_tokenizer

    path = require_reward_model(resolved, role, trust_remote_code)
    marker = read_marker(path)
    warn_remote_code(trust_remote_code)
    with loading_errors("a reward model", path):
        model = AutoModelForSequenceClassification.from_pretrained(
            path, trust_remote_code=trust_remote_code, revision=resolved.revision,
            dtype=dtype)
    tokenizer = load_tokenizer(path, trust_remote_code=trust_remote_code,
                               revision=resolved.revision)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if marker and marker.get("shift"):
        set_score_bias(model, -float(marker["shift"]))
    return model.eval(), tokenizer


def read_marker(path: str | Path) -> dict | None:
    """The `reward_model.json` of a published reward model, or None when there is none."""
    marker_file = Path(path) / REWARD_MARKER
    if not marker_file.is_file():
        return None
    try:
        marker = json.loads(marker_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{marker_file} is not valid JSON; the checkpoint is damaged, retrain "
                        f"it or restore the file") from None
    if not isinstance(marker, dict) or marker.get("kind") != MARKER_KIND:
        raise UserError(f"{marker_file} does not describe a reward model (kind "
                        f"{marker.get('kind') if isinstance(marker, dict) else None!r})")
    return marker


def set_score_bias(model, bias: float) -> None:
    """Give the score head the constant `bias` (the head is replaced by one with a bias term)."""
    head = model.score
    biased = torch.nn.Linear(head.in_features, head.out_features, bias=True,
                             dtype=head.weight.dtype, device=head.weight.device)
    with torch.no_grad():
        biased.weight.copy_(head.weight)
        biased.bias.fill_(bias)
    model.score = biased


# -- scoring --------------------------------------------------------------------------------------
def sequence_scores(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) right-padded sequences → (B,) float32 scores, read at each one's last token."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, 1)
    return logits[:, 0].float()


@torch.no_grad()
def score_sequences(model, seqs: list[list[int]], batch_size: int = 32,
                    progress: str = "") -> list[float]:
    """Scores of encoded sequences, in their order. Batches group similar lengths (little padding).
    `progress` labels a progress bar over the answers (none when empty)."""
    device = next(model.parameters()).device
    pad_id = model.config.pad_token_id
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    scores = [0.0] * len(seqs)
    was_training = model.training
    model.eval()
    bar = console.progress(len(seqs), progress, unit="answer", enabled=bool(progress))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        input_ids, attention_mask = right_pad([seqs[i] for i in chunk], pad_id)
        values = sequence_scores(model, input_ids.to(device), attention_mask.to(device))
        for index, value in zip(chunk, values.tolist()):
            scores[index] = value
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    return scores


def packed_scores(model, batch: dict) -> torch.Tensor:
    """(N,) float32 scores of a `pack_shared_prompts` batch, read at each answer's last token.

    The call goes through the model's own forward (so DDP and peft wrappers see it), on the batch's
    real tokens (`pipeline.packed.packed_forward`); the score head runs on every token there, and a
    hook on it keeps those per-token scores (1, T, 1), which sequence classifiers otherwise reduce
    to one score per sequence.
    """
    classifier = inner_model(model)
    layout = row_layout(batch)
    token_scores = []
    hook = classifier.score.register_forward_hook(
        lambda module, args, output: token_scores.append(output))
    try:
        packed_forward(model, batch, layout)
    finally:
        hook.remove()
    ends = token_index(layout, batch["score_rows"], batch["score_columns"])
    return token_scores[0][0, ends, 0].float()


@torch.no_grad()
def shared_prompt_mismatch(model, group: list[list[int]]) -> str | None:
    """Why this model cannot score a prompt's answers packed together, or None when it can.

    It can when its attention takes a block mask and the packed scores of `group` (one prompt's
    answer sequences) equal, to fp32 rounding, those its own attention gives each answer as its
    own sequence; a model that ignored the mask or the position ids would fail that check, and
    keeps its attention implementation.
    """
    classifier = inner_model(model)
    implementation = classifier.config._attn_implementation
    if implementation not in PACKABLE_ATTENTION or not hasattr(classifier, "score"):
        return f"the model's {implementation} attention takes no block attention mask"
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        input_ids, attention_mask = right_pad(group, model.config.pad_token_id)
        separate = sequence_scores(model, input_ids.to(device), attention_mask.to(device))
        batch = pack_shared_prompts([group], model.config.pad_token_id)
        packed = packed_scores(model, {k: v.to(device) for k, v in batch.items()})
    except (TypeError, ValueError, RuntimeError) as err:
        mismatch = (f"the model fails on a block attention mask "
                    f"({type(err).__name__}: {first_line(err)})")
    else:
        gap = (packed - separate).abs().max().item()
        mismatch = (f"the model's scores change under a block attention mask (by {gap:.2g})"
                    if gap > 1e-4 * (1 + separate.abs().max().item()) else None)
    finally:
        model.train(was_training)
    if mismatch:
        classifier.set_attn_implementation(implementation)
    return mismatch


def choose_shared_prompt(model, groups: list[list[list[int]]]) -> tuple[bool, str]:
    """Whether to score `groups` (each one prompt's encoded answers) packed, checked with
    `shared_prompt_mismatch` on the first group with several answers; and a sentence saying how
    the answers will be scored."""
    group = next((seqs for seqs in groups if len(seqs) > 1), groups[0])
    mismatch = shared_prompt_mismatch(model, group)
    if mismatch is None:
        return True, "each prompt is computed once for its answers (packed, block attention mask)"
    return False, (f"{mismatch}; scoring each answer as its own sequence (its prompt computed "
                   f"once per answer)")


@torch.no_grad()
def score_groups(model, groups: list[list[list[int]]], batch_size: int = 32,
                 shared_prompt: bool = True, progress: str = "") -> list[list[float]]:
    """Scores of each group's sequences (a group: one prompt's encoded answers), grouped alike.

    With `shared_prompt` (see `shared_prompt_mismatch`) each group is packed into one block, so its
    prompt is computed once; batches hold up to `batch_size` answers, groups of similar length.
    Without it, every answer is scored as its own sequence.
    """
    if not shared_prompt:
        flat = score_sequences(model, [seq for seqs in groups for seq in seqs], batch_size,
                               progress)
        return regroup(flat, [len(seqs) for seqs in groups])
    device = next(model.parameters()).device
    scores: list[list[float]] = [[] for _ in groups]
    was_training = model.training
    model.eval()
    bar = console.progress(sum(len(seqs) for seqs in groups), progress, unit="answer",
                           enabled=bool(progress))
    for chunk in _group_batches(groups, batch_size):
        batch = pack_shared_prompts([groups[i] for i in chunk], model.config.pad_token_id)
        values = regroup(packed_scores(model, {k: v.to(device) for k, v in batch.items()}).tolist(),
                         [len(groups[i]) for i in chunk])
        for index, group_scores in zip(chunk, values):
            scores[index] = group_scores
        bar.update(sum(len(group_scores) for group_scores in values))
    bar.close()
    model.train(was_training)
    return scores


def _group_batches(groups: list[list[list[int]]], max_answers: int) -> list[list[int]]:
    """Indices of groups in batches of at most `max_answers` answers (a larger group alone), the
    groups ordered by their token count so that a batch's rows need little padding."""
    def packed_length(seqs: list[list[int]]) -> int:
        return sum(len(seq) for seq in seqs) - (len(seqs) - 1) * shared_prefix_length(seqs)

    order = sorted(range(len(groups)), key=lambda i: packed_length(groups[i]))
    batches, current, answers = [], [], 0
    for index in order:
        if current and answers + len(groups[index]) > max_answers:
            batches.append(current)
            current, answers = [], 0
        current.append(index)
        answers += len(groups[index])
    return batches + [current] if current else batches


def context_length(model, tokenizer) -> int:
    """The longest sequence the model takes: its position limit, or the tokenizer's if smaller."""
    limit = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    return min(limit, tokenizer.model_max_length)


def encode_answers(tokenizer, prompts: list, responses: list[str], max_length: int,
                   ) -> tuple[list[list[int]], int]:
    """Encode (prompt, response) pairs for scoring; over-long ones keep their last `max_length`
    tokens (so the EOS stays). Returns the sequences and how many were cut."""
    from pipeline.tokenizer import encode_prompt_response

    seqs, truncated = [], 0
    for prompt, response in zip(prompts, responses, strict=True):
        full = encode_prompt_response(tokenizer, prompt, response, sys.maxsize)
        truncated += len(full) > max_length
        seqs.append(full[-max_length:])
    return seqs, truncated


def encode_ranked_row(tokenizer, row: dict, max_length: int,
                      where: str) -> tuple[list[list[int]], int]:
    """`encode_answers` for the answers of one ranked row; a bad text is reported at `where`
    (file:line)."""
    try:
        return encode_answers(tokenizer, [row["prompt"]] * len(row["responses"]), row["responses"],
                              max_length)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None


def score_texts(model, tokenizer, prompts: list, responses: list[str],
                batch_size: int = 32) -> list[float]:
    """The score of each (prompt, response) pair, the prompt as text or chat messages; normalized
    when the model comes from `load_reward_model`."""
    seqs, _ = encode_answers(tokenizer, prompts, responses, context_length(model, tokenizer))
    return score_sequences(model, seqs, batch_size)


def reward_scorer(resolved: Resolved, role: str = "--reward",
                  ) -> Callable[[str | list[dict], str], float]:
    """`score(prompt, answer)` with the reward model at `resolved`, one answer at a time (the
    labeling page and `rlhf chat --reward` score answers as they come)."""
    reward_model, tokenizer = load_reward_model(resolved, role=role)
    return lambda prompt, answer: score_texts(reward_model, tokenizer, [prompt], [answer])[0]


def regroup(flat: list[float], sizes: list[int]) -> list[list[float]]:
    """Split a flat list into consecutive groups of the given sizes."""
    groups, start = [], 0
    for size in sizes:
        groups.append(flat[start:start + size])
        start += size
    return groups
