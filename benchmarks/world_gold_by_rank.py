"""Mean gold score by rank position in the world's reward data, and how long the world takes to write.

A rank position is one entry of "ranking" (a tie group counts as one position, its answers all
scored). If the labels and the gold scorer agree, the means fall from the first position to the
last. Reads the shipped `reward_data/` files unless `--dir` names a `write_world` output.

    python benchmarks/world_gold_by_rank.py [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from pipeline.world.gold import gold_score
from pipeline.world.farm import write_world

REPO = Path(__file__).resolve().parents[1]


def scores_by_position(path: Path) -> tuple[dict[int, list[float]], list[float]]:
    """Gold scores per rank position (1 = best) and of the last position of every row."""
    by_position: dict[int, list[float]] = defaultdict(list)
    last: list[float] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        for position, item in enumerate(row["ranking"], start=1):
            indices = item if isinstance(item, list) else [item]
            scores = [gold_score(row["prompt"], row["responses"][i]) for i in indices]
            by_position[position] += scores
            if position == len(row["ranking"]):
                last += scores
    return by_position, last


def print_table(title: str, path: Path) -> None:
    by_position, last = scores_by_position(path)
    print(f"\n{title} ({path})")
    print(f"{'rank position':>14} {'answers':>8} {'mean gold':>10}")
    for position, scores in sorted(by_position.items()):
        print(f"{position:>14} {len(scores):>8} {sum(scores) / len(scores):>10.3f}")
    print(f"{'last':>14} {len(last):>8} {sum(last) / len(last):>10.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, help="a write_world output directory (default: reward_data/)")
    args = parser.parse_args()
    if args.dir:
        train, evaluation = args.dir / "reward_train.jsonl", args.dir / "reward_eval.jsonl"
    else:
        train, evaluation = REPO / "reward_data" / "train.jsonl", REPO / "reward_data" / "eval.jsonl"
    print_table("eval reward set", evaluation)
    print_table("train reward set", train)
    with tempfile.TemporaryDirectory() as scratch:
        for size in ("tiny", "small"):
            start = time.perf_counter()
            write_world(Path(scratch) / size, seed=0, size=size)
            print(f"\nwrite_world(size={size!r}): {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
