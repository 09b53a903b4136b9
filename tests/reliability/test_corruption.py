"""A damaged checkpoint is found and never used: `rlhf registry verify` names every damaged file,
a stage asked to start from one refuses (exit 2, one line naming the file, nothing registered),
and a resume whose newest state is damaged falls back to the newest intact one, says so, and
still ends with the weights of an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from faults import file_digests, registry_problems, result_problems, rlhf

pytestmark = pytest.mark.reliability

WEIGHTS = "model.safetensors"


def truncate(directory: Path) -> str:
    path = directory / WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return f"{path} does not match its sha256"


def flip_byte(directory: Path) -> str:
    path = directory / WEIGHTS
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return f"{path} does not match its sha256"


def delete_manifest(directory: Path) -> str:
    (directory / "manifest.json").unlink()
    return f"{directory / 'manifest.json'} is missing"


def pickle_for_safetensors(directory: Path) -> str:
    torch.save({"model.embed_tokens.weight": torch.zeros(4, 4)}, directory / WEIGHTS)
    return f"{directory / WEIGHTS} does not match its sha256"


CORRUPTIONS = [truncate, flip_byte, delete_manifest, pickle_for_safetensors]


@pytest.mark.parametrize("corrupt", CORRUPTIONS, ids=lambda corrupt: corrupt.__name__)
def test_verify_and_loading_name_the_damaged_file(corrupt, chain, pretrain_home, in_process_cli):
    run_id = chain.reference("pretrain").run_id
    expected = corrupt(pretrain_home / "runs" / run_id / "model")
    before = file_digests(pretrain_home)

    verify = in_process_cli(["--home", str(pretrain_home), "registry", "verify"])
    assert verify.code == 1
    assert expected in verify.output

    load = in_process_cli(["--home", str(pretrain_home), "run", "sft", f"model.source={run_id}"])
    assert load.code == 2
    assert len(load.errors) == 1 and expected in load.errors[0], load.errors
    assert file_digests(pretrain_home) == before, "refusing to load registered or changed something"


def test_a_damaged_state_is_refused_as_a_model_source(chain, pretrain_home, in_process_cli):
    run_id = chain.reference("pretrain").run_id
    expected = flip_byte(pretrain_home / "runs" / run_id / "state" / "step-4" / "model")

    load = in_process_cli(["--home", str(pretrain_home), "run", "sft", f"model.source={run_id}@4"])

    assert load.code == 2
    assert len(load.errors) == 1 and expected in load.errors[0], load.errors


@pytest.mark.e2e
def test_resume_falls_back_to_the_newest_intact_state(chain, interrupted_home):
    reference = chain.reference("pretrain")
    (run_dir,) = interrupted_home.glob("runs/pretrain-*")
    damaged = flip_byte(run_dir / "state" / "step-4" / "model")

    rerun = rlhf(interrupted_home, *reference.args)

    assert rerun.returncode == 0, rerun.stderr
    fallback = [line for line in rerun.stderr.splitlines() if "not intact" in line]
    assert len(fallback) == 1
    assert f"state step-4 of {run_dir.name} is not intact" in fallback[0]
    assert damaged in fallback[0] and "falling back to an older state" in fallback[0]
    assert f"resuming {run_dir.name} from step 2" in rerun.stderr
    result = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert not registry_problems(interrupted_home)
    assert not result_problems(reference, interrupted_home, result)
