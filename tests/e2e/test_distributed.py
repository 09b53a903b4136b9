"""Several processes: each stage under `torchrun --nproc_per_node 2` (CPU, gloo), with whole models
(DDP) and sharded ones (`runtime.sharding=fsdp`, FSDP2), matches the one-process run with the same
global batch, writes the registry only from the main process, and publishes one checkpoint. PPO's rollouts are split across the processes (each samples its share,
keyed by the episode, so both runs draw the same answers) and whitened over all of them."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, cli_env, rlhf, run_json, torchrun_command

pytestmark = pytest.mark.e2e

SFT_FIXTURES = ROOT / "tests" / "fixtures" / "sft"


def torchrun(home: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(cli_env(), OMP_NUM_THREADS="1")
    result = subprocess.run(torchrun_command(home, *args), cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def latest_series(home: Path, stage: str) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} of the stage's newest run."""
    from pipeline.registry import Registry

    registry = Registry(home)
    return registry.metrics(registry.lookup(f"{stage}:latest").id)


def assert_two_processes_match_one(base: Path | None, tmp_path: Path, stage: str, args: tuple,
                                   per_process_batch: int, metrics: tuple[str, ...],
                                   sharding: str) -> None:
    """Run `args` with 2 processes × batch (`runtime.sharding=sharding`) and 1 process × 2·batch
    (each in a copy of `base`)."""
    homes = {name: tmp_path / name for name in ("two", "one")}
    for home in homes.values():
        if base is not None:
            shutil.copytree(base, home)
    torchrun(homes["two"], *args, f"train.batch_size={per_process_batch}",
             f"runtime.sharding={sharding}")
    run_json(rlhf(homes["one"], *args, f"train.batch_size={2 * per_process_batch}"))

    two, one = latest_series(homes["two"], stage), latest_series(homes["one"], stage)
    for name in metrics:
        assert two[name] and [step for step, _ in two[name]] == [step for step, _ in one[name]]
        assert [value for _, value in two[name]] == pytest.approx(
            [value for _, value in one[name]], rel=1e-4, abs=1e-5), name
        assert len({step for step, _ in two[name]}) == len(two[name]), \
            f"{name} was logged by more than one process"
    with sqlite3.connect(homes["two"] / "registry.db") as db:
        statuses = [s for (s,) in db.execute("SELECT status FROM runs WHERE stage = ?", (stage,))]
    before = len(list(base.glob(f"runs/{stage}-*/model/manifest.json"))) if base else 0
    assert len(statuses) == before + 1 and statuses[-1] == "completed", statuses
    assert len(list(homes["two"].glob(f"runs/{stage}-*/model/manifest.json"))) == before + 1


SHARDING = pytest.mark.parametrize("sharding", ["none", "fsdp"])


@SHARDING
def test_pretrain_two_processes_match_one(sharding, tmp_path, corpus_file):
    args = ("run", "pretrain", "--config", "configs/tiny/pretrain.yaml",
            f"data.sources=[{corpus_file}]", "train.max_steps=5", "checkpoint.every_steps=2",
            "tokenizer.vocab_size=400")
    assert_two_processes_match_one(None, tmp_path, "pretrain", args, 4, ("loss", "eval_loss"),
                                   sharding)


@SHARDING
def test_sft_two_processes_match_one(sharding, tmp_path, mechanics_home):
    # Conversations of different lengths: the loss is the mean over all answer tokens of the
    # global batch, not a mean of the two processes' means.
    conversations = SFT_FIXTURES / "conversations.jsonl"
    args = ("run", "sft", "--config", "configs/tiny/sft.yaml", "model.source=pretrain:latest",
            f"data.train_files=[{conversations}]", f"data.eval_files=[{conversations}]",
            f"eval.prompts_file={SFT_FIXTURES / 'prompts.jsonl'}", "eval.n_prompts=2",
            "eval.max_new_tokens=4", "data.max_length=64", "train.max_steps=4",
            "train.warmup_steps=1", "train.eval_batches=1", "checkpoint.every_steps=2")
    assert_two_processes_match_one(mechanics_home, tmp_path, "sft", args, 2, ("loss",), sharding)


@SHARDING
def test_reward_two_processes_match_one(sharding, tmp_path, mechanics_home):
    args = ("run", "reward", "--config", "configs/tiny/reward.yaml",
            "model.source=pretrain:latest", "train.max_steps=4", "train.warmup_steps=1",
            "checkpoint.every_steps=2", "normalize.prompts=4", "normalize.max_new_tokens=8")
    assert_two_processes_match_one(mechanics_home, tmp_path, "reward", args, 2,
                                   ("loss", "eval_pairwise_accuracy"), sharding)


@SHARDING
def test_ppo_two_processes_match_one(sharding, tmp_path, mechanics_home):
    # Answers of one length (EOS blocked until the limit): each process's mean over its tokens is
    # then the global mean, so the two runs' gradients agree.
    args = ("run", "ppo", "--config", "configs/tiny/ppo.yaml", "model.policy=pretrain:latest",
            "model.reward=reward:latest", "train.max_steps=3", "train.lr=1e-3",
            "train.eval_every=0", "checkpoint.every_steps=2", "generation.max_new_tokens=6",
            "generation.min_new_tokens=6", "reward.missing_eos_penalty=null", "ppo.minibatches=1",
            "eval.n_prompts=2", "eval.max_new_tokens=4", "samples.every_steps=0",
            "data.max_prompt_tokens=24")
    assert_two_processes_match_one(mechanics_home, tmp_path, "ppo", args, 2,
                                   ("rm_score_mean", "kl", "policy_loss", "value_loss"), sharding)
