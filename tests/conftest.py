"""Fixtures shared by every test directory: a throw-away registry home and a CLI runner.

    home       a registry home path under tmp_path (not created: opening the registry creates it)
    registry   an open `Registry` at `home`, closed after the test
    add_run    create a run in a given registry, optionally publishing a small fake model directory
    make_run   the same, in `registry`
    run_cli    run `python -m pipeline.commands.cli ARGS` in a subprocess with RLHF_HOME=home
    flip_byte  invert one byte of a file in place (corruption tests)
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.registry import Registry, Resolved, Run

# No test reaches the model hub: hub names resolve from the local hub cache only (set before
# huggingface_hub is imported, which reads it once; CLI subprocesses inherit it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]

# What a published model directory holds, in miniature: the registry only hashes the bytes.
FAKE_MODEL_FILES = {
    "model.safetensors": b"fake weights",
    "config.json": b'{"model_type": "llama"}',
    "tokenizer.json": b'{"version": "1.0"}',
}


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def registry(home: Path):
    registry = Registry(home)
    yield registry
    registry.close()


@pytest.fixture(scope="session")
def add_run():
    """`add_run(registry, stage, parents={role: ref}, publish=True, ...)` → the `Run` as stored.

    Published runs get a small fake model directory (FAKE_MODEL_FILES) with its manifest.
    """

    def add(registry: Registry, stage: str = "pretrain", parents: dict[str, str] | None = None, *,
            publish: bool = True, config: dict | None = None, config_hash: str = "hash",
            data_fingerprint: str = "") -> Run:
        resolved: dict[str, Resolved] = {
            role: registry.resolve(ref) for role, ref in (parents or {}).items()}
        run = registry.create_run(stage, config or {"stage": stage}, config_hash,
                                  parents=resolved, data_fingerprint=data_fingerprint)
        if publish:
            registry.publish(run.id, write_fake_model)
        return registry.get(run.id)

    return add


@pytest.fixture
def make_run(registry: Registry, add_run):
    """`add_run` bound to the test's `registry`."""
    return functools.partial(add_run, registry)


def write_fake_model(directory: Path) -> None:
    for name, content in FAKE_MODEL_FILES.items():
        (directory / name).write_bytes(content)


@pytest.fixture(scope="session")
def run_cli():
    """`run_cli(args, home)` → (returncode, stdout, stderr) of the real `rlhf` in a subprocess."""

    def run(args: list[str], home: Path, timeout: float = 120) -> tuple[int, str, str]:
        env = {**os.environ, "RLHF_HOME": str(home), "RLHF_NO_PROGRESS": "1",
               "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "pipeline.commands.cli", *args], cwd=REPO_ROOT,
                              env=env, capture_output=True, text=True, timeout=timeout)
        return done.returncode, done.stdout, done.stderr

    return run


@pytest.fixture(scope="session")
def flip_byte():
    """`flip_byte(path, offset=0)` inverts the bits of one byte, keeping the file's length."""

    def flip(path: Path, offset: int = 0) -> None:
        data = bytearray(path.read_bytes())
        data[offset] ^= 0xFF
        path.write_bytes(bytes(data))

    return flip
