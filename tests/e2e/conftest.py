"""Helpers for end-to-end tests: run the real `rlhf` CLI in a subprocess, kill it mid-run, and
compare the weights of published models exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]


def rlhf_command(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.commands.cli", "--home", str(home), *args]


def cli_env() -> dict:
    """The environment of a CLI subprocess: no progress, fixed hashing, and the test process's
    thread count (`make test` runs two test workers of one thread each on two cores)."""
    threads = os.environ.get("OMP_NUM_THREADS", "2")
    return dict(os.environ, RLHF_NO_PROGRESS="1", OMP_NUM_THREADS=threads, PYTHONHASHSEED="0")


def rlhf(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(rlhf_command(home, *args), cwd=ROOT, env=cli_env(),
                            capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"rlhf {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
    return result


def run_json(result: subprocess.CompletedProcess) -> dict:
    """The JSON line `rlhf run` prints last."""
    return json.loads(result.stdout.strip().splitlines()[-1])


def torchrun_command(home: Path, *args: str, processes: int = 2) -> list[str]:
    """`rlhf args` under torchrun with `processes` CPU processes (gloo). A --standalone rendezvous
    on a free port: tests running side by side never share one."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            str(processes), "-m", "pipeline.commands.cli", "--home", str(home), *args]


def kill_when(home: Path, args: tuple[str, ...], ready, timeout: float = 600,
              command=rlhf_command) -> None:
    """Start `command(home, *args)`, SIGKILL it and every process it started (its own session)
    as soon as `ready()` is true (polled), and wait for it."""
    process = subprocess.Popen(command(home, *args), cwd=ROOT, env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.time() + timeout
    try:
        while not ready():
            if process.poll() is not None:
                raise AssertionError(f"run ended before it could be killed:\n{process.stderr.read()}")
            if time.time() > deadline:
                raise AssertionError("the kill point was never reached")
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
        process.stderr.close()


def committed_state(home: Path, stage: str, step: int):
    """A `ready()` predicate: a state of `stage` at `step` has its manifest (is committed)."""
    return lambda: any((home / "runs").glob(f"{stage}-*/state/step-{step}/manifest.json"))


def model_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    weights = {}
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        weights.update(load_file(shard))
    assert weights, f"no safetensors in {model_dir}"
    return weights


def results(summary: dict) -> dict:
    """A run summary without what is measured rather than computed (peak memory), which differs
    between two runs that compute the same."""
    return {name: value for name, value in summary.items() if name != "peak_memory_mib"}


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    """A small English + Chinese corpus (stand-in for large user corpora)."""
    lines = []
    for n in range(1, 10):
        for animal, legs in (("chicken", 2), ("cow", 4), ("spider", 8), ("ant", 6)):
            lines.append(f"{n} {animal}s have {n * legs} legs. 鸡有两条腿。\n\n")
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines) * 3, encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def mechanics_home(tmp_path_factory) -> Path:
    """A registry with a barely trained pretrain run (a policy) and a reward model on top of it:
    enough for every mechanism of sft, reward and ppo, not for learning anything. Tests copy it
    before adding runs."""
    home = tmp_path_factory.mktemp("mechanics")
    rlhf(home, "run", "pretrain", "--config", "configs/tiny/pretrain.yaml", "train.max_steps=4",
         "train.batch_size=4", "data.seq_len=64", "tokenizer.vocab_size=400",
         "checkpoint.every_steps=100")
    rlhf(home, "run", "reward", "--config", "configs/tiny/reward.yaml",
         "model.source=pretrain:latest", "train.max_steps=2", "train.batch_size=2",
         "checkpoint.every_steps=100", "normalize.prompts=4", "normalize.max_new_tokens=8")
    return home
