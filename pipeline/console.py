"""What long work writes to stderr: progress, and messages about what a command is doing.

On a terminal, progress is a live bar (tqdm) with rate and ETA. In a log file (`make demo > log
2>&1`, a batch job) a bar's carriage-return frames pile up into one endless line, so when stderr
is not a terminal `progress()` writes a plain line every tenth of the work instead.

`rlhf -q` and `rlhf -v` set the verbosity for the whole process (and the processes it starts,
through the environment): quiet drops progress and `info()` messages, keeping warnings, errors and
results; verbose writes a progress line for every step in a log, and lets transformers and
accelerate report at their INFO level.
"""

from __future__ import annotations

import os
import sys
import time

VERBOSITY_ENV = "RLHF_VERBOSITY"
LEVELS = ("quiet", "normal", "verbose")
LOG_LINES = 10  # progress lines per task when stderr is not a terminal (normal verbosity)


def setup(level: str | None) -> None:
    """Set up a command's output: the verbosity (`-q` / `-v`; None keeps RLHF_VERBOSITY or
    normal), and the Hugging Face libraries' own bars (hub downloads, data set preparation) only
    where ours would show. Both through the environment, which the processes a command starts
    inherit and the libraries read when they are first imported."""
    if level is not None:
        os.environ[VERBOSITY_ENV] = level
    if verbosity() == "verbose":
        import logging
        # transformers sets its loggers' level from this variable when it is first imported.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "info")
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("accelerate").setLevel(logging.INFO)
    if not bars_shown():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def bars_shown() -> bool:
    """Whether progress is drawn as a live bar: stderr is a terminal and progress is wanted."""
    return (sys.stderr.isatty() and verbosity() != "quiet"
            and os.environ.get("RLHF_NO_PROGRESS") != "1")


def is_main_process() -> bool:
    """Whether this process writes records and prints results: under torchrun or accelerate
    launch every process runs the same command, and the one of rank 0 speaks for them. (A
    `StageRun` asks its accelerator, which reads the same rank.)"""
    return os.environ.get("RANK", "0") == "0"


def verbosity() -> str:
    level = os.environ.get(VERBOSITY_ENV, "normal")
    return level if level in LEVELS else "normal"


def info(message: str) -> None:
    """A message about what is being done (new run, resuming, published): stderr, unless quiet."""
    if verbosity() != "quiet":
        print(message, file=sys.stderr, flush=True)


def progress(total: int, desc: str, *, initial: int = 0, unit: str = "step",
             enabled: bool = True):
    """A progress tracker with tqdm's `update(n)`, `set_postfix(**values)` and `close()`: a bar on
    a terminal, plain lines otherwise; nothing when quiet, disabled, off the main process, or with
    RLHF_NO_PROGRESS=1."""
    enabled = enabled and is_main_process()
    if enabled and bars_shown():
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                    file=sys.stderr)
    enabled = enabled and verbosity() != "quiet" and os.environ.get("RLHF_NO_PROGRESS") != "1"
    every = 1 if verbosity() == "verbose" else max(1, -(-total // LOG_LINES))
    return ProgressLines(total, desc, initial=initial, unit=unit, every=every, enabled=enabled)


class ProgressLines:
    """Progress as whole lines, for logs: `sft: 30/100 steps (30%), 4.1 steps/s, 0:17 left,
    loss=1.234` after every `every` units of work and at the end."""

    def __init__(self, total: int, desc: str, *, initial: int, unit: str, every: int,
                 enabled: bool):
        self.total, self.desc, self.unit, self.every, self.enabled = total, desc, unit, every, enabled
        self.done = self.start = initial
        self.started_at = time.monotonic()
        self.postfix: dict[str, object] = {}

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self.postfix = values

    def update(self, count: int = 1) -> None:
        before = self.done
        self.done += count
        if before // self.every != self.done // self.every or self.done >= self.total:
            self._write()

    def close(self) -> None:
        """Nothing to release: the last line was written when the work reached its total."""

    def _write(self) -> None:
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started_at
        rate = (self.done - self.start) / elapsed if elapsed > 0 else 0.0
        units = _plural(self.unit)
        parts = [f"{self.desc}: {self.done}/{self.total} {units} "
                 f"({100 * self.done // max(1, self.total)}%)", f"{rate:.3g} {units}/s"]
        if rate > 0 and self.done < self.total:
            parts.append(f"{_clock((self.total - self.done) / rate)} left")
        parts += [f"{name}={value}" for name, value in self.postfix.items()]
        print(", ".join(parts), file=sys.stderr, flush=True)


def _plural(unit: str) -> str:
    """step -> steps, batch -> batches, answer -> answers."""
    return unit + ("es" if unit.endswith(("ch", "s", "sh", "x")) else "s")


def _clock(seconds: float) -> str:
    """Seconds as h:mm:ss, as tqdm shows an ETA."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
