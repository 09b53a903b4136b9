"""Several processes: each stage under `torchrun --nproc_per_node 2` (CPU, gloo) matches the
one-process run with the same global batch, writes the registry only from the main process, and
publishes one checkpoint."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, cli_env, rlhf, run_json

pytestmark = pytest.mark.e2e


def torchrun(home: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_port", "29517", "-m", "pipeline.cli", "--home", str(home), *args]
    env = dict(cli_env(), OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(home: Path) -> list[float]:
    with sqlite3.connect(home / "registry.db") as db:
        return [v for (v,) in db.execute("SELECT value FROM metrics WHERE name = 'loss' ORDER BY step")]


def test_pretrain_two_processes_match_one(tmp_path, corpus_file):
    common = ("run", "pretrain", "--config", "configs/tiny/pretrain.yaml",
              f"data.sources=[{corpus_file}]", "train.max_steps=5", "checkpoint.every_steps=2",
              "tokenizer.vocab_size=400")
    torchrun(tmp_path / "two", *common, "train.batch_size=4")
    run_json(rlhf(tmp_path / "one", *common, "train.batch_size=8"))

    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5, abs=1e-6)
    with sqlite3.connect(tmp_path / "two" / "registry.db") as db:
        runs = db.execute("SELECT id, status FROM runs").fetchall()
        steps = [s for (s,) in db.execute("SELECT step FROM metrics WHERE name = 'loss'")]
    assert len(runs) == 1 and runs[0][1] == "completed"
    assert steps == sorted(set(steps)), "a metric was logged by more than one process"
    assert len(list((tmp_path / "two" / "runs").glob("*/model/manifest.json"))) == 1
