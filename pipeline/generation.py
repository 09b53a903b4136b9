"""Sampling answers from a causal LM in batches, and the gold-score evaluation built on it.

Used by SFT and PPO (gold score on held-out prompts), `rlhf generate`, `rlhf chat`, the report
and `rlhf data gold-score`. Prompts are chat-formatted with the tokenizer's template, left-padded
and sampled with the KV cache; decoding stops at EOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.tokenizer import encode_prompt, left_pad


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.7   # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    batch_size: int = 32


@torch.no_grad()
def sample(model, tokenizer, prompts: list, sampling: SamplingConfig | None = None,
           seed: int | None = 0, max_prompt_tokens: int = 192) -> list[str]:
    """One answer per prompt (a string or a chat-message list), decoded without special tokens."""
    sampling = sampling or SamplingConfig()
    if seed is not None:
        torch.manual_seed(seed)
    device = next(model.parameters()).device
    answers = []
    was_training = model.training
    model.eval()
    for start in range(0, len(prompts), sampling.batch_size):
        chunk = prompts[start: start + sampling.batch_size]
        encoded = [encode_prompt(tokenizer, p, max_prompt_tokens) for p in chunk]
        input_ids, attention_mask = left_pad(encoded, tokenizer.pad_token_id)
        output = model.generate(input_ids=input_ids.to(device),
                                attention_mask=attention_mask.to(device),
                                **generate_kwargs(tokenizer, sampling))
        new_tokens = output[:, input_ids.shape[1]:]
        answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new_tokens]
    model.train(was_training)
    return answers


def generate_kwargs(tokenizer, sampling: SamplingConfig) -> dict:
    greedy = sampling.temperature <= 0
    kwargs = dict(max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                  use_cache=True)
    if not greedy:
        kwargs.update(temperature=sampling.temperature, top_k=sampling.top_k or None,
                      top_p=sampling.top_p)
    return kwargs


def gold_eval(model, tokenizer, prompts: list[str], sampling: SamplingConfig | None = None,
              seed: int = 0) -> dict:
    """Sample answers to the world's held-out prompts and score them with the gold scorer.

    Returns the gold scorer's summary (`mean_gold_score`, `count_accuracy`, `format_adherence`,
    `mean_length`, `samples`). Evaluation only: nothing trains on these numbers.
    """
    from pipeline.gold import summarize
    answers = sample(model, tokenizer, prompts, sampling, seed=seed)
    return summarize(prompts, answers)


def gold_metrics(summary: dict, series: str = "gold") -> dict[str, float]:
    """The numeric part of a gold summary, prefixed for the registry's metric series."""
    return {f"{series}/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))}
