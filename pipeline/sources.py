"""Where a stage's data comes from: the user's files, or the embedded world cached in the registry.

With no data files configured, a stage uses the embedded farmyard world, generated once per
(seed, size) into `HOME/data/world-SIZE-seedS/` as a committed directory, so two stages (or two
processes) never read a half-written file.
"""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import Literal

from pipeline.config import Section
from pipeline.registry import Registry, commit_directory, verify_directory


class WorldSection(Section):
    """The embedded world used when a stage names no data files."""

    seed: int = 0
    size: Literal["tiny", "small"] = "tiny"


def world_dir(registry: Registry, world: WorldSection) -> Path:
    """The world's files for this seed and size, generated on first use (under a file lock)."""
    from pipeline.world import write_world
    target = registry.data_dir() / f"world-{world.size}-seed{world.seed}"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".world.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes: one writes, the other waits and reads
        if verify_directory(target):
            commit_directory(target, lambda tmp: write_world(tmp, seed=world.seed, size=world.size))
    return target


def world_file(registry: Registry, world: WorldSection, name: str) -> Path:
    return world_dir(registry, world) / name
