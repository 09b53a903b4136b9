"""The gold evaluation: sample a policy on the world's held-out prompts and score its answers with
the gold scorer. Evaluation only: nothing trains on these numbers.

`GoldEvalSection` is its one definition (prompts, how many, answer length, temperature): the SFT and
PPO stages run it, `rlhf report` repeats it with the settings its stages used, and
`rlhf data gold-score` runs it with a run's own settings, so the three give the same numbers for
the same model.
"""

from __future__ import annotations

from pydantic import Field

from pipeline.config import Section
from pipeline.data.prompts import read_prompts
from pipeline.generation import SamplingConfig, sample
from pipeline.registry import Registry
from pipeline.world.cache import WorldSection, world_file
from pipeline.world.gold import summarize


class GoldEvalSection(Section):
    prompts_file: str | None = Field(None, description="JSONL of {prompt} for the gold eval; "
                                     "empty = the world's eval_prompts.jsonl")
    n_prompts: int = Field(64, ge=0, description="held-out prompts in the gold eval; 0 skips it")
    max_new_tokens: int = Field(64, ge=1, description="answer length limit of the gold eval")
    temperature: float = Field(0.0, ge=0, description="sampling temperature of the gold eval; "
                               "0 = greedy")

    def prompts_path(self, registry: Registry, world: WorldSection) -> str:
        """The prompts file: `prompts_file`, else the world's held-out eval prompts."""
        return self.prompts_file or str(world_file(registry, world, "eval_prompts.jsonl"))

    def prompts(self, registry: Registry, world: WorldSection) -> list[str]:
        """The first `n_prompts` prompts ([] when the eval is off)."""
        if not self.n_prompts:
            return []
        return read_prompts(self.prompts_path(registry, world), self.n_prompts)

    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature)

    def describe(self, prompts_path: str) -> str:
        """The settings in one line, printed beside the numbers they produced."""
        how = "greedy" if self.temperature == 0 else f"temperature {self.temperature:g}"
        return (f"{self.n_prompts} prompts from {prompts_path}, {how}, "
                f"at most {self.max_new_tokens} new tokens")


def run_gold_settings(config: dict) -> tuple[GoldEvalSection, WorldSection] | None:
    """The gold eval a stage run was configured with (its `eval` and `data.world` sections), or
    None when the run has no gold eval (pretrain, reward, or `eval.n_prompts: 0`)."""
    section = config.get("eval", {})
    if not section.get("n_prompts"):
        return None
    fields = {k: v for k, v in section.items() if k in GoldEvalSection.model_fields}
    return GoldEvalSection(**fields), WorldSection(**config.get("data", {}).get("world", {}))


def gold_eval(model, tokenizer, prompts: list[str], sampling: SamplingConfig | None = None,
              seed: int = 0, progress: str = "gold eval") -> dict:
    """Sample answers to the world's held-out prompts and score them with the gold scorer.

    Returns the gold scorer's summary (`mean_gold_score`, `count_accuracy`, `format_adherence`,
    `mean_length`, `samples`). Evaluation only: nothing trains on these numbers. `progress` labels
    the progress bar of the sampling.
    """
    answers = sample(model, tokenizer, prompts, sampling, seed=seed, progress=progress)
    return summarize(prompts, answers)


def gold_metrics(summary: dict, series: str = "gold") -> dict[str, float]:
    """The numeric part of a gold summary, prefixed for the registry's metric series."""
    return {f"{series}/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float))}
