"""End to end: tiny pretrain → reward through the real CLI. Every trainable parameter changes, the
lineage is reward ← pretrain, a killed run resumes to bit-identical weights, the normalization
makes the SFT stand-in answers score 0 on average, `rlhf score` answers (table, --data, --json,
--plot), and bad data exits 2 with one line naming file:line while registering nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import (ROOT, assert_same_weights, committed_state, kill_when, model_weights,
                      results, rlhf, run_json)

pytestmark = pytest.mark.e2e

REWARD_DATA = ROOT / "reward_data"


def first_rows(source: Path, target: Path, n: int) -> Path:
    target.write_text("".join(source.read_text(encoding="utf-8").splitlines(True)[:n]),
                      encoding="utf-8")
    return target


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A corpus made of the ranked data's own text, and small ranked train / eval files (K = 4)."""
    root = tmp_path_factory.mktemp("data")
    rows = [json.loads(line) for line in REWARD_DATA.joinpath("train.jsonl").read_text().splitlines()]
    corpus = "\n\n".join(text for row in rows for text in [row["prompt"], *row["responses"]])
    (root / "corpus.txt").write_text(corpus, encoding="utf-8")
    return {"corpus": root / "corpus.txt",
            "train": first_rows(REWARD_DATA / "train.jsonl", root / "train.jsonl", 48),
            "eval": first_rows(REWARD_DATA / "eval.jsonl", root / "eval.jsonl", 24)}


def pretrain(home: Path, corpus: Path) -> dict:
    return run_json(rlhf(home, "run", "pretrain", "--config", "configs/tiny/pretrain.yaml",
                         f"data.sources=[{corpus}]", "train.max_steps=4", "train.batch_size=4",
                         "train.warmup_steps=1", "tokenizer.vocab_size=400"))


def reward_args(data: dict[str, Path], *extra: str, source: str = "pretrain:latest"
                ) -> tuple[str, ...]:
    return ("run", "reward", "--config", str(ROOT / "configs/tiny/reward.yaml"),
            f"model.source={source}",
            f"data.train_files=[{data['train']}]", f"data.eval_files=[{data['eval']}]",
            "train.max_steps=12", "train.batch_size=4", "train.warmup_steps=2",
            "checkpoint.every_steps=4", "normalize.prompts=4", "normalize.max_new_tokens=8", *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data) -> dict:
    """A registry home with a tiny pretrain run and an uninterrupted reward run on top of it."""
    home = tmp_path_factory.mktemp("straight")
    parent = pretrain(home, data["corpus"])
    return {"home": home, "parent": parent, "reward": run_json(rlhf(home, *reward_args(data)))}


def summary_of(home: Path, ref: str) -> dict:
    from pipeline.registry import Registry

    return Registry(home).lookup(ref).summary


def test_every_trainable_parameter_changes_and_lineage(trained):
    from pipeline.registry import Resolved
    from pipeline.reward_model import build_reward_model, reward_tokenizer

    parent_path = trained["parent"]["model_path"]
    initial = build_reward_model(Resolved(parent_path), reward_tokenizer(parent_path), seed=0)
    trained_weights = model_weights(trained["reward"]["model_path"])
    assert trained_weights.keys() == initial.state_dict().keys()
    unchanged = [name for name, value in initial.state_dict().items()
                 if torch.equal(value, trained_weights[name])]
    assert not unchanged, f"parameters never updated: {unchanged}"

    lineage = json.loads(rlhf(trained["home"], "registry", "lineage", "reward:latest",
                              "--json").stdout)
    assert lineage["stage"] == "reward"
    assert lineage["parents"]["model"]["id"] == trained["parent"]["run"]
    assert lineage["parents"]["model"]["stage"] == "pretrain"


