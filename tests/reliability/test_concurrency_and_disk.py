"""Two pipelines writing one registry at once lose nothing, and one interrupted run is resumed by
one process at a time. A full or read-only disk during a checkpoint commit gives a one-line error
naming the checkpoint and leaves the previous state intact; the same command run again resumes
from it to the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from faults import (ROOT, cli_env, e2e, pipeline_overrides, registry_problems, result_problems,
                    rlhf)
from pipeline.errors import UserError
from pipeline.registry import Registry
from stages import STAGES

pytestmark = [pytest.mark.reliability, pytest.mark.e2e]


def test_two_pipelines_writing_one_registry_at_once_lose_nothing(chain, tmp_path):
    home = tmp_path / "home"
    command = ["pipeline", "run", "configs/tiny/pipeline.yaml", *pipeline_overrides(chain.data)]
    processes = [subprocess.Popen(e2e.rlhf_command(home, *command, f"seed={seed}"), cwd=ROOT,
                                  env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for seed in (1, 2)]
    errors = [process.communicate(timeout=900)[1] for process in processes]

    assert [process.returncode for process in processes] == [0, 0], errors
    registry = Registry(home, create=False)
    try:
        pipelines = registry.runs("pipeline")
        assert len(pipelines) == 2
        for pipeline in pipelines:
            stage_runs = registry.runs(pipeline_id=pipeline.id)
            assert sorted(run.stage for run in stage_runs) == sorted(STAGES)
            assert all(run.status == "completed" for run in [pipeline, *stage_runs])
            pretrain = next(run for run in stage_runs if run.stage == "pretrain")
            assert [step for step, _ in registry.metrics(pretrain.id)["loss"]] == [1, 2, 3, 4, 5, 6]
        assert len(registry.runs()) == 2 + 2 * len(STAGES)
    finally:
        registry.close()
    assert not registry_problems(home)


def test_an_interrupted_run_is_resumed_by_one_process_at_a_time(tmp_path):
    """Two processes that found the same interrupted run at once: the second claim is refused."""
    registry = Registry(tmp_path / "home")
    run = registry.create_run("pretrain", {}, "hash", parents={})
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with sqlite3.connect(tmp_path / "home" / "registry.db") as db:  # its claim, as it left it
            db.execute("UPDATE runs SET pid = ? WHERE id = ?", (other.pid, run.id))
        db.close()
        with pytest.raises(UserError, match=f"already running in process {other.pid}"):
            registry.claim(run.id)
    finally:
        other.kill()
        other.wait()
    registry.claim(run.id)  # the other process is gone: the run is this one's to resume
    assert registry.get(run.id).pid == os.getpid()
    registry.close()


def test_disk_errors_in_commits_keep_the_previous_state_and_the_run_resumes(chain, tmp_path):
    """A full disk while a resume state is written, then a read-only one while the model is
    published: each attempt stops with one line naming the checkpoint, leaves the states before
    it intact, and the next attempt resumes from them."""
    reference = chain.reference("pretrain")
    home = tmp_path / "home"
    attempts = [("ENOSPC", "step-4", "No space left on device", "the start"),
                ("EROFS", "model", "Read-only file system", "step 2")]
    for error, checkpoint, message, resumed_from in attempts:
        injected = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("inject_oserror.py")), error,
             checkpoint, "--home", str(home), *reference.args],
            cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=900)

        assert injected.returncode == 2, injected.stderr
        assert "Traceback" not in injected.stderr
        (run_dir,) = home.glob("runs/pretrain-*")
        if resumed_from != "the start":
            assert f"resuming {run_dir.name} from {resumed_from}" in injected.stderr
        errors = [line for line in injected.stderr.splitlines() if line.startswith("error:")]
        assert errors == [injected.stderr.strip().splitlines()[-1]]
        target = run_dir / ("state/" if checkpoint.startswith("step-") else "") / checkpoint
        assert f"cannot write {target}: {message}" in errors[0]
        assert rlhf(home, "registry", "verify").returncode == 0  # the earlier states are intact
        assert not list(run_dir.rglob(".tmp-*"))

    rerun = rlhf(home, *reference.args)

    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming {run_dir.name} from step 4" in rerun.stderr
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert not registry_problems(home) + result_problems(reference, home, result)
