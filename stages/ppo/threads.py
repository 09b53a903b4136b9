"""CPU threading for PPO's model passes: several small passes side by side, one thread each.

On a CPU, small models split over several intra-op threads synchronize at every matrix multiply,
which a CPU shared with other work turns into waiting; passes through different models, one
thread each, keep the cores busy without it (`ppo.side_by_side`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def side_by_side(*tasks: Callable[[], T], workers: int) -> list[T]:
    """Run independent model passes at the same time, up to `workers` threads; their results.

    Each pass runs on one intra-op thread; with one task or one worker the tasks run in turn on
    the caller's threads (sampling and single passes keep every core). Small models split
    over several intra-op threads synchronize at every matrix multiply, which a CPU shared with
    other work turns into waiting (measured here: 5-20x slower at 2 threads under load), while
    passes through different models, one thread each, keep the cores busy without it. Each pass
    computes exactly what it would alone, so results do not depend on the scheduling. The
    workers inherit the caller's grad mode and CPU autocast (both are per thread).
    """
    if workers < 2 or len(tasks) < 2:
        return [task() for task in tasks]
    grad_enabled = torch.is_grad_enabled()
    autocast = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))

    def in_callers_mode(task: Callable[[], T]) -> T:
        with torch.set_grad_enabled(grad_enabled), \
                torch.autocast("cpu", dtype=autocast[1], enabled=autocast[0]):
            return task()

    # The pool's threads start inside `intra_op_threads(1)`, so each pass gets one thread.
    with intra_op_threads(1), ThreadPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
        futures = [pool.submit(in_callers_mode, task) for task in tasks]
        return [future.result() for future in futures]


@contextmanager
def intra_op_threads(count: int):
    """Run the block with `count` intra-op threads (threads started inside it get that count)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
