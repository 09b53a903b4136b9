"""End to end: the ppo stage through the real `rlhf` CLI on the embedded world, with tiny models.

A killed run resumes to bit-identical weights, metrics and samples (plain, and with LoRA + a value
head on the policy + EMA + PPO-ptx + an adaptive k3 KL penalty); the registry records ppo ← policy,
reward; every metric is logged; and bad inputs exit 2 with one line and register nothing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import (assert_same_weights, committed_state, kill_when, model_weights, results,
                      rlhf, run_json)

pytestmark = pytest.mark.e2e

TINY_PPO = "configs/tiny/ppo.yaml"


@pytest.fixture
def home(mechanics_home, tmp_path) -> Path:
    """A fresh copy of the registry; ppo runs are added to the copy."""
    copy = tmp_path / "home"
    shutil.copytree(mechanics_home, copy)
    return copy


def ppo_args(*overrides: str) -> tuple[str, ...]:
    return ("run", "ppo", "--config", TINY_PPO, "model.policy=pretrain:latest",
            "model.reward=reward:latest", "train.max_steps=4", "train.batch_size=4",
            "train.lr=1e-3", "train.eval_every=2", "checkpoint.every_steps=2",
            "generation.max_new_tokens=8", "eval.n_prompts=4", "eval.max_new_tokens=8",
            "samples.every_steps=2", "samples.count=2", "data.max_prompt_tokens=24", *overrides)


EVERY_OPTION = ("lora.enabled=true", "value.shared_backbone=true", "ema.decay=0.5",
                "ptx.coef=0.5", "ptx.seq_len=32", "ptx.batch_size=2", "kl.adaptive=true",
                "kl.target=1.0", "kl.estimator=k3", "ppo.whiten_rewards=true", "train.grad_accum=2",
                "value.lr=1e-3", "eval.sampled_answers=2")


def show(home: Path, ref: str) -> dict:
    return json.loads(rlhf(home, "registry", "show", ref, "--json").stdout)


def run_record(home: Path) -> dict:
    """What must not differ between an uninterrupted run and a killed-and-resumed one."""
    from pipeline.registry import Registry

    registry = Registry(home)
    run = registry.lookup("ppo:latest")
    timing = {"episodes_per_s", "time_generate", "time_score", "time_update"}
    metrics = {name: series for name, series in registry.metrics(run.id).items()
               if name not in timing}
    samples = (registry.run_dir(run.id) / "samples.jsonl").read_text(encoding="utf-8")
    return {"summary": results(run.summary), "metrics": metrics, "samples": samples}


@pytest.mark.parametrize("options", [(), EVERY_OPTION], ids=["plain", "every-option"])
def test_kill_and_rerun_gives_the_same_weights(tmp_path, mechanics_home, options):
    homes = {}
    for name in ("straight", "killed"):
        homes[name] = tmp_path / name
        shutil.copytree(mechanics_home, homes[name])
    args = ppo_args(*options)
    straight = run_json(rlhf(homes["straight"], *args))

    kill_when(homes["killed"], args, committed_state(homes["killed"], "ppo", 2))
    resumed = rlhf(homes["killed"], *args)
    assert "resuming" in resumed.stderr
    result = run_json(resumed)
    assert result["status"] == "completed"
    assert_same_weights(model_weights(straight["model_path"]), model_weights(result["model_path"]))
    assert run_record(homes["killed"]) == run_record(homes["straight"])


def test_ppo_raises_the_score_on_a_kl_leash(home):
    """The optimization itself, on short seeded runs with the barely trained models: the score
    the policy is trained on rises (mostly by learning to end its answers, which the
    missing-EOS penalty rewards: the barely trained reward model's own scores hardly vary), and
    the KL penalty holds the policy nearer its reference than a run without it."""
    from pipeline.registry import Registry

    def run(kl_coef: float) -> tuple[list[float], list[float]]:
        result = run_json(rlhf(home, *ppo_args(
            "train.max_steps=10", "train.batch_size=8", "train.lr=3e-3", "train.eval_every=0",
            "checkpoint.every_steps=100", "samples.every_steps=0", f"kl.coef={kl_coef}")))
        metrics = Registry(home).metrics(result["run"])
        return ([value for _, value in metrics[name]] for name in ("score", "kl"))

    score, leashed_kl = run(0.3)
    _, free_kl = run(0.0)
    assert sum(score[-3:]) / 3 > sum(score[:3]) / 3 + 0.2, score
    assert sum(leashed_kl[-3:]) < sum(free_kl[-3:]), (leashed_kl, free_kl)


def test_lineage_metrics_samples_and_published_model(home):
    from transformers import AutoModelForCausalLM

    result = run_json(rlhf(home, *ppo_args("eval.sampled_answers=2")))
    lineage = json.loads(rlhf(home, "registry", "lineage", "ppo:latest", "--json").stdout)
    assert lineage["stage"] == "ppo"
    assert lineage["parents"]["policy"]["stage"] == "pretrain"
    assert lineage["parents"]["reward"]["stage"] == "reward"

    record = run_record(home)
    for name in ("rm_score_mean", "rm_score_std", "kl", "entropy", "clip_fraction", "approx_kl",
                 "value_loss", "value_clip_fraction", "explained_variance", "response_length",
                 "eos_rate", "lr", "kl_coef", "policy_loss"):
        assert [step for step, _ in record["metrics"][name]] == [1, 2, 3, 4], name
    # Gold at the start, every train.eval_every steps, and at the end.
    for series in ("gold", "gold_sampled"):
        assert [step for step, _ in record["metrics"][f"{series}/mean_gold_score"]] == [0, 2, 4]
    summary = record["summary"]
    assert summary["prompts"] + summary["prompts_dropped"] == 512
    assert summary["prompts_truncated"] > 0  # data.max_prompt_tokens=24 cuts the longer ones
    for key in ("gold_start/mean_gold_score", "gold_end/mean_gold_score",
                "gold_sampled_start/mean_gold_score", "gold_sampled_end/count_accuracy",
                "rm_score_mean_start", "rm_score_mean_end", "kl_end"):
        assert key in summary
    samples = [json.loads(line) for line in record["samples"].splitlines()]
    assert [row["step"] for row in samples] == [2, 2, 4, 4]
    assert {"prompt", "response", "rm_score", "ended_with_eos"} <= samples[0].keys()

    # The published policy is a plain HF directory that moved away from its start.
    published = AutoModelForCausalLM.from_pretrained(result["model_path"])
    start = model_weights(show(home, "pretrain:latest")["model_path"])
    moved = [name for name, value in published.state_dict().items()
             if not torch.equal(value, start[name])]
    assert moved and len(moved) == len(start)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def policy_without_eos(home: Path, tmp_path: Path) -> Path:
    """The pretrain model with a tokenizer that defines no EOS token."""
    from transformers import AutoTokenizer

    source = Path(show(home, "pretrain:latest")["model_path"])
    target = tmp_path / "no-eos"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("manifest.json"))
    tokenizer = AutoTokenizer.from_pretrained(target)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(target)
    return target


BAD_INPUTS = {
    "reward checkpoint is a causal LM": (
        lambda home, tmp: ["model.reward=pretrain:latest"], "is not a reward model"),
    "policy tokenizer without EOS": (
        lambda home, tmp: [f"model.policy={policy_without_eos(home, tmp)}"], "has no EOS token"),
    "empty prompt file": (
        lambda home, tmp: [f"data.prompts_file={write_jsonl(tmp / 'empty.jsonl', [])}"],
        "has no rows"),
    "prompt of the wrong type": (
        lambda home, tmp: [f"data.prompts_file={write_jsonl(tmp / 'p.jsonl', [{'prompt': 'Hi?'}, {'prompt': 3}])}"],
        r"p\.jsonl:2: expected a non-empty text"),
    "every prompt too long to keep": (
        lambda home, tmp: ["data.max_prompt_tokens=2", "data.truncation=drop"],
        "all 512 prompts are longer than data.max_prompt_tokens=2"),
    "minibatches do not divide the batch": (
        lambda home, tmp: ["ppo.minibatches=3"], "train.batch_size=4 does not split"),
    "answer longer than the context": (
        lambda home, tmp: ["generation.max_new_tokens=250"], "exceeds the policy's context"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_registers_nothing(home, tmp_path, capsys, case):
    from pipeline.commands.cli import main
    from pipeline.registry import Registry

    make_overrides, message = BAD_INPUTS[case]
    args = ppo_args(*make_overrides(home, tmp_path))
    capsys.readouterr()
    code = main(["--home", str(home), *args])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert __import__("re").search(message, lines[0]), lines[0]
    assert Registry(home).runs("ppo") == []
