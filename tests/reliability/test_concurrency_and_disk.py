"""Two pipelines writing one registry at once lose nothing; a full or read-only disk during a
checkpoint commit gives a one-line error naming the checkpoint, leaves the previous state intact,
and the same command run again resumes from it to the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from faults import (ROOT, cli_env, e2e, pipeline_overrides, registry_problems, result_problems,
                    rlhf)
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


@pytest.mark.parametrize("error, checkpoint, message, resumes_from", [
    ("ENOSPC", "step-4", "No space left on device", 2),
    ("EROFS", "model", "Read-only file system", 4),
], ids=["disk-full-writing-a-state", "read-only-publishing-the-model"])
def test_a_disk_error_in_a_commit_keeps_the_previous_state_and_resumes(
        error, checkpoint, message, resumes_from, chain, tmp_path):
    reference = chain.reference("pretrain")
    home = tmp_path / "home"
    injected = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("inject_oserror.py")), error, checkpoint,
         "--home", str(home), *reference.args],
        cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=900)

    assert injected.returncode == 2, injected.stderr
    assert "Traceback" not in injected.stderr
    errors = [line for line in injected.stderr.splitlines() if line.startswith("error:")]
    (run_dir,) = home.glob("runs/pretrain-*")
    assert errors == [injected.stderr.strip().splitlines()[-1]]
    target = run_dir / ("state/" if checkpoint.startswith("step-") else "") / checkpoint
    assert f"cannot write {target}: {message}" in errors[0]
    assert rlhf(home, "registry", "verify").returncode == 0  # the earlier states are intact
    assert not list(run_dir.rglob(".tmp-*"))

    rerun = rlhf(home, *reference.args)

    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming {run_dir.name} from step {resumes_from}" in rerun.stderr
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert not registry_problems(home) + result_problems(reference, home, result)
