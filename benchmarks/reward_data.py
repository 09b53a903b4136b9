"""Benchmark: which reward data gives the better PPO policy — template answers, the SFT policy's own
answers ranked by the gold labeler, or both — with one round or more.

    python benchmarks/reward_data.py [--home runs] [--variants template policy both]
                                     [--rounds 1 2] [--held-out 200] [key=value ...]

Each variant is `rlhf pipeline run configs/tiny/pipeline.yaml reward.data.answers=VARIANT
rounds=N` in one registry home (pretrain and sft are trained once and reused; extra key=value
overrides go to every pipeline run, e.g. reward.train.max_steps=300). The reward models are also scored on
held-out policy samples: the SFT policy's answers to train prompts no variant collects from
(the last --held-out prompts of the world's reward_train.jsonl), ranked by the noiseless gold
labeler. Prints one row per variant: reward accuracy on the template eval file and on the
held-out policy samples, greedy and sampled gold before and after PPO, count accuracy, KL, and
the wall time of the pipeline run. Times depend on what else the machine runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RLHF = [sys.executable, "-m", "pipeline.commands.cli"]
PIPELINE_YAML = str(ROOT / "configs/tiny/pipeline.yaml")
PPO_YAML = str(ROOT / "configs/tiny/ppo.yaml")
COLUMNS = ("variant", "rounds", "RM acc (template eval)", "RM acc (policy samples)",
           "gold greedy", "gold sampled", "count acc", "KL", "wall s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default="runs", help="registry home (default: ./runs)")
    parser.add_argument("--variants", nargs="+", default=["template", "policy", "both"],
                        choices=["template", "policy", "both"])
    parser.add_argument("--rounds", nargs="+", type=int, default=[1],
                        help="round counts to run each policy variant with (template: 1 only)")
    parser.add_argument("--held-out", type=int, default=200,
                        help="train prompts (the file's last ones) of the held-out policy samples")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="pipeline overrides for every run")
    return parser.parse_args(argv)


def rlhf(home: str, *args: str) -> str:
    """Run `rlhf`; its stdout. Progress and stage output go to this process's stderr."""
    env = {**os.environ, "RLHF_HOME": home, "RLHF_NO_PROGRESS": "1"}
    done = subprocess.run([*RLHF, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode:
        sys.exit(f"rlhf {' '.join(args)} failed with exit code {done.returncode}")
    return done.stdout


def held_out_policy_samples(home: str, count: int) -> Path:
    """The SFT policy's answers to the last `count` world train prompts, ranked by gold."""
    from pipeline.registry import Registry
    from pipeline.world.cache import WorldSection, world_file

    registry = Registry(home)
    train_prompts = world_file(registry, WorldSection(), "reward_train.jsonl")
    registry.close()
    prompts = Path(home) / "held_out_prompts.jsonl"
    rows = train_prompts.read_text(encoding="utf-8").splitlines()[-count:]
    prompts.write_text("".join(json.dumps({"prompt": json.loads(row)["prompt"]}) + "\n"
                               for row in rows), encoding="utf-8")
    out = Path(home) / "held_out_policy_samples.jsonl"
    rlhf(home, "data", "collect", "sft:latest", "--config", PPO_YAML, "--prompts", str(prompts),
         "--out", str(out))
    return out


def pipeline_row(home: str, variant: str, rounds: int, overrides: list[str],
                 held_out: Path) -> list:
    started = time.time()
    result = json.loads(rlhf(home, "pipeline", "run", PIPELINE_YAML, f"rounds={rounds}",
                             f"reward.data.answers={variant}", *overrides).splitlines()[-1])
    wall = time.time() - started
    steps = result["stages"]
    last = "" if rounds == 1 else f".{rounds}"
    reward, ppo = (summary_of(home, steps[f"{stage}{last}"]["run"]) for stage in ("reward", "ppo"))
    first_ppo = summary_of(home, steps["ppo"]["run"])
    scored = json.loads(rlhf(home, "score", steps[f"reward{last}"]["run"], "--data", str(held_out),
                             "--json"))
    return [variant, rounds, reward["pairwise_accuracy"], scored["accuracy"],
            change(first_ppo, ppo, "gold_{}/mean_gold_score"),
            change(first_ppo, ppo, "gold_sampled_{}/mean_gold_score"),
            change(first_ppo, ppo, "gold_{}/count_accuracy"), ppo.get("kl_end"), wall]


def summary_of(home: str, run_id: str) -> dict:
    return json.loads(rlhf(home, "registry", "show", run_id, "--json"))["summary"]


def change(first: dict, last: dict, key: str) -> str:
    """"start → end": before the first round's PPO, and after the last round's."""
    start, end = first.get(key.format("start")), last.get(key.format("end"))
    return f"{start:.3f} → {end:.3f}" if start is not None and end is not None else "–"


def cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    home = str(Path(args.home).resolve())
    for stage in ("pretrain", "sft"):  # as the pipeline runs them, so that it reuses both
        rlhf(home, "run", stage, "--config", str(ROOT / f"configs/tiny/{stage}.yaml"))
    held_out = held_out_policy_samples(home, args.held_out)
    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS), flush=True)
    for variant in args.variants:
        for rounds in [1] if variant == "template" else args.rounds:
            row = pipeline_row(home, variant, rounds, args.overrides, held_out)
            print("| " + " | ".join(cell(value) for value in row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
