"""End to end: what a stage writes to stderr when it goes to a log file (a pipe here, as in
`make demo > log 2>&1`): whole progress lines, never a bar's carriage-return frames; `-q` keeps
only warnings, errors and the result."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, cli_env, rlhf_command, run_json

pytestmark = pytest.mark.e2e


def pretrain_to_a_pipe(home: Path, corpus: Path, *options: str) -> subprocess.CompletedProcess:
    env = cli_env()
    env.pop("RLHF_NO_PROGRESS")  # the bars are what this test watches
    env.pop("RLHF_VERBOSITY", None)
    args = (*options, "run", "pretrain", "--config", "configs/tiny/pretrain.yaml",
            f"data.sources=[{corpus}]", "train.max_steps=20", "train.batch_size=4",
            "tokenizer.vocab_size=400", "data.seq_len=64")
    result = subprocess.run(rlhf_command(home, *args), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return result


def test_progress_in_a_log_is_plain_lines(tmp_path, corpus_file):
    result = pretrain_to_a_pipe(tmp_path / "home", corpus_file)
    assert "\r" not in result.stderr
    progress = [line for line in result.stderr.splitlines() if " steps (" in line]
    assert [line.split(" steps")[0] for line in progress] == \
        [f"pretrain: {step}/20" for step in range(2, 21, 2)]
    assert all("loss=" in line for line in progress)
    assert "pretrain: new run" in result.stderr
    assert run_json(result)["status"] == "completed"


def test_quiet_writes_only_the_result(tmp_path, corpus_file):
    result = pretrain_to_a_pipe(tmp_path / "home", corpus_file, "-q")
    assert result.stderr == ""
    assert run_json(result)["status"] == "completed"
