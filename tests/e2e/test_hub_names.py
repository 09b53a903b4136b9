"""End to end: hub model names as users write them, from a local hub cache with no network.

`HF_HUB_OFFLINE=1` and `HF_HUB_CACHE` pointing at a cache laid out as huggingface_hub lays it out
(`models--NAME/refs/REVISION`, `snapshots/COMMIT/`) stand in for the hub: a bare name such as
`gpt2` and a revision (`gpt2@v1`) reach transformers' `from_pretrained` as the name and
`revision=`, and a name the cache lacks is refused before anything is registered.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, cli_env, rlhf_command, run_json
from pipeline.registry import Registry

pytestmark = pytest.mark.e2e

CONVERSATIONS = Path(__file__).resolve().parents[1] / "fixtures" / "sft" / "conversations.jsonl"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def offline_rlhf(home: Path, cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(cli_env(), HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache))
    return subprocess.run(rlhf_command(home, *args), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)


def hub_cache(cache: Path, name: str, revision: str, model_dir: Path) -> Path:
    """A hub cache holding `model_dir` as `name` at `revision` only (no `main`)."""
    repo = cache / f"models--{name.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / COMMIT,
                    ignore=shutil.ignore_patterns("manifest.json"))
    (repo / "refs").mkdir()
    (repo / "refs" / revision).write_text(COMMIT)
    return cache


def test_a_bare_hub_name_at_a_revision_trains_and_is_recorded(mechanics_home, tmp_path):
    pretrained = Registry(mechanics_home).lookup("pretrain:latest").model_path
    cache = hub_cache(tmp_path / "hub", "gpt2", "v1", Path(pretrained))
    home = tmp_path / "home"

    result = offline_rlhf(home, cache, "run", "sft", "--config", "configs/tiny/sft.yaml",
                          "model.source=gpt2@v1", f"data.train_files=[{CONVERSATIONS}]",
                          "eval.n_prompts=0", "data.max_length=64", "train.max_steps=2",
                          "train.batch_size=2")
    assert result.returncode == 0, result.stderr
    run = Registry(home).get(run_json(result)["run"])
    assert run.parents == {"model": "gpt2@v1"} and run.status == "completed"

    # The cache has no `main`: without the revision the name is refused, and nothing is written.
    refused = offline_rlhf(tmp_path / "empty", cache, "generate", "gpt2", "--prompt", "hi")
    assert refused.returncode == 2
    assert ("'gpt2' is not a run id, alias, STAGE:latest or directory, nor a hub model (not in "
            "the local hub cache, and HF_HUB_OFFLINE is set)") in refused.stderr
    assert not (tmp_path / "empty").exists()
    answer = offline_rlhf(tmp_path / "empty", cache, "generate", "gpt2@v1", "--prompt", "hi",
                          "--max-new-tokens", "3", "--json")
    assert answer.returncode == 0 and json.loads(answer.stdout.splitlines()[-1])
