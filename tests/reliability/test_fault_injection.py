"""Crash anywhere, lose nothing: SIGKILL each stage's real process inside a checkpoint commit, rerun
the same command, and require what an uninterrupted run gives — the same weights bit for bit, the
same per-step metrics (losses, the CRC of the examples each step saw, PPO's rollout statistics), a
registry that verifies, and no debris. `benchmarks/soak.py` runs many seeded random kills per stage.
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3

import pytest

from faults import (STAGES, KillPoint, kill_trial, registry_problems,
                    result_problems, rlhf, run_and_kill)
from pipeline.config import CheckpointConfig, StageConfig
from pipeline.registry import Registry, commit_directory, list_states

pytestmark = pytest.mark.reliability


@pytest.mark.e2e
@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_while_writing_a_checkpoint_then_rerun_matches_uninterrupted(stage, chain, tmp_path):
    reference = chain.reference(stage)
    # Which resume state (of the two the tiny run commits) is being written when the kill lands.
    point = KillPoint("write", nth=random.Random(f"kill-{stage}").randrange(2))

    outcome = kill_trial(reference, tmp_path / "home", random.Random(0), points=[point])

    assert not outcome.problems
    assert outcome.kills == [point], "the run finished before the kill point"


@pytest.mark.e2e
def test_killed_after_committing_its_model_before_registering_it(chain, tmp_path):
    """The window between the published model's manifest and the registry's record of it."""
    reference = chain.reference("pretrain")
    home = shutil.copytree(reference.home, tmp_path / "home")
    with sqlite3.connect(home / "registry.db") as db:  # as the killed process left it
        db.execute("UPDATE runs SET status = 'running', model_path = NULL, files_json = NULL, "
                   "pid = NULL WHERE id = ?", (reference.run_id,))
    db.close()

    rerun = rlhf(home, *reference.args)

    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming {reference.run_id} from step 4" in rerun.stderr
    result = {"run": reference.run_id, "status": "completed",
              "model_path": str(home / "runs" / reference.run_id / "model")}
    assert not registry_problems(home) + result_problems(reference, home, result)


@pytest.mark.e2e
def test_ppo_resumes_when_a_kill_cut_its_samples_file_short(chain, tmp_path):
    reference = chain.reference("ppo")
    home = tmp_path / "home"
    assert run_and_kill(home, reference.args, KillPoint("state", step=4))
    (samples,) = home.glob("runs/*/samples.jsonl")
    with open(samples, "a", encoding="utf-8") as handle:  # killed halfway through a line
        handle.write('{"step": 6, "prompt": "How many legs do 3 co')

    rerun = rlhf(home, *reference.args)

    assert rerun.returncode == 0, rerun.stderr[-2000:]
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert not registry_problems(home) + result_problems(reference, home, result)


def test_a_kill_while_pruning_old_states_leaves_no_partial_state(tmp_path, monkeypatch):
    """Old states are deleted after a new one commits; dying halfway must leave no step-N
    directory that is neither complete nor absent, and resuming clears what is left."""
    import pipeline.runtime as runtime

    registry = Registry(tmp_path / "home")
    run = registry.create_run("pretrain", {}, "hash", parents={})
    for step in (1, 2, 3):
        commit_directory(registry.run_dir(run.id) / "state" / f"step-{step}", write_state_files)
    config = StageConfig(checkpoint=CheckpointConfig(keep_last=2))
    stage_run = runtime.StageRun(registry, run, None, config, resume=None, reused=False)

    def killed_halfway(path, **kwargs):
        next(p for p in sorted(path.iterdir()) if p.name != "manifest.json").unlink()
        raise KeyboardInterrupt  # the process dies here

    with monkeypatch.context() as patch:
        patch.setattr(runtime.shutil, "rmtree", killed_halfway)
        with pytest.raises(KeyboardInterrupt):
            stage_run._prune_states()
    registry.set_status(run.id, "interrupted")

    assert [step for step, _ in list_states(registry.run_dir(run.id))] == [3, 2]
    assert registry.verify() == []
    run_id, resume, _ = runtime._decide("pretrain", config, "hash", registry, {}, "", False, None,
                                        processes=1)
    assert (run_id, resume.step) == (run.id, 3)
    assert not list((registry.run_dir(run.id) / "state").glob(".tmp-*"))
    registry.close()


def write_state_files(directory):
    for name in ("model.safetensors", "optimizer-main.pt"):
        (directory / name).write_bytes(name.encode() * 64)
    (directory / "trainer_state.json").write_text('{"step": 0, "extra": {}}')

