"""Tests for pipeline.console: progress as a bar on a terminal, as whole lines in a log, and the
verbosity that `rlhf -q` / `-v` set."""

from __future__ import annotations

import io
import os
import sys

import pytest

from pipeline import console


@pytest.fixture
def stderr(monkeypatch, capsys):
    """What is written to stderr, which is not a terminal (pytest captures it), at normal
    verbosity with progress enabled."""
    monkeypatch.delenv("RLHF_NO_PROGRESS", raising=False)
    monkeypatch.delenv(console.VERBOSITY_ENV, raising=False)
    return lambda: capsys.readouterr().err


def run_steps(total: int, *, initial: int = 0) -> None:
    bar = console.progress(total, "sft", initial=initial)
    for step in range(initial, total):
        bar.set_postfix(loss=f"{1 / (step + 1):.3f}", refresh=False)
        bar.update(1)
    bar.close()


def test_a_log_gets_a_line_every_tenth_of_the_work(stderr):
    run_steps(20)
    written = stderr()
    lines = written.splitlines()
    assert "\r" not in written
    assert [line.split(" steps")[0] for line in lines] == [f"sft: {n}/20" for n in range(2, 21, 2)]
    assert lines[0].startswith("sft: 2/20 steps (10%), ") and " left, loss=0.500" in lines[0]
    assert lines[-1].startswith("sft: 20/20 steps (100%), ") and lines[-1].endswith("loss=0.050")
    assert "left" not in lines[-1]


def test_a_resumed_task_counts_from_where_it_was(stderr):
    run_steps(7, initial=4)  # every ceil(7 / 10) = 1 step
    assert [line.split(" steps")[0] for line in stderr().splitlines()] == \
        ["sft: 5/7", "sft: 6/7", "sft: 7/7"]


def test_verbose_writes_every_step_and_quiet_nothing(stderr, monkeypatch):
    monkeypatch.setenv(console.VERBOSITY_ENV, "verbose")
    run_steps(30)
    assert len(stderr().splitlines()) == 30
    monkeypatch.setenv(console.VERBOSITY_ENV, "quiet")
    run_steps(30)
    console.info("sft: new run")
    assert stderr() == ""


def test_no_progress_variable_and_disabled_trackers_write_nothing(stderr, monkeypatch):
    console.progress(5, "score", enabled=False).update(5)
    monkeypatch.setenv("RLHF_NO_PROGRESS", "1")
    console.progress(5, "score").update(5)
    assert stderr() == ""


def test_a_terminal_gets_a_live_bar(stderr, monkeypatch):
    from tqdm import tqdm

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True
    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = console.progress(10, "ppo")
    bar.update(10)
    bar.close()
    assert isinstance(bar, tqdm) and "\r" in sys.stderr.getvalue()


def test_a_log_gets_no_bars_from_the_hugging_face_libraries_either(stderr, monkeypatch):
    for variable in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        monkeypatch.delenv(variable, raising=False)
    console.setup(None)  # no -q / -v given
    assert console.verbosity() == "normal"
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] == "1"


def test_only_the_main_process_shows_progress(stderr, monkeypatch):
    monkeypatch.setenv("RANK", "1")  # a worker of a torchrun launch: rank 0 speaks for it
    run_steps(10)
    monkeypatch.setenv("RANK", "0")
    run_steps(10)
    assert len(stderr().splitlines()) == 10
