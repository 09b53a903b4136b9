"""Tests for pipeline.registry: runs, references, lineage, verification, removal, crash safety,
names that could escape the home, and two processes writing one registry at once."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.registry import (MANIFEST, Registry, Resolved, check_name, commit_directory,
                               require_intact, directory_problems)

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_FILES = {"model.safetensors": b"weights", "config.json": b'{"model_type": "llama"}'}


def write_model(directory: Path) -> None:
    for name, content in MODEL_FILES.items():
        (directory / name).write_bytes(content)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def commit_state(registry: Registry, run_id: str, step: int) -> Path:
    """A fake resume state `runs/RUN/state/step-N/` holding a `model/` directory."""
    def write(tmp: Path) -> None:
        (tmp / "model").mkdir()
        write_model(tmp / "model")
        (tmp / "optimizer.safetensors").write_bytes(b"optimizer")
    state = registry.run_dir(run_id) / "state" / f"step-{step}"
    commit_directory(state, write)
    return state


def run_in_subprocess(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)


# --- a run's life ------------------------------------------------------------------------------


def test_round_trip_create_log_publish_get_resolve(registry, home):
    run = registry.create_run("pretrain", {"train": {"lr": 0.1}}, "abc123", parents={},
                              data_fingerprint="data-fp", versions={"torch": "2.13"})
    assert run.status == "running" and run.model_path is None and run.id.startswith("pretrain-")
    registry.log_metrics(run.id, 1, {"loss": 2.5, "lr": 0.1})
    registry.log_metrics(run.id, 2, {"loss": 2.0})

    final = registry.publish(run.id, write_model, summary={"eval_loss": 1.5})

    assert final == home / "runs" / run.id / "model"
    expected_files = {"config.json": sha256(b'{"model_type": "llama"}'),
                      "model.safetensors": sha256(b"weights")}
    manifest = json.loads((final / MANIFEST).read_text())
    assert manifest["files"] == expected_files
    reopened = Registry(home)  # everything is on disk, not only in this connection
    stored = reopened.get(run.id)
    assert stored.status == "completed"
    assert stored.model_path == str(final.resolve())
    assert stored.files == expected_files
    assert stored.config == {"train": {"lr": 0.1}} and stored.config_hash == "abc123"
    assert stored.data_fingerprint == "data-fp" and stored.versions == {"torch": "2.13"}
    assert stored.summary == {"eval_loss": 1.5}
    assert reopened.metrics(run.id) == {"loss": [(1, 2.5), (2, 2.0)], "lr": [(1, 0.1)]}
    resolved = reopened.resolve(run.id)
    assert (resolved.path, resolved.run.id, resolved.step) == (str(final.resolve()), run.id, None)
    assert resolved.is_local
    reopened.close()


def test_truncate_metrics_drops_steps_after_a_resume_point(registry, make_run):
    run = make_run(publish=False)
    for step in (1, 2, 3):
        registry.log_metrics(run.id, step, {"loss": float(step)})
    registry.truncate_metrics(run.id, after_step=1)
    assert registry.metrics(run.id) == {"loss": [(1, 1.0)]}


def test_summary_updates_merge(registry, make_run):
    run = make_run(publish=False)
    registry.update_summary(run.id, {"a": 1})
    registry.update_summary(run.id, {"b": 2})
    registry.set_status(run.id, "failed")
    stored = registry.get(run.id)
    assert stored.summary == {"a": 1, "b": 2} and stored.status == "failed"


def test_run_whose_process_is_gone_reads_as_interrupted(registry, home):
    done = run_in_subprocess(
        "import sys\nfrom pipeline.registry import Registry\n"
        "print(Registry(sys.argv[1]).create_run('sft', {}, 'h', parents={}).id)", str(home))
    assert done.returncode == 0, done.stderr
    run_id = done.stdout.strip()
    assert registry.get(run_id).status == "interrupted"
    assert registry.create_run("sft", {}, "h", parents={}).status == "running"  # ours is alive


# --- references ----------------------------------------------------------------------------------


def test_stage_latest_is_the_newest_completed_run(registry, make_run):
    make_run("pretrain")
    second = make_run("pretrain")
    make_run("pretrain", publish=False)  # newer, but still running
    make_run("sft")
    assert registry.resolve("pretrain:latest").run.id == second.id
    with pytest.raises(UserError, match="no completed reward run"):
        registry.resolve("reward:latest")


def test_run_without_a_published_model_is_refused(registry, make_run):
    run = make_run(publish=False)
    with pytest.raises(UserError, match=f"run {run.id} has no published model .status running."):
        registry.resolve(run.id)


def test_alias_resolves_and_can_be_moved(registry, make_run):
    first, second = make_run(), make_run()
    registry.set_alias("best", first.id)
    assert registry.resolve("best").run.id == first.id
    registry.set_alias("best", second.id)
    assert registry.resolve("best").run.id == second.id
    with pytest.raises(UserError, match="no run 'missing' to alias"):
        registry.set_alias("other", "missing")


def test_run_at_step_resolves_a_committed_state_of_an_unfinished_run(registry, make_run):
    run = make_run(publish=False)
    state = commit_state(registry, run.id, 5)
    registry.set_alias("wip", run.id)
    for ref in (f"{run.id}@5", "wip@5"):
        resolved = registry.resolve(ref)
        assert resolved.path == str((state / "model").resolve())
        assert (resolved.run.id, resolved.step) == (run.id, 5)
    with pytest.raises(UserError, match=r"no committed state at step 7; states: \[5\]"):
        registry.resolve(f"{run.id}@7")


def test_run_at_step_ignores_an_uncommitted_state(registry, make_run):
    run = make_run()
    (registry.run_dir(run.id) / "state" / "step-3" / "model").mkdir(parents=True)  # no manifest
    with pytest.raises(UserError, match="no committed state at step 3"):
        registry.resolve(f"{run.id}@3")


def test_step_suffix_on_a_stage_without_runs(registry):
    with pytest.raises(UserError, match="'sft:latest@5': no completed sft run in the registry"):
        registry.resolve("sft:latest@5")


@pytest.mark.parametrize("ref, name, revision", [
    ("gpt2", "gpt2", None),
    ("org/model", "org/model", None),
    ("gpt2@v1.0", "gpt2", "v1.0"),
    ("org/model@refs/pr/3", "org/model", "refs/pr/3"),
    ("nope@5", "nope", "5"),  # not a run: a hub model's revision
])
def test_hub_names_as_users_write_them(registry, ref, name, revision):
    hub = registry.resolve(ref)
    assert (hub.path, hub.revision, hub.run, hub.reference) == (name, revision, None, ref)


def test_plain_directory_and_hub_name(registry, tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    local = registry.resolve(str(model_dir))
    assert (local.path, local.run, local.is_local) == (str(model_dir.resolve()), None, True)
    hub = registry.resolve("org/model")
    assert (hub.path, hub.run, hub.is_local) == ("org/model", None, False)


@pytest.mark.parametrize("ref, message", [
    ("no pe", "reference 'no pe' is not a run id"),
    ("-nope", "reference '-nope' is not a run id"),
    ("", "empty or invalid reference"),
    ("bad\x00ref", "empty or invalid reference"),
])
def test_bad_reference_is_a_user_error(registry, ref, message):
    with pytest.raises(UserError, match=message):
        registry.resolve(ref)


def test_a_file_is_not_a_model_reference(registry, tmp_path):
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        registry.resolve(str(file))


def test_get_of_a_missing_run(registry):
    with pytest.raises(UserError, match="no run 'pretrain-x' in the registry"):
        registry.get("pretrain-x")


# --- lineage and removal -------------------------------------------------------------------------


def test_lineage_of_three_chained_runs(registry, make_run, tmp_path):
    data_dir = tmp_path / "base-model"
    data_dir.mkdir()
    pretrain = make_run("pretrain", {"model": str(data_dir)})
    sft = make_run("sft", {"model": pretrain.id})
    reward = make_run("reward", {"model": "sft:latest"})
    assert registry.lineage(reward.id) == {
        "id": reward.id, "stage": "reward", "status": "completed", "parents": {
            "model": {"id": sft.id, "stage": "sft", "status": "completed", "parents": {
                "model": {"id": pretrain.id, "stage": "pretrain", "status": "completed",
                          "parents": {"model": {"path": str(data_dir.resolve())}}}}}}}
    assert registry.get(reward.id).parents == {"model": sft.id}  # the ref is pinned to the run


def test_remove_refuses_while_a_child_depends_on_it(registry, make_run):
    parent = make_run("pretrain")
    child = make_run("sft", {"model": parent.id})
    with pytest.raises(UserError, match=f"run {parent.id} is a parent of {child.id}"):
        registry.remove(parent.id)
    assert registry.get(parent.id).status == "completed"
    assert registry.run_dir(parent.id).is_dir()

    registry.set_alias("old", parent.id)
    registry.remove(parent.id, force=True)
    with pytest.raises(UserError):
        registry.get(parent.id)
    assert not registry.run_dir(parent.id).exists()
    assert registry.lookup("old") is None  # the alias went with the run
    # The child keeps what it was built from, now as a plain reference.
    assert registry.lineage(child.id)["parents"] == {"model": {"path": parent.id}}
    registry.remove(child.id)
    assert registry.runs() == []


# --- find_matching -------------------------------------------------------------------------------


def test_find_matching_needs_same_config_data_and_parents(registry, make_run):
    parent = make_run("pretrain")
    other_parent = make_run("pretrain")
    parents = {"model": registry.resolve(parent.id)}
    older = make_run("sft", {"model": parent.id}, config_hash="h1", data_fingerprint="d1")
    newer = make_run("sft", {"model": parent.id}, config_hash="h1", data_fingerprint="d1")
    make_run("sft", {"model": parent.id}, config_hash="h1", data_fingerprint="d1",
             publish=False)  # still running in this process: never reused

    assert registry.find_matching("sft", "h1", "d1", parents).id == newer.id
    registry.set_status(newer.id, "failed")  # failed runs are resumed too
    assert registry.find_matching("sft", "h1", "d1", parents).id == newer.id
    assert older.id != newer.id
    assert registry.find_matching("sft", "h2", "d1", parents) is None
    assert registry.find_matching("sft", "h1", "d2", parents) is None
    assert registry.find_matching("reward", "h1", "d1", parents) is None
    assert registry.find_matching(
        "sft", "h1", "d1", {"model": registry.resolve(other_parent.id)}) is None
    assert registry.find_matching("sft", "h1", "d1", {}) is None


def test_find_matching_by_path_parent(registry, make_run, tmp_path):
    (tmp_path / "m").mkdir()
    run = make_run("pretrain", {"model": str(tmp_path / "m")}, config_hash="h")
    parents = {"model": Resolved(str((tmp_path / "m").resolve()))}
    assert registry.find_matching("pretrain", "h", "", parents).id == run.id


# --- verification --------------------------------------------------------------------------------


DAMAGES = {  # kind → (file damaged, what the problem says)
    "flipped byte": ("model.safetensors", "does not match its sha256"),
    "truncated": ("tokenizer.json", "does not match its sha256"),
    "deleted file": ("config.json", "is missing"),
    "deleted manifest": (MANIFEST, "is missing"),
    "pickle for safetensors": ("model.safetensors", "does not match its sha256"),
}


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_verify_names_the_damaged_file(registry, make_run, flip_byte, kind):
    name, expected = DAMAGES[kind]
    damage = {
        "flipped byte": flip_byte,
        "truncated": lambda path: path.write_bytes(path.read_bytes()[:3]),
        "deleted file": Path.unlink,
        "deleted manifest": Path.unlink,
        "pickle for safetensors": lambda path: path.write_bytes(pickle.dumps({"w": [1.0, 2.0]})),
    }[kind]
    run, intact = make_run(), make_run()
    model_dir = Path(run.model_path)
    assert registry.verify() == []
    damage(model_dir / name)

    problems = registry.verify()
    assert len(problems) == 1
    assert problems[0].startswith(f"{run.id}: {model_dir / name} ")
    assert expected in problems[0]
    assert registry.verify(intact.id) == []
    with pytest.raises(UserError, match=f"failed verification: {model_dir / name} "):
        require_intact(model_dir)


def test_verify_checks_resume_states(registry, make_run, flip_byte):
    run = make_run(publish=False)
    state = commit_state(registry, run.id, 5)
    assert registry.verify(run.id) == []
    flip_byte(state / "model" / "config.json")
    problems = registry.verify(run.id)
    assert len(problems) == 1 and str(state / "model" / "config.json") in problems[0]


def test_verify_directory_of_a_missing_directory(tmp_path):
    assert directory_problems(tmp_path / "gone") == [f"{tmp_path / 'gone'} is missing"]


def test_verify_directory_with_a_garbled_manifest(tmp_path):
    (tmp_path / MANIFEST).write_text("{not json")
    assert directory_problems(tmp_path) == [f"{tmp_path / MANIFEST} is not a valid manifest"]


# --- committed directories -----------------------------------------------------------------------


def test_commit_directory_writes_manifest_of_every_file(tmp_path):
    final = tmp_path / "out" / "ckpt"

    def write(tmp: Path) -> None:
        (tmp / "sub").mkdir()
        (tmp / "a.txt").write_bytes(b"a")
        (tmp / "sub" / "b.txt").write_bytes(b"b")

    files = commit_directory(final, write)
    assert files == {"a.txt": sha256(b"a"), "sub/b.txt": sha256(b"b")}
    assert json.loads((final / MANIFEST).read_text())["files"] == files
    assert sorted(p.name for p in final.parent.iterdir()) == ["ckpt"]  # no temp sibling left
    assert directory_problems(final) == []


def test_crash_inside_write_files_leaves_nothing(tmp_path):
    final = tmp_path / "out" / "ckpt"

    def write_then_crash(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"half")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        commit_directory(final, write_then_crash)
    assert list(final.parent.iterdir()) == []


def test_committed_directory_is_never_overwritten(tmp_path):
    final = tmp_path / "ckpt"
    commit_directory(final, lambda tmp: (tmp / "w.bin").write_bytes(b"first"))
    with pytest.raises(UserError, match="already committed; refusing to overwrite"):
        commit_directory(final, lambda tmp: (tmp / "w.bin").write_bytes(b"second"))
    assert (final / "w.bin").read_bytes() == b"first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    assert directory_problems(final) == []


def test_uncommitted_directory_is_replaced(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "stale.bin").write_bytes(b"left by a crash before the manifest")
    commit_directory(final, lambda tmp: (tmp / "w.bin").write_bytes(b"new"))
    assert sorted(p.name for p in final.iterdir()) == [MANIFEST, "w.bin"]


# --- names and the registry home -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "nul\x00byte", "", ".hidden", "..",
                                  "x" * 65])
def test_names_cannot_escape_the_home(registry, make_run, name):
    with pytest.raises(UserError, match="invalid"):
        check_name(name, "alias")
    with pytest.raises(UserError, match="invalid alias"):
        registry.set_alias(name, make_run().id)
    with pytest.raises(UserError, match="invalid run id"):
        registry.run_dir(name)


def test_valid_names_pass():
    for name in ("best", "sft-v2.1", "A_b", "x" * 64):
        assert check_name(name, "alias") == name


def test_home_under_a_regular_file_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(UserError, match="registry home .* is not writable"):
        Registry(blocker / "sub")


def test_opening_a_missing_registry_without_creating_it(tmp_path):
    with pytest.raises(UserError, match="no registry at"):
        Registry(tmp_path / "none", create=False)
    assert not (tmp_path / "none").exists()


# --- two processes at once -----------------------------------------------------------------------

WRITER = """
import sys
from pipeline.registry import Registry
registry = Registry(sys.argv[1])
for i in range(50):
    run = registry.create_run(sys.argv[2], {"i": i}, "hash", parents={})
    registry.log_metrics(run.id, i, {"loss": float(i), "step_seen": float(i)})
