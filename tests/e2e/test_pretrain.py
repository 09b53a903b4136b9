"""End to end: pretrain a tiny model, kill it after a committed state, rerun, and get the same
weights bit for bit as an uninterrupted run; every parameter moved from its initial value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import (assert_same_weights, committed_state, kill_when, model_weights, results,
                      rlhf, run_json)

pytestmark = pytest.mark.e2e


def pretrain_args(corpus: Path) -> tuple[str, ...]:
    return ("run", "pretrain", "--config", "configs/tiny/pretrain.yaml",
            f"data.sources=[{corpus}]", "train.max_steps=24", "train.batch_size=4",
            "checkpoint.every_steps=6", "train.warmup_steps=2", "tokenizer.vocab_size=400")


def test_kill_and_rerun_gives_the_same_weights(tmp_path, corpus_file):
    args = pretrain_args(corpus_file)
    straight = run_json(rlhf(tmp_path / "straight", *args))

    home = tmp_path / "killed"
    kill_when(home, args, committed_state(home, "pretrain", 12))
    resumed = rlhf(home, *args)
    assert "resuming" in resumed.stderr
    result = run_json(resumed)
    assert result["status"] == "completed"
    assert_same_weights(model_weights(straight["model_path"]), model_weights(result["model_path"]))

    # The same batches, in the same order, were seen by both runs.
    crc = [json.loads(rlhf(h, "registry", "show", "pretrain:latest", "--json").stdout)
           for h in (tmp_path / "straight", home)]
    assert results(crc[0]["summary"]) == results(crc[1]["summary"])


def test_every_parameter_changes_and_rerun_reuses(tmp_path, corpus_file):
    from pipeline.models import build_from_preset
    from pipeline.tokenizer import load_tokenizer

    args = pretrain_args(corpus_file)
    result = run_json(rlhf(tmp_path, *args))
    trained = model_weights(result["model_path"])
    initial = build_from_preset("tiny", load_tokenizer(result["model_path"]), seed=0).state_dict()
    unchanged = [name for name, value in trained.items() if torch.equal(value, initial[name])]
    assert not unchanged, f"parameters never updated: {unchanged}"

    again = rlhf(tmp_path, *args)
    assert "reusing completed run" in again.stderr
    assert run_json(again)["run"] == result["run"]


def test_published_model_loads_with_plain_transformers(tmp_path, corpus_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = run_json(rlhf(tmp_path, *pretrain_args(corpus_file), "train.max_steps=2"))
    model = AutoModelForCausalLM.from_pretrained(result["model_path"])
    tokenizer = AutoTokenizer.from_pretrained(result["model_path"])
    ids = tokenizer("3 chickens have", return_tensors="pt")["input_ids"]
    assert model(ids).logits.shape[-1] == len(tokenizer)
    assert Path(result["model_path"], "manifest.json").is_file()
