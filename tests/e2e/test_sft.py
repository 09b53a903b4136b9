"""End to end: SFT from a tiny pretrain checkpoint through the real `rlhf` CLI.

Every parameter moves, the registry records sft ← pretrain, a killed run resumes to the same
weights (full and LoRA), a LoRA export with --merge loads with plain transformers and gives the
adapter model's logits, bad inputs exit 2 and register nothing, and gold-score reports its keys.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import (assert_same_weights, committed_state, kill_when, model_weights, results,
                      rlhf, run_json)
from pipeline.commands.cli import main
from pipeline.data.formats import load_sft_rows
from pipeline.registry import Registry, adapter_base
from pipeline.tokenizer import encode_chat, load_tokenizer

pytestmark = pytest.mark.e2e

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "sft"
CONVERSATIONS = FIXTURES / "conversations.jsonl"
PROMPTS = FIXTURES / "prompts.jsonl"


@pytest.fixture(scope="module")
def pretrained_home(tmp_path_factory) -> Path:
    """A registry holding one tiny pretrain run, a few steps on the SFT fixture's text."""
    home = tmp_path_factory.mktemp("pretrained")
    corpus = home.parent / "corpus.jsonl"
    rows = [json.loads(line) for line in CONVERSATIONS.read_text(encoding="utf-8").splitlines()]
    corpus.write_text("".join(json.dumps({"text": m["content"]}, ensure_ascii=False) + "\n"
                              for row in rows for m in row["messages"]), encoding="utf-8")
    rlhf(home, "run", "pretrain", "--config", "configs/tiny/pretrain.yaml",
         f"data.sources=[{corpus}]", "train.max_steps=2", "train.batch_size=2", "data.seq_len=32",
         "tokenizer.vocab_size=400", "checkpoint.every_steps=100")
    return home


@pytest.fixture
def sft_home(pretrained_home, tmp_path) -> Path:
    """A fresh copy of the registry with the pretrain run; SFT runs are added to the copy."""
    home = tmp_path / "home"
    shutil.copytree(pretrained_home, home)
    return home


def sft_args(*overrides: str) -> tuple[str, ...]:
    return ("run", "sft", "--config", "configs/tiny/sft.yaml",
            f"data.train_files=[{CONVERSATIONS}]", f"data.eval_files=[{CONVERSATIONS}]",
            f"eval.prompts_file={PROMPTS}", "eval.n_prompts=2", "eval.max_new_tokens=6",
            "data.max_length=64", "train.max_steps=16", "train.batch_size=4",
            "train.warmup_steps=1", "train.eval_batches=1", "checkpoint.every_steps=4", *overrides)


def straight_and_killed(tmp_path: Path, pretrained_home: Path, args: tuple[str, ...]):
    """Run `args` uninterrupted in one home; in another, SIGKILL it after a state, then rerun."""
    homes = [tmp_path / "straight", tmp_path / "killed"]
    for home in homes:
        shutil.copytree(pretrained_home, home)
    straight = run_json(rlhf(homes[0], *args))
    kill_when(homes[1], args, committed_state(homes[1], "sft", 4))
    resumed = rlhf(homes[1], *args)
    assert "resuming" in resumed.stderr
    return homes, straight, run_json(resumed)


