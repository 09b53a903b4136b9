"""The chat recipe (configs/chat) on a real pretrained chat model, with what each stage did to it.

    .venv/bin/python benchmarks/convert_smollm2.py --out models/smollm2-135m-instruct   # once
    .venv/bin/python benchmarks/real_model.py --model models/smollm2-135m-instruct [--steps cpu]

`--model` is any local Hugging Face chat-model directory. The stages run through the `rlhf` CLI, one
process each, into a fresh registry home (`--home`, default a temporary one): SFT from the model,
a reward model from the SFT model, PPO of the SFT policy against it. The gold scorer then rates
each model's answers to the same held-out prompts of the embedded world (`--prompts`, default
100), greedy and sampled at the training temperature (0.7). Reported per stage: the gold score
before and after (greedy and sampled), wall time and peak RSS of its process; for the reward model
its held-out pairwise accuracy; for PPO the mean KL of its last steps against `--kl-bound`.
Everything is printed as a table and written to `--out` as JSON.

`--steps cpu` (the default) took 22 minutes on 2 otherwise idle CPU cores, `--steps recipe`
trains as configs/chat ships (for a GPU), `--steps smoke` checks the script end to end in a few
steps and prompts. The stages' own gold evals are off: the gold-score processes measure every
model alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLED_TEMPERATURE = 0.7  # configs/chat/ppo.yaml's generation.temperature: what PPO optimizes
STAGES = ("sft", "reward", "ppo")
# Steps and batch sizes of each stage (overrides of configs/chat/STAGE.yaml), by --steps:
# "recipe" trains as configs/chat ships (a GPU's work); "cpu" took 22 minutes on 2 idle CPU
# cores with SmolLM2-135M-Instruct;
# "smoke" checks the script end to end (a reward eval of 3 prompts, the test fixture's).
STEPS = {
    "recipe": {"sft": [], "reward": [], "ppo": []},
    "cpu": {"sft": ["train.max_steps=40", "train.batch_size=4", "train.grad_accum=1",
                    "train.warmup_steps=4", "checkpoint.every_steps=20"],
            "reward": ["train.max_steps=200", "train.batch_size=2", "train.warmup_steps=10",
                       "normalize.prompts=32", "normalize.max_new_tokens=64",
                       "checkpoint.every_steps=50"],
            # 80 episodes at the recipe's lr of 1e-6 leave the policy where it was (6 steps: KL
            # 0.04), so the CPU budget trains at 5e-6.
            "ppo": ["train.max_steps=10", "train.batch_size=8", "train.lr=5e-6",
                    "generation.max_new_tokens=48", "checkpoint.every_steps=5",
                    "samples.every_steps=5"]},
    "smoke": {"sft": ["train.max_steps=2", "train.batch_size=2", "train.grad_accum=1",
                      "train.warmup_steps=0", "train.eval_batches=1", "checkpoint.every_steps=2"],
              "reward": ["train.max_steps=2", "train.batch_size=2", "normalize.prompts=2",
                         "normalize.max_new_tokens=8", "checkpoint.every_steps=2",
                         "data.eval_files=[tests/fixtures/data/reward_ranked.jsonl]"],
              "ppo": ["train.max_steps=2", "train.batch_size=4", "generation.max_new_tokens=8",
                      "checkpoint.every_steps=2", "samples.every_steps=1"]},
}
STAGE_INPUTS = {"sft": lambda model: [f"model.source={model}"],
                "reward": lambda model: ["model.source=sft:latest"],
                "ppo": lambda model: ["model.policy=sft:latest", "model.reward=reward:latest"]}


@dataclass
class Process:
    """What one `rlhf` process printed and cost."""
    stdout: str
    seconds: float
    peak_rss_mib: float


@dataclass
class StageReport:
    stage: str
    seconds: float
    peak_rss_mib: float
    gold_before: dict = field(default_factory=dict)  # {"greedy": score, "sampled": score}
    gold_after: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)         # reward: accuracy; ppo: KL


def rlhf(home: Path, *args: str) -> Process:
    """Run `rlhf --home HOME ARGS` in its own process; its stdout, wall time and peak RSS."""
    with tempfile.TemporaryFile("w+") as out:
        start = time.time()
        process = subprocess.Popen([sys.executable, "-m", "pipeline.commands.cli", "--home",
                                    str(home), *args], cwd=ROOT, stdout=out)
        _, status, usage = os.wait4(process.pid, 0)  # the rusage of this child alone
        seconds = time.time() - start
        out.seek(0)
        stdout = out.read()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: rlhf {' '.join(args)} failed (exit {os.waitstatus_to_exitcode(status)})")
    return Process(stdout, seconds, usage.ru_maxrss / 1024)  # Linux reports KiB


def gold(home: Path, ref: str, prompts: int, max_new_tokens: int) -> dict[str, float]:
    """Mean gold score of `ref`'s answers to the held-out prompts: greedy, and sampled."""
    scores = {}
    for name, temperature in (("greedy", 0.0), ("sampled", SAMPLED_TEMPERATURE)):
        result = rlhf(home, "data", "gold-score", ref, "--n", str(prompts), "--temperature",
                      str(temperature), "--max-new-tokens", str(max_new_tokens), "--json")
        scores[name] = json.loads(result.stdout)["mean_gold_score"]
    return scores


