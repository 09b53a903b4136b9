"""Sharded training (`runtime.sharding=fsdp`, FSDP2) with two CPU processes: a run killed after a
committed state and run again ends with the weights of an uninterrupted sharded run, for every
stage; the published model is one plain Hugging Face directory; and a sharded state is resumed
only by as many processes as wrote it. (That two sharded processes compute what one process does
is in test_distributed.py.)"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import (ROOT, assert_same_weights, cli_env, committed_state, kill_when,
                      model_weights, rlhf, run_json, torchrun_command)

pytestmark = pytest.mark.e2e

SHARDED = "runtime.sharding=fsdp"


def torchrun(home: Path, *args: str) -> dict:
    result = subprocess.run(torchrun_command(home, *args), cwd=ROOT, env=cli_env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_json(result)


def stage_args(stage: str, corpus: Path) -> tuple[str, ...]:
    common = ("train.max_steps=4", "checkpoint.every_steps=2", "train.batch_size=2", SHARDED)
    return {
        "pretrain": ("run", "pretrain", "--config", "configs/tiny/pretrain.yaml",
                     f"data.sources=[{corpus}]", "tokenizer.vocab_size=400"),
        "sft": ("run", "sft", "--config", "configs/tiny/sft.yaml", "model.source=pretrain:latest",
                "eval.n_prompts=2", "eval.max_new_tokens=4", "data.max_length=64"),
        "reward": ("run", "reward", "--config", "configs/tiny/reward.yaml",
                   "model.source=pretrain:latest", "normalize.prompts=4",
                   "normalize.max_new_tokens=8"),
        # Answers of different lengths: sampling runs on the gathered policy. A value head on the
        # policy (its separate value model is sharded in test_distributed.py).
        "ppo": ("run", "ppo", "--config", "configs/tiny/ppo.yaml", "model.policy=pretrain:latest",
                "model.reward=reward:latest", "generation.max_new_tokens=8", "eval.n_prompts=2",
                "eval.max_new_tokens=4", "samples.every_steps=0", "data.max_prompt_tokens=24",
                "value.shared_backbone=true"),
    }[stage] + common


def plain_model(model_path: str, stage: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if stage == "reward" else AutoModelForCausalLM
    return auto.from_pretrained(model_path)


@pytest.mark.parametrize("stage", ["pretrain", "sft", "reward", "ppo"])
def test_sharded_kill_and_rerun_gives_the_same_weights(stage, tmp_path, mechanics_home,
                                                       corpus_file):
    homes = {name: tmp_path / name for name in ("straight", "killed")}
    for home in homes.values():
        shutil.copytree(mechanics_home, home)
    args = stage_args(stage, corpus_file)
    straight = torchrun(homes["straight"], *args)

    kill_when(homes["killed"], args, committed_state(homes["killed"], stage, 2),
              command=torchrun_command)
    shards = list(homes["killed"].glob(f"runs/{stage}-*/state/step-2/optimizer-shards/*.distcp"))
    assert len(shards) == 2, "each process writes its own shard of the optimizer state"
    resumed = torchrun(homes["killed"], *args)
    assert resumed["status"] == "completed"
    assert_same_weights(model_weights(straight["model_path"]),
                        model_weights(resumed["model_path"]))
    model = plain_model(resumed["model_path"], stage)  # one plain directory, whole weights
    assert sum(p.numel() for p in model.parameters()) == \
        sum(t.numel() for t in model_weights(resumed["model_path"]).values())


def test_a_sharded_state_resumes_only_with_as_many_processes(tmp_path, corpus_file):
    home = tmp_path / "home"
    args = stage_args("pretrain", corpus_file)
    kill_when(home, args, committed_state(home, "pretrain", 2), command=torchrun_command)
    result = rlhf(home, *args, check=False)
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "written by 2 process(es); this launch has 1" in lines[0], lines
    assert "torchrun --nproc_per_node 2" in lines[0]