"""


def test_two_processes_write_one_registry(home):
    # Started together, both also race to create the new registry (its WAL switch included).
    writers = {stage: subprocess.Popen([sys.executable, "-c", WRITER, str(home), stage],
                                       cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
               for stage in ("pretrain", "sft")}
    for stage, writer in writers.items():
        _, stderr = writer.communicate(timeout=120)
        assert writer.returncode == 0, f"{stage} writer failed: {stderr}"

    registry = Registry(home)
    runs = registry.runs()
    assert len(runs) == 100 and len({run.id for run in runs}) == 100
    for stage in writers:
        indices = sorted(run.config["i"] for run in runs if run.stage == stage)
        assert indices == list(range(50))
    for run in runs:
        i = float(run.config["i"])
        assert registry.metrics(run.id) == {"loss": [(int(i), i)], "step_seen": [(int(i), i)]}
    registry.close()


# --- a home that moves -------------------------------------------------------------------------


def write_adapter(base: str):
    """A `write_files` for a LoRA adapter directory that names `base` as its base model."""
    def write(directory: Path) -> None:
        (directory / "adapter_config.json").write_text(json.dumps(
            {"base_model_name_or_path": base, "peft_type": "LORA"}))
        (directory / "adapter_model.safetensors").write_bytes(b"adapter")
    return write


def stored_model_paths(home: Path) -> list[str]:
    import sqlite3
    with sqlite3.connect(home / "registry.db") as db:
        return [row[0] for row in db.execute("SELECT model_path FROM runs ORDER BY created_at")]


def published_pair(registry: Registry, outside: Path) -> tuple:
    """A published base model and a LoRA adapter on it, plus one on a model outside the home."""
    base = registry.create_run("pretrain", {}, "h1", parents={})
    registry.publish(base.id, write_model)
    base = registry.get(base.id)
    adapter = registry.create_run("sft", {}, "h2", parents={"model": registry.resolve(base.id)})
    registry.publish(adapter.id, write_adapter(base.model_path))
    foreign = registry.create_run("sft", {}, "h3", parents={"model": registry.resolve(str(outside))})
    registry.publish(foreign.id, write_adapter(str(outside)))
    return base, registry.get(adapter.id), registry.get(foreign.id)


def test_a_moved_home_resolves_every_reference_and_verifies(tmp_path):
    from pipeline.registry import adapter_base
    home, outside = tmp_path / "home", tmp_path / "user-model"
    outside.mkdir()
    registry = Registry(home)
    base, adapter, foreign = published_pair(registry, outside)
    registry.set_alias("best", adapter.id)
    commit_state(registry, adapter.id, 2)
    registry.close()
    assert stored_model_paths(home) == [f"runs/{run.id}/model" for run in (base, adapter, foreign)]
    config = json.loads((Path(adapter.model_path) / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == f"../../{base.id}/model"  # from the adapter's dir

    moved = tmp_path / "elsewhere" / "moved-home"
    moved.parent.mkdir()
    home.rename(moved)
    registry = Registry(moved)
    assert registry.verify() == []
    assert registry.resolve("best").path == str(moved / "runs" / adapter.id / "model")
    assert registry.resolve(f"{adapter.id}@2").path == \
        str(moved / "runs" / adapter.id / "state" / "step-2" / "model")
    assert adapter_base(Path(registry.resolve("sft:latest").path)) == str(outside)  # outside: as is
    assert adapter_base(Path(registry.resolve(adapter.id).path)) == \
        str(moved / "runs" / base.id / "model")
    registry.close()


def test_a_directory_inside_the_home_resolves_to_its_run(registry, home):
    run = registry.create_run("pretrain", {}, "h1", parents={})
    registry.publish(run.id, write_model)
    commit_state(registry, run.id, 3)

    published = registry.resolve(str(home / "runs" / run.id / "model"))
    state = registry.resolve(str(home / "runs" / run.id / "state" / "step-3" / "model"))

    assert (published.run.id, published.step) == (run.id, None)
    assert (state.run.id, state.step) == (run.id, 3)
    child = registry.create_run("sft", {}, "h2", parents={"model": state})
    assert registry.get(child.id).parents == {"model": f"{run.id}@3"}  # a run, not a path
    assert registry.resolve(str(home / "runs")).run is None  # not a model of a run: a directory


def test_an_old_home_with_absolute_paths_is_upgraded_once_with_a_message(tmp_path, capsys):
    """A home written when the database stored absolute paths, and moved since: opening it
    rewrites them relative to the home: 3 model paths and 1 adapter's base (with its manifest)."""
    import sqlite3
    old, outside = tmp_path / "old-home", tmp_path / "user-model"
    outside.mkdir()
    registry = Registry(old)
    base, adapter, foreign = published_pair(registry, outside)
    registry.close()
    adapter_file = old / "runs" / adapter.id / "model" / "adapter_config.json"
    adapter_file.write_text(json.dumps({"base_model_name_or_path": base.model_path}))
    manifest = json.loads((adapter_file.parent / MANIFEST).read_text())
    manifest["files"]["adapter_config.json"] = sha256(adapter_file.read_bytes())
    (adapter_file.parent / MANIFEST).write_text(json.dumps(manifest))
    with sqlite3.connect(old / "registry.db") as db:  # as the registry wrote it before
        db.execute("UPDATE runs SET model_path = ? || '/' || model_path", (str(old.resolve()),))
        db.execute("PRAGMA user_version = 0")
    db.close()
    moved = old.rename(tmp_path / "moved")
    capsys.readouterr()

    registry = Registry(moved)
    assert "4 stored path(s) made relative to the home" in capsys.readouterr().err
    assert registry.verify() == []
    assert registry.resolve(adapter.id).path == str(moved / "runs" / adapter.id / "model")
    assert json.loads((moved / "runs" / adapter.id / "model" / "adapter_config.json").read_text()) \
        == {"base_model_name_or_path": f"../../{base.id}/model"}
    assert registry.get(adapter.id).files == \
        json.loads((moved / "runs" / adapter.id / "model" / MANIFEST).read_text())["files"]
    registry.close()
    Registry(moved).close()
    assert capsys.readouterr().err == ""  # once
    assert stored_model_paths(moved)[0] == f"runs/{base.id}/model"