def test_summary_marker_and_plain_transformers_load(trained):
    from transformers import AutoModelForSequenceClassification

    from pipeline.registry import Resolved
    from pipeline.reward_model import load_reward_model, score_texts

    model_dir = Path(trained["reward"]["model_path"])
    summary = summary_of(trained["home"], "reward:latest")
    marker = json.loads((model_dir / "reward_model.json").read_text())
    assert marker["kind"] == "reward_model"
    assert marker["shift"] == summary["shift"]
    normalization = summary["normalization"]
    assert normalization["shift"] == summary["shift"]
    assert normalization["answers"] == "sft_samples"
    # Ended answers only, as PPO scores them; all four when none ended.
    assert normalization["count"] == (4 - normalization["unended"] or 4)
    for key in ("pairwise_accuracy", "accuracy_by_gap", "mean_score_by_rank", "kendall_tau"):
        assert key in summary and key in marker["metrics"]
    assert summary["train_prompts"] == 48 and summary["eval_prompts"] == 24

    # Plain transformers loads it with no project code and gives the raw (unshifted) score.
    plain = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    ours, tokenizer = load_reward_model(Resolved(str(model_dir)))
    prompt, answer = "Three chickens have how many legs?", "Six legs."
    normalized = score_texts(ours, tokenizer, [prompt], [answer])[0]
    assert score_texts(plain, tokenizer, [prompt], [answer])[0] == pytest.approx(
        normalized + marker["shift"], abs=1e-5)


def test_kill_and_rerun_gives_the_same_weights(tmp_path, data, trained):
    # The same parent weights as the uninterrupted run, named by path in a fresh registry.
    home = tmp_path / "killed"
    args = reward_args(data, source=trained["parent"]["model_path"])
    kill_when(home, args, committed_state(home, "reward", 4))
    resumed = rlhf(home, *args)
    assert "resuming" in resumed.stderr
    result = run_json(resumed)
    assert result["status"] == "completed"
    assert_same_weights(model_weights(trained["reward"]["model_path"]),
                        model_weights(result["model_path"]))
    assert results(summary_of(home, "reward:latest")) == \
        results(summary_of(trained["home"], "reward:latest"))
    assert "reusing completed run" in rlhf(home, *args).stderr


def test_score_table_sorted_by_score(trained, capsys):
    code, out, _ = cli(trained["home"], ("score", "reward:latest", "--prompt", "三只鸡有几条腿？",
                                         "--response", "六条腿。", "--response", "The moon is bright.",
                                         "--response", "Six legs."), capsys)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "response"]
    scores = [float(line.split()[1]) for line in lines[1:]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert {line.split(maxsplit=2)[2] for line in lines[1:]} == {"六条腿。", "The moon is bright.",
                                                                 "Six legs."}


def test_score_data_json_and_plot(trained, data, tmp_path, capsys):
    import matplotlib.image

    plot = tmp_path / "scores.png"
    code, out, _ = cli(trained["home"], ("score", trained["reward"]["model_path"], "--data",
                                         str(data["eval"]), "--json", "--worst", "2", "--plot",
                                         str(plot)), capsys)
    assert code == 0
    report = json.loads(out)
    summary = summary_of(trained["home"], "reward:latest")
    assert report["accuracy"] == pytest.approx(summary["pairwise_accuracy"], abs=1e-6)
    assert set(report["score_by_rank"]) == {"0", "1", "2", "3"}
    assert report["score_by_rank"] == pytest.approx(summary["mean_score_by_rank"], abs=1e-5)
    assert len(report["worst"]) <= 2
    for item in report["worst"]:
        assert item["where"].startswith(f"{data['eval']}:")
        assert len(item["answers"]) == 4 and item["disagreement"] > 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(plot).ndim == 3

    code, out, _ = cli(trained["home"], ("score", "reward:latest", "--data", str(data["eval"])),
                       capsys)
    assert code == 0 and "pairwise accuracy:" in out and "mean score by rank" in out


def test_score_refuses_a_model_that_is_not_a_reward_model(trained, capsys):
    code, _, err = cli(trained["home"], ("score", "pretrain:latest", "--prompt", "Legs?",
                                         "--response", "Six."), capsys)
    assert code == 2 and "is not a reward model" in err


BAD_ROWS = {
    "ranking not a permutation": ({"prompt": "Legs?", "responses": ["Six.", "Two.", "Moo."],
                                   "ranking": [0, 0, 1]}, "ranking repeats index 0"),
    "K < 2": ({"prompt": "Legs?", "responses": ["Six."], "ranking": [0]}, "at least 2"),
    "empty answer": ({"prompt": "Legs?", "responses": ["Six.", "  "], "ranking": [0, 1]},
                     r"responses\[1\] is empty"),
    "same answer ranked apart": ({"prompt": "Legs?", "responses": ["Six.", "Two.", "Six."],
                                  "ranking": [0, 1, 2]}, "same text ranked in different places"),
}


def cli(home: Path, args: tuple[str, ...], capsys) -> tuple[int, str, str]:
    """The real CLI entry point, in this process (no interpreter start-up per call)."""
    from pipeline.commands.cli import main

    capsys.readouterr()
    code = main(["--home", str(home), *args])
    out, err = capsys.readouterr()
    return code, out, err


def reward_runs(home: Path) -> list[str]:
    from pipeline.registry import Registry

    return [run.id for run in Registry(home).runs("reward")]


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rankings_exit_2_with_file_line_and_register_nothing(trained, data, tmp_path, capsys,
                                                                  case):
    row, message = BAD_ROWS[case]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data["train"].read_text().splitlines(True)[0] + json.dumps(row) + "\n")
    before = reward_runs(trained["home"])
    code, _, err = cli(trained["home"], reward_args(data, f"data.train_files=[{bad}]"), capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}:2: ")
    assert re.search(message, lines[0])
    assert reward_runs(trained["home"]) == before


