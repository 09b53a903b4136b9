"""What the PPO stage measures and writes besides its training metrics: the gold score of the
policy at the start, every `train.eval_every` steps and at the end (greedy answers, and answers
sampled as in training); sample answers in the run's `samples.jsonl`; the run summary.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

from pipeline.world.evaluation import gold_eval, gold_metrics
from stages.ppo.config import Config
from stages.ppo.experience import Experience


# The metric prefixes: answers at eval.temperature; answers sampled as in training.
GOLD_SERIES = ("gold", "gold_sampled")


def measure_gold(policy, tokenizer, prompts: list[str], config: Config) -> dict[str, dict]:
    """Gold summaries of answers to the held-out prompts, by series: `gold` (eval.temperature,
    0 = greedy) and, when eval.sampled_answers > 0, `gold_sampled` (that many answers per prompt,
    sampled with the rollout's settings)."""
    evaluation, generation = config.eval, config.generation
    sampling = evaluation.sampling()
    summaries = {"gold": gold_eval(policy, tokenizer, prompts, sampling, seed=config.seed)}
    if evaluation.sampled_answers:
        repeated = [prompt for prompt in prompts for _ in range(evaluation.sampled_answers)]
        as_in_training = replace(sampling, temperature=generation.temperature,
                                 top_k=generation.top_k, top_p=generation.top_p)
        summaries["gold_sampled"] = gold_eval(policy, tokenizer, repeated, as_in_training,
                                              seed=config.seed, progress="gold eval (sampled)")
    return summaries


def log_gold(stage_run, step: int, policy, tokenizer, prompts: list[str],
             config: Config) -> dict[str, dict]:
    """Gold-evaluate the policy and log `gold/...` (and `gold_sampled/...`) at `step`; {} when
    the eval is off."""
    if not prompts:
        return {}
    summaries = measure_gold(policy, tokenizer, prompts, config)
    stage_run.log(step, {name: value for series, summary in summaries.items()
                         for name, value in gold_metrics(summary, series).items()})
    return summaries


def start_gold(stage_run, policy, tokenizer, prompts: list[str], config: Config) -> dict[str, dict]:
    """The starting policy's gold summaries: measured and logged at step 0 by a new run, read
    back from the registry by a resumed one (a resume keeps the metrics of step 0)."""
    logged: dict[str, dict] = {}
    for name, series in stage_run.registry.metrics(stage_run.run.id).items():
        prefix, _, metric = name.partition("/")
        if prefix in GOLD_SERIES and series[0][0] == 0:
            logged.setdefault(prefix, {})[metric] = series[0][1]
    if logged or not prompts:
        return logged
    return log_gold(stage_run, 0, policy, tokenizer, prompts, config)


class SamplesFile:
    """`samples.jsonl` in the run directory: a few answers every `samples.every_steps` steps."""

    def __init__(self, path: Path, is_main: bool):
        self.path = path
        self.enabled = is_main

    def drop_after(self, step: int) -> None:
        """A resumed run writes the samples after its resume step again: drop the old ones."""
        if not self.enabled or not self.path.exists():
            return
        kept = []
        # errors="replace": a kill mid-write may have cut a character as well as a line.
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # the partial last line of a write that a kill cut short
                continue
            if row["step"] <= step:
                kept.append(line)
        temporary = self.path.with_name(self.path.name + ".tmp")
        temporary.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(temporary, self.path)  # a kill now leaves the old file or the new one

    def write(self, step: int, experience: Experience, prompts: list, tokenizer, count: int) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            for row in range(min(count, len(experience))):
                answer = experience.responses[row][experience.response_mask[row].bool()]
                handle.write(json.dumps({
                    "step": step, "prompt": prompts[row],
                    "response": tokenizer.decode(answer, skip_special_tokens=True).strip(),
                    "rm_score": round(experience.rm_scores[row].item(), 4),
                    "ended_with_eos": bool(experience.ended[row])}, ensure_ascii=False) + "\n")


def run_summary(stage_run, config: Config, counts: dict[str, int], gold_start: dict,
                gold_end: dict) -> dict:
    """Counts, gold before/after, and the first and last values of the main training curves."""
    series = stage_run.registry.metrics(stage_run.run.id)
    summary: dict = dict(counts, published="ema" if config.ema.decay > 0 else "policy")
    for name in ("rm_score_mean", "kl", "response_length", "eos_rate"):
        if name in series:
            summary[f"{name}_start"] = series[name][0][1]
            summary[f"{name}_end"] = series[name][-1][1]
    for when, summaries in (("start", gold_start), ("end", gold_end)):
        for series, gold in summaries.items():
            summary.update({f"{series}_{when}/{k}": v for k, v in gold.items()
                            if isinstance(v, (int, float))})
    if gold_end.get("gold", {}).get("samples"):
        summary["gold_samples"] = gold_end["gold"]["samples"][:3]
    return summary


def describe_result(summary: dict) -> str:
    parts = []
    for label, start, end in (("gold", "gold_start/mean_gold_score", "gold_end/mean_gold_score"),
                              ("sampled gold", "gold_sampled_start/mean_gold_score",
                               "gold_sampled_end/mean_gold_score"),
                              ("rm score", "rm_score_mean_start", "rm_score_mean_end"),
                              ("KL", "kl_start", "kl_end")):
        if start in summary and end in summary:
            parts.append(f"{label} {summary[start]:.3f} → {summary[end]:.3f}")
    return "ppo: " + ", ".join(parts)
