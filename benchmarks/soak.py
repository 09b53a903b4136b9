"""Soak test: SIGKILL every stage again and again at seeded random moments, rerun it, and count the
trials whose result differs in any way from an uninterrupted run.

    .venv/bin/python benchmarks/soak.py --kills 20 --stages pretrain,sft,reward,ppo [--seed 0]

For each stage: one uninterrupted tiny run (upstream stages first) is the reference; then trials
until `--kills` kills have landed. A trial runs the stage's command in a fresh registry home and
kills it up to twice — at a random time, right after a resume state commits, while a checkpoint
(state or published model) is being written, or after its rename but before its manifest — then
reruns the same command to the end. It fails when the rerun fails, `rlhf registry verify` fails, a
run is left unfinished or debris is left, or the weights or any per-step metric (losses, the CRC of
the examples each step saw, PPO's rollout statistics) differ from the reference's by a single bit.
The checks are those of tests/reliability/test_fault_injection.py, which runs one kill per stage.

Prints one line per trial, then a table: trials, kills and failures per stage. Exit code 1 when
any trial failed; `--keep DIR` keeps the homes of failed trials there for inspection.
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "reliability"))

from faults import STAGES, Chain, Reference, kill_trial  # noqa: E402

MAX_KILLS_PER_TRIAL = 2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="kills per stage")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="comma-separated stages (default: every stage present)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, help="copy the homes of failed trials here")
    return parser.parse_args()


def soak_stage(reference: Reference, kills_wanted: int, seed: int, work: Path,
               keep: Path | None) -> dict:
    rng = random.Random(f"{seed}-{reference.stage}")
    trials, kills, failures, kinds = 0, 0, 0, Counter()
    # A trial whose run outpaces its drawn kill moment lands no kill; the cap ends the loop anyway.
    while kills < kills_wanted and trials < 3 * kills_wanted:
        home = work / f"{reference.stage}-{trials}"
        started = time.monotonic()
        outcome = kill_trial(reference, home, rng, max_kills=MAX_KILLS_PER_TRIAL)
        trials += 1
        kills += len(outcome.kills)
        kinds.update(point.kind for point in outcome.kills)
        verdict = "FAIL" if outcome.problems else "ok"
        kills_said = ", then ".join(map(str, outcome.kills)) or "never (finished first)"
        print(f"{reference.stage} trial {trials}: {verdict} in {time.monotonic() - started:.0f}s; "
              f"killed {kills_said}", flush=True)
        for problem in outcome.problems:
            print(f"    {problem[:600]}", flush=True)
        if outcome.problems:
            failures += 1
            if keep is not None:
                shutil.copytree(home, keep / home.name, dirs_exist_ok=True)
        shutil.rmtree(home, ignore_errors=True)
    return {"stage": reference.stage, "trials": trials, "kills": kills, "failures": failures,
            "kinds": kinds}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'stage':<10}{'trials':>8}{'kills':>8}{'failures':>10}   kill moments")
    for row in rows:
        kinds = ", ".join(f"{kind} {count}" for kind, count in sorted(row["kinds"].items()))
        print(f"{row['stage']:<10}{row['trials']:>8}{row['kills']:>8}{row['failures']:>10}"
              f"   {kinds}")


def main() -> int:
    args = parse_args()
    stages = [stage for stage in args.stages.split(",") if stage]
    missing = [stage for stage in stages if stage not in STAGES]
    if missing:
        print(f"error: no such stage: {', '.join(missing)}; choose from {', '.join(STAGES)}",
              file=sys.stderr)
        return 2
    rows = []
    with tempfile.TemporaryDirectory(prefix="rlhf-soak-") as tmp:
        chain = Chain(Path(tmp) / "chain")
        for stage in stages:
            reference = chain.reference(stage)
            print(f"{stage}: reference run {reference.run_id} took {reference.seconds:.0f}s",
                  flush=True)
            rows.append(soak_stage(reference, args.kills, args.seed, Path(tmp), args.keep))
    print_table(rows)
    return 1 if any(row["failures"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