def summary(home: Path, ref: str) -> dict:
    return json.loads(rlhf(home, "registry", "show", ref, "--json").stdout)["summary"]


def mean_final_kl(home: Path, last: int = 5) -> float:
    """PPO's KL per answer, averaged over its `last` steps."""
    from pipeline.registry import Registry

    registry = Registry(home, create=False)
    kl = [value for _, value in registry.metrics(registry.lookup("ppo:latest").id)["kl"]][-last:]
    return sum(kl) / len(kl)


def run_recipe(home: Path, model: str, steps: dict, prompts: int,
               max_new_tokens: int) -> list[StageReport]:
    reports = []
    policy_gold = gold(home, model, prompts, max_new_tokens)  # of the policy the next stage trains
    for stage in STAGES:
        print(f"benchmark: {stage} ...", file=sys.stderr, flush=True)
        process = rlhf(home, "run", stage, "--config", f"configs/chat/{stage}.yaml",
                       *STAGE_INPUTS[stage](model), *steps[stage],
                       *([] if stage == "reward" else ["eval.n_prompts=0"]))
        report = StageReport(stage, round(process.seconds, 1), round(process.peak_rss_mib))
        if stage == "reward":
            report.extra["pairwise_accuracy"] = summary(home, "reward:latest")["pairwise_accuracy"]
        else:
            report.gold_before = policy_gold
            report.gold_after = policy_gold = gold(home, f"{stage}:latest", prompts,
                                                   max_new_tokens)
        if stage == "ppo":
            report.extra["kl_last_steps"] = mean_final_kl(home)
        reports.append(report)
    return reports


def print_table(reports: list[StageReport], kl_bound: float) -> None:
    def change(report: StageReport, kind: str) -> str:
        if not report.gold_after:
            return "-"
        return f"{report.gold_before[kind]:.3f} → {report.gold_after[kind]:.3f}"

    print(f"{'stage':<7} {'gold greedy':>15} {'gold sampled':>15} {'wall s':>8} "
          f"{'peak RSS MiB':>12}  other")
    for report in reports:
        other = ", ".join(f"{key} {value:.3f}" for key, value in report.extra.items())
        print(f"{report.stage:<7} {change(report, 'greedy'):>15} {change(report, 'sampled'):>15} "
              f"{report.seconds:>8.0f} {report.peak_rss_mib:>12.0f}  {other}")
    sft, reward, ppo = reports
    checks = {"SFT raises the sampled gold score": sft.gold_after["sampled"] >
              sft.gold_before["sampled"],
              "PPO raises it again": ppo.gold_after["sampled"] > ppo.gold_before["sampled"],
              f"PPO's KL under {kl_bound}": ppo.extra["kl_last_steps"] < kl_bound,
              "reward model's held-out pairwise accuracy >= 0.85":
                  reward.extra["pairwise_accuracy"] >= 0.85}
    for what, holds in checks.items():
        print(f"{'yes' if holds else 'NO '}  {what}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a local Hugging Face chat-model directory")
    parser.add_argument("--home", type=Path, help="registry home (default: a temporary one)")
    parser.add_argument("--steps", choices=list(STEPS), default="cpu",
                        help="how long each stage trains (see the module docstring)")
    parser.add_argument("--prompts", type=int, help="held-out prompts per gold score "
                                                    "(default 100; 4 with --steps smoke)")
    parser.add_argument("--max-new-tokens", type=int, help="answer length limit of the gold "
                        "scores (default 64; 8 with --steps smoke)")
    parser.add_argument("--kl-bound", type=float, default=1.5, help="nats per answer")
    parser.add_argument("--out", type=Path, default=Path("out/real_model.json"))
    args = parser.parse_args()
    if not Path(args.model, "config.json").is_file():
        sys.exit(f"error: --model {args.model}: not a Hugging Face model directory (no "
                 f"config.json); convert one with benchmarks/convert_smollm2.py")
    smoke = args.steps == "smoke"
    prompts = args.prompts or (4 if smoke else 100)
    max_new_tokens = args.max_new_tokens or (8 if smoke else 64)
    steps = STEPS[args.steps]
    with tempfile.TemporaryDirectory() as scratch:
        home = args.home or Path(scratch) / "home"
        started = time.time()
        reports = run_recipe(home, str(Path(args.model).resolve()), steps, prompts,
                             max_new_tokens)
        total = time.time() - started
    print(f"the chat recipe on {args.model}: {prompts} held-out prompts, "
          f"{total / 60:.1f} min in all")
    print_table(reports, args.kl_bound)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "prompts": prompts, "minutes":
                                    round(total / 60, 1), "steps": steps,
                                    "stages": [asdict(report) for report in reports]}, indent=1))


if __name__ == "__main__":
    main()
