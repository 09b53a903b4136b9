"""The gold evaluation: sample a policy on the world's held-out prompts and score its answers with
the gold scorer. Evaluation only: nothing trains on these numbers.
"""

from __future__ import annotations

from pipeline.generation import SamplingConfig, sample
from pipeline.world.gold import summarize


def gold_eval(model, tokenizer, prompts: list[str], sampling: SamplingConfig | None = None,
              seed: int = 0) -> dict:
    """Sample answers to the world's held-out prompts and score them with the gold scorer.

    Returns the gold scorer's summary (`mean_gold_score`, `count_accuracy`, `format_adherence`,
    `mean_length`, `samples`). Evaluation only: nothing trains on these numbers.
    """
    answers = sample(model, tokenizer, prompts, sampling, seed=seed)
    return summarize(prompts, answers)


def gold_metrics(summary: dict, series: str = "gold") -> dict[str, float]:
    """The numeric part of a gold summary, prefixed for the registry's metric series."""
    return {f"{series}/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))}