def test_sft_moves_every_parameter_records_lineage_and_resumes_exactly(tmp_path, pretrained_home,
                                                                      capsys):
    homes, straight, resumed = straight_and_killed(tmp_path, pretrained_home, sft_args())
    registry = Registry(homes[0])
    parent = registry.lookup("pretrain:latest")
    trained, initial = model_weights(straight["model_path"]), model_weights(parent.model_path)
    unchanged = [name for name, value in trained.items() if torch.equal(value, initial[name])]
    assert not unchanged, f"parameters never updated: {unchanged}"

    lineage = registry.lineage(straight["run"])
    assert lineage["stage"] == "sft"
    assert (lineage["parents"]["model"]["id"], lineage["parents"]["model"]["stage"]) == \
        (parent.id, "pretrain")

    summary = registry.get(straight["run"]).summary
    tokenizer = load_tokenizer(straight["model_path"])
    too_long = sum(len(encode_chat(tokenizer, row["messages"], 10**6)["input_ids"]) > 64
                   for row in load_sft_rows(CONVERSATIONS))
    assert too_long > 0  # max_length=64 cuts some: the count is reported, not silent
    assert (summary["train_examples"], summary["train_truncated"], summary["train_dropped"]) == \
        (32, too_long, 0)
    assert {"eval_loss", "gold/mean_gold_score", "gold/format_adherence",
            "gold_before/mean_gold_score", "gold_before/format_adherence"} <= summary.keys()

    assert resumed["status"] == "completed"
    assert_same_weights(trained, model_weights(resumed["model_path"]))
    assert results(Registry(homes[1]).get(resumed["run"]).summary) == results(summary)

    # gold-score of an SFT run repeats the stage's own gold eval (its prompts, count and answer
    # length), so the numbers agree; a model without a gold eval gets the world's eval prompts.
    capsys.readouterr()
    assert main(["--home", str(homes[0]), "data", "gold-score", "sft:latest", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["prompts"], report["prompts_file"], report["max_new_tokens"]) == \
        (2, str(PROMPTS), 6)
    assert report["mean_gold_score"] == pytest.approx(summary["gold/mean_gold_score"], abs=1e-9)
    assert report["format_adherence"] == pytest.approx(summary["gold/format_adherence"], abs=1e-9)
    assert main(["--home", str(homes[0]), "data", "gold-score", "pretrain:latest", "--n", "3",
                 "--max-new-tokens", "5", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["prompts_file"].endswith("eval_prompts.jsonl") and report["prompts"] == 3
    assert {"mean_gold_score", "count_accuracy", "mean_length", "samples"} <= report.keys()
    assert len(report["samples"]) == 3 and report["max_new_tokens"] == 5


def test_lora_resumes_exactly_and_merged_export_matches_the_adapter(tmp_path, pretrained_home):
    from transformers import AutoModelForCausalLM

    from pipeline.models import load_causal_lm
    from pipeline.registry import Resolved

    args = sft_args("lora.enabled=true", "lora.r=4", "train.lr=1e-2")
    homes, straight, resumed = straight_and_killed(tmp_path, pretrained_home, args)
    adapter_dir = Path(straight["model_path"])
    assert_same_weights(model_weights(adapter_dir), model_weights(resumed["model_path"]))
    base = adapter_base(adapter_dir)  # named relative to the adapter: the home can move
    assert base == Registry(homes[0]).lookup("pretrain:latest").model_path

    merged_dir, copied_dir = tmp_path / "merged", tmp_path / "copied"
    assert main(["--home", str(homes[0]), "export", "sft:latest", str(merged_dir), "--merge"]) == 0
    assert main(["--home", str(homes[0]), "export", "sft:latest", str(copied_dir)]) == 0
    assert (copied_dir / "adapter_model.safetensors").read_bytes() == \
        (adapter_dir / "adapter_model.safetensors").read_bytes()
    assert json.loads((copied_dir / "adapter_config.json").read_text())[
        "base_model_name_or_path"] == base
    assert not (merged_dir / "adapter_config.json").exists()
    assert main(["--home", str(homes[0]), "export", "sft:latest", str(merged_dir)]) == 2  # exists

    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    adapter_model = load_causal_lm(Resolved(str(adapter_dir)), trainable_adapter=False).eval()
    base_model = AutoModelForCausalLM.from_pretrained(base).eval()
    ids = torch.tensor([[2, 40, 41, 42, 0, 3, 50, 51]])
    with torch.no_grad():
        expected = adapter_model(ids).logits
        assert torch.allclose(merged(ids).logits, expected, atol=1e-5)
        assert not torch.allclose(base_model(ids).logits, expected, atol=1e-3)  # LoRA did something


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                    encoding="utf-8")
    return path


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


GOOD = chat(("user", "How many legs do 2 cows have?"), ("assistant", "8 legs."))
BAD_INPUTS = {
    "no assistant turn": ([GOOD, chat(("user", "Hi"))], [],
                          "data.jsonl:2: the conversation has no assistant turn"),
    "empty answer": ([GOOD, chat(("user", "Hi"), ("assistant", ""))], [],
                     "data.jsonl:2: assistant turn 1 (counting all turns from 0) is empty"),
    "unknown role": ([GOOD, chat(("robot", "Hi"), ("assistant", "Hi"))], [],
                     "data.jsonl:2: unknown role 'robot'"),
    "all too long": ([chat(("user", "legs " * 80), ("assistant", "8."))], ["data.truncation=drop"],
                     "all 1 train conversations were dropped"),
    "bad config key": ([GOOD], ["data.max_lenght=64"], "did you mean 'data.max_length'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_exit_2_and_register_nothing(sft_home, capsys, case):
    rows, overrides, message = BAD_INPUTS[case]
    data = write_jsonl(sft_home.parent / "data.jsonl", rows)
    code = main(["--home", str(sft_home), *sft_args(f"data.train_files=[{data}]", *overrides)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0], err
    assert Registry(sft_home).runs("sft") == []


def third_party_model(directory: Path) -> int:
    """Write a hub-style model directory whose tokenizer has an EOS but no pad token, no chat
    template and no role tokens, like many base models; returns the tokenizer's size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.models import build_from_preset

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(CONVERSATIONS.read_text(encoding="utf-8").splitlines(), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                        model_max_length=256)
    tokenizer.save_pretrained(directory)
    build_from_preset("tiny", tokenizer, seed=0).save_pretrained(directory)
    return len(tokenizer)


def test_tokenizer_without_pad_or_template_is_completed_not_a_crash(sft_home, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.tokenizer import CHAT_TEMPLATE

    local = sft_home.parent / "third-party"
    vocab_size = third_party_model(local)
    code = main(["--home", str(sft_home), *sft_args(f"model.source={local}", "train.max_steps=2")])
    assert code == 0, capsys.readouterr().err
    run = Registry(sft_home).lookup("sft:latest")
    assert run.status == "completed" and run.parents == {"model": str(local)}
    tokenizer = AutoTokenizer.from_pretrained(run.model_path)
    assert tokenizer.chat_template == CHAT_TEMPLATE and tokenizer.pad_token == "<|endoftext|>"
    # The three role tokens were added, and the embeddings grew to hold them.
    model = AutoModelForCausalLM.from_pretrained(run.model_path)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == vocab_size + 3