def test_over_long_prompts_are_counted_or_refused(trained, data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RLHF_NO_PROGRESS", "1")
    long_row = {"prompt": "Three chickens and two cows have how many legs? " * 20,
                "responses": ["Fourteen legs.", "Moo."], "ranking": [0, 1]}
    train = tmp_path / "long.jsonl"
    train.write_text(data["train"].read_text() + json.dumps(long_row) + "\n")
    before = reward_runs(trained["home"])
    code, _, err = cli(trained["home"], reward_args(
        data, f"data.train_files=[{train}]", "data.max_length=8", "data.truncation=drop"), capsys)
    assert code == 2 and "all 49 train prompts were dropped" in err
    assert reward_runs(trained["home"]) == before

    code, out, err = cli(trained["home"], reward_args(
        data, f"data.train_files=[{train}]", "data.max_length=160", "train.max_steps=3",
        "lora.enabled=true", "lora.r=4", "normalize.answers=best_ranked"), capsys)
    assert code == 0, err
    lora = json.loads(out.strip().splitlines()[-1])
    summary = summary_of(trained["home"], lora["run"])
    assert summary["train_answers_truncated"] == 2 and summary["train_prompts_dropped"] == 0
    assert "2 answers cut to their last 160 tokens" in err
    assert summary["lora"] is True
    check_lora_model(lora["model_path"], trained["parent"]["model_path"])
    check_normalized(lora["model_path"], data["eval"])


def check_lora_model(model_dir: str, parent_dir: str) -> None:
    """Published merged: a plain classifier whose attention moved (LoRA), whose MLP did not
    (frozen), and whose new score head was trained."""
    from pipeline.registry import Resolved
    from pipeline.reward_model import build_reward_model, reward_tokenizer

    assert not Path(model_dir, "adapter_config.json").exists()
    initial = build_reward_model(Resolved(parent_dir), reward_tokenizer(parent_dir), seed=0)
    initial = initial.state_dict()
    published = model_weights(model_dir)
    assert not torch.equal(published["score.weight"], initial["score.weight"])
    assert not torch.equal(published["model.layers.0.self_attn.q_proj.weight"],
                           initial["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(published["model.layers.0.mlp.up_proj.weight"],
                       initial["model.layers.0.mlp.up_proj.weight"])


def check_normalized(model_dir: str, eval_file: Path) -> None:
    """With normalize.answers=best_ranked, the best eval answers score 0 on average."""
    from pipeline.data.formats import load_ranked_rows
    from pipeline.registry import Resolved
    from pipeline.reward_model import load_reward_model, score_texts

    model, tokenizer = load_reward_model(Resolved(model_dir))
    best = [(row["prompt"], answer) for row in load_ranked_rows(eval_file)
            for answer, rank in zip(row["responses"], row["ranks"]) if rank == 0]
    scores = score_texts(model, tokenizer, [p for p, _ in best], [a for _, a in best])
    assert abs(sum(scores) / len(scores)) < 1e-4
