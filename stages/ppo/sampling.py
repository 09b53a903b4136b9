"""Sampling as a pure function of (episode, position, token): PPO's answers do not depend on how a
batch is split over processes, on the other prompts beside it, or on the RNG's history.

Each episode has a 64-bit key (from the seed, the step and its place in the global batch). Its
`t`-th answer token is the argmax of the temperature-scaled, top-k/top-p filtered logits plus
Gumbel noise, which is an exact sample from the filtered softmax (the Gumbel-max trick). The noise
of (key, t, token) comes from a counter-based hash (splitmix64) computed with integer tensor ops on
any device, so a run with two processes draws exactly the answers one process would, and a resumed
run draws what the uninterrupted one did.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import (LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                          TopKLogitsWarper, TopPLogitsWarper)

MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """An unsigned 64-bit constant as the int64 that has its bits."""
    value &= MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


GOLDEN = _signed(0x9E3779B97F4A7C15)
MIX1 = _signed(0xBF58476D1CE4E5B9)
MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's `>>` is arithmetic: it copies the sign)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer of x + golden ratio, elementwise on int64 (wrapping arithmetic)."""
    z = x + GOLDEN
    z = (z ^ _shift_right(z, 30)) * MIX1
    z = (z ^ _shift_right(z, 27)) * MIX2
    return z ^ _shift_right(z, 31)


def episode_keys(seed: int, step: int, positions: list[int] | np.ndarray) -> torch.Tensor:
    """(B,) int64 keys of the episodes at `positions` of the global batch of `step`."""
    keys = [np.random.SeedSequence([seed, step, int(p)]).generate_state(2, dtype=np.uint64)[0]
            for p in positions]
    return torch.tensor([_signed(int(key)) for key in keys], dtype=torch.int64)


def uniform_noise(keys: torch.Tensor, position: int, vocab: int) -> torch.Tensor:
    """(B, vocab) floats in (0, 1), a function of (key, position, token index) alone."""
    row = splitmix64(keys.unsqueeze(1) ^ splitmix64(torch.full_like(keys, position)).unsqueeze(1))
    bits = splitmix64(row + torch.arange(vocab, device=keys.device) * GOLDEN)
    # 23 bits: (k + 0.5) / 2^23 is exact in float32, so u is never 0 or 1 (whose logs are infinite).
    return (_shift_right(bits, 41).float() + 0.5) / float(1 << 23)


class GumbelNoise(LogitsProcessor):
    """Adds each episode's Gumbel noise for the token being chosen; greedy decoding then samples.
    `keys` must be on the device of the scores."""

    def __init__(self, keys: torch.Tensor, prompt_width: int):
        self.keys = keys
        self.prompt_width = prompt_width

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        position = input_ids.shape[1] - self.prompt_width  # the answer token being chosen
        u = uniform_noise(self.keys, position, scores.shape[1])
        gumbel = -torch.log(-torch.log(u))
        return scores + gumbel.to(scores.dtype)


def episode_sampler(keys: torch.Tensor, prompt_width: int, temperature: float, top_k: int,
                    top_p: float) -> LogitsProcessorList:
    """The processors that turn `generate(do_sample=False)` into keyed sampling."""
    processors = [TemperatureLogitsWarper(temperature)]
    if top_k > 0:
        processors.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        processors.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList([*processors, GumbelNoise(keys, prompt_width)])
