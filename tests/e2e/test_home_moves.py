"""End to end: a registry home moved to another directory keeps working.

A home with a pretrain run, a completed LoRA SFT run, an alias and a LoRA SFT run killed after
its first state is moved (`mv`): no file in it names the old place, `registry verify` passes,
every kind of reference loads its model, and the killed run resumes and publishes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import committed_state, kill_when, rlhf, run_json
from pipeline.registry import Registry, adapter_base

pytestmark = pytest.mark.e2e

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sft"
CONVERSATIONS = FIXTURES / "conversations.jsonl"


def lora_sft_args(*overrides: str) -> tuple[str, ...]:
    return ("run", "sft", "--config", "configs/tiny/sft.yaml", f"data.train_files=[{CONVERSATIONS}]",
            "eval.n_prompts=0", "data.max_length=64", "train.batch_size=2", "train.max_steps=4",
            "lora.enabled=true", "lora.r=2", *overrides)


def files_naming(home: Path, text: str) -> list[str]:
    needle = text.encode()
    return [str(path) for path in home.rglob("*") if path.is_file() and needle in path.read_bytes()]


def test_a_moved_home_verifies_resolves_and_resumes(tmp_path):
    home = tmp_path / "home"
    rlhf(home, "run", "pretrain", "--config", "configs/tiny/pretrain.yaml", "train.max_steps=2",
         "train.batch_size=2", "data.seq_len=32", "tokenizer.vocab_size=400",
         "checkpoint.every_steps=100")
    done = run_json(rlhf(home, *lora_sft_args("checkpoint.every_steps=100")))
    rlhf(home, "registry", "alias", "best", done["run"])
    killed_args = lora_sft_args("train.max_steps=6", "checkpoint.every_steps=2")
    kill_when(home, killed_args, committed_state(home, "sft", 2))
    killed = next(run for run in Registry(home).runs("sft") if run.status == "interrupted")

    moved = tmp_path / "elsewhere" / "home"
    moved.parent.mkdir()
    home.rename(moved)

    assert files_naming(moved, str(home.resolve())) == []
    assert rlhf(moved, "registry", "verify").stdout == "all checkpoints intact\n"
    registry = Registry(moved)
    pretrain_model = moved / "runs" / registry.lookup("pretrain:latest").id / "model"
    for ref in ("sft:latest", "best", f"{killed.id}@2"):
        path = Path(registry.resolve(ref).path)
        assert path.is_relative_to(moved) and adapter_base(path) == str(pretrain_model)
        answer = rlhf(moved, "generate", ref, "--prompt", "hi", "--max-new-tokens", "3", "--json")
        assert json.loads(answer.stdout.splitlines()[-1])

    resumed = rlhf(moved, *killed_args)
    assert f"resuming {killed.id} from step 2" in resumed.stderr
    published = Path(run_json(resumed)["model_path"])
    assert published == moved / "runs" / killed.id / "model"
    assert adapter_base(published) == str(pretrain_model)

    exported = tmp_path / "exported"
    rlhf(moved, "export", "best", str(exported))  # a copy out of the home names its base absolutely
    assert json.loads((exported / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == str(pretrain_model)
