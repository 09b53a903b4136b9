"""What a run shows on the terminal besides its messages: progress bars for every long phase
(training steps, sampling answers, scoring them, evaluating), and which process shows them.

Bars go to stderr, with rate and ETA, from the main process only, and not at all with
RLHF_NO_PROGRESS=1 (tests, logs). Imports nothing heavy: tqdm loads when a bar is made.
"""

from __future__ import annotations

import os
import sys


def is_main_process() -> bool:
    """Whether this process writes records and prints results: under torchrun or accelerate
    launch every process runs the same command, and the one of rank 0 speaks for them. (A
    `StageRun` asks its accelerator, which reads the same rank.)"""
    return os.environ.get("RANK", "0") == "0"


def progress_bar(total: int, desc: str, unit: str, initial: int = 0):
    """A tqdm bar of `total` `unit`s labelled `desc`: call `update(n)` as work is done, `close()`
    at the end. Disabled (a no-op) off the main process, with RLHF_NO_PROGRESS=1, and when
    `desc` is empty (for callers whose bar is optional)."""
    from tqdm.auto import tqdm

    shown = bool(desc) and is_main_process() and os.environ.get("RLHF_NO_PROGRESS") != "1"
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not shown,
                dynamic_ncols=True, file=sys.stderr)
