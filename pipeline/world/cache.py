"""Where a stage's data comes from: the user's files, or the embedded world cached in the registry.

With no data files configured, a stage uses the embedded farmyard world, generated once per
(seed, size) into `HOME/data/world-SIZE-seedS/` as a committed directory, so two stages (or two
processes) never read a half-written file.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Literal

from pydantic import Field

from pipeline.config import Section
from pipeline.registry import Registry, commit_directory, directory_problems
from pipeline.world.farm import write_world


class WorldSection(Section):
    """The embedded world used when a stage names no data files."""

    seed: int = Field(0, description="the world's seed (its animals, prompts and answers)")
    size: Literal["tiny", "small"] = Field("tiny", description="tiny (the tiny recipe) or small "
                                           "(more animals and prompts)")


def world_dir(registry: Registry, world: WorldSection) -> Path:
    """The world's files for this seed and size, generated on first use (under a file lock)."""
    target = registry.data_dir() / f"world-{world.size}-seed{world.seed}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".world.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes: one writes, the other waits and reads
        if directory_problems(target):
            commit_directory(target, lambda tmp: write_world(tmp, seed=world.seed, size=world.size))
    return target


def world_file(registry: Registry, world: WorldSection, name: str) -> Path:
    return world_dir(registry, world) / name


def train_and_eval_files(registry: Registry, data, kind: str) -> tuple[list[str], list[str]]:
    """A stage's train and eval sources: the user's `data.train_files` and `data.eval_files`, or
    the world's `KIND_train.jsonl` and (unless eval files are named) `KIND_eval.jsonl`."""
    if data.train_files:
        return list(data.train_files), list(data.eval_files)
    train, held_out = (str(world_file(registry, data.world, f"{kind}_{split}.jsonl"))
                       for split in ("train", "eval"))
    return [train], list(data.eval_files) or [held_out]
