"""End to end: every stage trains in bf16 weights with gradient checkpointing on a CPU, prints its
memory line and records its peak memory; bf16 autocast holds PPO's frozen models in bf16."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
from safetensors import safe_open

from conftest import rlhf, run_json

pytestmark = pytest.mark.e2e

BF16 = ("model.dtype=bf16", "train.gradient_checkpointing=true")


def weight_dtypes(model_dir) -> set[str]:
    with safe_open(f"{model_dir}/model.safetensors", "pt") as weights:
        return {str(weights.get_slice(name).get_dtype()) for name in weights.keys()}


def test_every_stage_trains_bf16_weights_with_gradient_checkpointing(tmp_path, corpus_file):
    home = tmp_path / "home"
    stages = [
        ("pretrain", "configs/tiny/pretrain.yaml", f"data.sources=[{corpus_file}]",
         "train.max_steps=3", "tokenizer.vocab_size=400"),
        ("sft", "configs/tiny/sft.yaml", "model.source=pretrain:latest", "train.max_steps=2",
         "eval.n_prompts=2", "eval.max_new_tokens=4"),
        ("reward", "configs/tiny/reward.yaml", "model.source=sft:latest", "train.max_steps=2",
         "train.batch_size=2", "normalize.prompts=2", "normalize.max_new_tokens=4"),
        ("ppo", "configs/tiny/ppo.yaml", "model.policy=sft:latest", "train.max_steps=2",
         "train.batch_size=4", "generation.max_new_tokens=8", "eval.n_prompts=2",
         "eval.max_new_tokens=4", "data.max_prompt_tokens=24"),
    ]
    for stage, config, *overrides in stages:
        result = rlhf(home, "run", stage, "--config", config, "train.batch_size=2",
                      "checkpoint.every_steps=100", *overrides, *BF16)
        memory = [line for line in result.stderr.splitlines() if f"{stage} memory:" in line]
        assert memory and "bf16" in memory[0] and "fp32" not in memory[0], result.stderr
        summary = run_json(result)
        record = rlhf(home, "registry", "show", summary["run"], "--json")
        peak = json.loads(record.stdout)["summary"]["peak_memory_mib"]
        assert math.isfinite(peak) and peak > 0
        assert weight_dtypes(summary["model_path"]) == {"BF16"}


def test_bf16_autocast_holds_ppo_frozen_models_in_bf16(tmp_path, mechanics_home):
    home = tmp_path / "home"
    shutil.copytree(mechanics_home, home)
    result = rlhf(home, "run", "ppo", "--config", "configs/tiny/ppo.yaml",
                  "model.policy=pretrain:latest", "train.max_steps=1", "train.batch_size=2",
                  "generation.max_new_tokens=4", "eval.n_prompts=0", "data.max_prompt_tokens=24",
                  "runtime.precision=bf16")
    line = next(line for line in result.stderr.splitlines() if "ppo memory:" in line)
    # "ppo memory: policy N parameters fp32 X MiB; reference N parameters bf16 X MiB; ..."
    dtypes = dict(re.findall(r"([a-z][a-z ]*) [\d,]+ parameters (\w+)", line.split(": ", 1)[1]))
    assert dtypes == {"policy": "fp32", "reference": "bf16", "reward model": "bf16",
                      "value model": "fp32"}
    assert run_json(result)["status"] == "completed"
