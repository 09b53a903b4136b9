"""Tests for the SFT stage's data path: adapters → encoding → collator and packing, with counts."""

import copy
import json
from pathlib import Path

import pytest
import torch

from pipeline.errors import UserError
from pipeline.data.prompts import read_prompts
from pipeline.tokenizer import IGNORE_INDEX, train_tokenizer
from pipeline.data.fingerprint import data_fingerprint
from pipeline.data.packing import pack_examples, pad_labeled
from pipeline.guard import check_chat_model, model_context
from stages.sft import DataSection, check_lora_start, encode_split, prepare_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "data"
CORPUS = [
    "How many legs do three chickens have?", "Three chickens have six legs.",
    "What sound does a cow make? A cow says moo.", "Sure! Happy to help.",
    "三只鸡有几条腿？", "三只鸡一共有六条腿。很高兴帮到你！", "你好！有什么可以帮你？", "不客气。",
    "Translate to English. cat. Give a synonym for big. large. Count to three. 1, 2, 3",
    "What is water? 水。 What is 3*3? 9. 天空是什么颜色？蓝色。 Name a primary colour. Red. Hi!",
]
END = "<|end|>"


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CORPUS, vocab_size=400, model_max_length=256)


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                    encoding="utf-8")
    return str(path)


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


def labelled_runs(tokenizer, input_ids: torch.Tensor, labels: torch.Tensor) -> list[str]:
    """Decode each maximal run of labelled positions; labels must copy input_ids there."""
    runs, current = [], []
    for token_id, label in zip(input_ids.tolist(), labels.tolist()):
        if label == IGNORE_INDEX:
            if current:
                runs.append(tokenizer.decode(current))
            current = []
        else:
            assert label == token_id
            current.append(token_id)
    if current:
        runs.append(tokenizer.decode(current))
    return runs


# --- collator ----------------------------------------------------------------------------------


def test_pad_batch_right_pads_with_ignored_labels():
    batch = pad_labeled([{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
                       {"input_ids": [8], "labels": [8]}], pad_id=1)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]


def test_pad_batch_keeps_a_real_eos_that_equals_the_pad_id():
    # pad == EOS (a tokenizer without its own pad token): the answer's EOS stays a label.
    batch = pad_labeled([{"input_ids": [4, 9, 2], "labels": [-100, 9, 2]},
                       {"input_ids": [4, 2], "labels": [-100, 2]}], pad_id=2)
    assert batch["labels"].tolist() == [[-100, 9, 2], [-100, 2, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("question, answer", [
    ("How many legs do three chickens have?", "Three chickens have six legs."),
    ("三只鸡有几条腿？", "三只鸡一共有六条腿。很高兴帮到你！"),
])
def test_labels_cover_exactly_the_answer_through_the_collator(tokenizer, tmp_path, question,
                                                              answer):
    # A shorter second row, so the batch has padding to check.
    path = write_rows(tmp_path / "sft.jsonl", [chat(("user", question), ("assistant", answer)),
                                               chat(("user", "Hi"), ("assistant", "Hi!"))])
    split = encode_split(tokenizer, [path], DataSection(max_length=256), "train")
    batch = pad_labeled(split.examples, tokenizer.pad_token_id)
    assert labelled_runs(tokenizer, batch["input_ids"][0], batch["labels"][0]) == [answer + END]
    assert labelled_runs(tokenizer, batch["input_ids"][1], batch["labels"][1]) == ["Hi!" + END]
    # The unlabelled part of the first row is exactly the framed question and the answer header.
    first = batch["input_ids"][0][batch["labels"][0] == IGNORE_INDEX]
    assert tokenizer.decode(first) == f"<|user|>\n{question}{END}\n<|assistant|>\n\n"
    padding = batch["attention_mask"][1] == 0
    assert padding.any() and (batch["labels"][1][padding] == IGNORE_INDEX).all()


# --- packing -----------------------------------------------------------------------------------


def test_packing_cuts_the_stream_into_blocks_and_keeps_labels():
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
                {"input_ids": [4, 5], "labels": [-100, 5]},
                {"input_ids": [6, 7, 8, 9], "labels": [-100, -100, -100, 9]}]
    blocks = pack_examples(examples, block_size=3)
    # Stream 1..9; the block [7, 8, 9] keeps its one answer token, none is dropped.
    assert blocks == [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
                      {"input_ids": [4, 5, 6], "labels": [-100, 5, -100]},
                      {"input_ids": [7, 8, 9], "labels": [-100, -100, 9]}]


def test_packing_leaves_out_blocks_without_answer_tokens():
    examples = [{"input_ids": [1, 2, 3, 4, 5], "labels": [-100, -100, -100, 4, 5]}]
    assert pack_examples(examples, block_size=2) == [
        {"input_ids": [3, 4], "labels": [-100, 4]}, {"input_ids": [5], "labels": [5]}]


def test_packed_conversations_keep_their_answer_masks(tokenizer):
    path = str(FIXTURES / "sft_messages.jsonl")
    split = encode_split(tokenizer, [path], DataSection(max_length=256), "train")
    blocks = pack_examples(split.examples, block_size=16)
    assert all(len(block["input_ids"]) <= 16 for block in blocks)
    stream_ids = [t for block in blocks for t in block["input_ids"]]
    stream_labels = [t for block in blocks for t in block["labels"]]
    runs = labelled_runs(tokenizer, torch.tensor(stream_ids), torch.tensor(stream_labels))
    assert "".join(runs) == "".join(f"{a}{END}" for a in ("4", "你好！有什么可以帮你？", "不客气。"))


# --- adapters, truncation, errors ----------------------------------------------------------------

ADAPTER_ANSWERS = {
    "messages": ["4", "你好！有什么可以帮你？", "不客气。"],
    "alpaca": ["cat", "large", "1, 2, 3"],
    "prompt_completion": ["Red.", "水。", "Hi!"],
    "sharegpt": ["9", "蓝色。"],
    "transcripts": ["Hello.", "Two chickens have 4 legs.", "四条。"],  # every assistant turn
}


@pytest.mark.parametrize("fmt", list(ADAPTER_ANSWERS))
@pytest.mark.parametrize("declared", [False, True])
def test_each_format_runs_through_the_data_path(tokenizer, fmt, declared):
    path = str(FIXTURES / f"sft_{fmt}.jsonl")
    data = DataSection(format=fmt if declared else "auto", max_length=256)
    split = encode_split(tokenizer, [path], data, "train")
    batch = pad_labeled(split.examples, tokenizer.pad_token_id)
    runs = [run for row in range(len(split.examples))
            for run in labelled_runs(tokenizer, batch["input_ids"][row], batch["labels"][row])]
    assert runs == [answer + END for answer in ADAPTER_ANSWERS[fmt]]
    assert (split.rows, split.truncated, split.dropped) == (len(split.examples), 0, 0)


def test_hub_data_sets_are_read_with_the_configured_config_and_splits(tokenizer, monkeypatch):
    import datasets

    requested = []

    def load_dataset(name, config, split):
        requested.append((name, config, split))
        return datasets.Dataset.from_list([{"prompt": "Hi", "completion": "Hello."}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = DataSection(config="helpful-base", split="train[:10%]", eval_split="validation")
    encode_split(tokenizer, ["Anthropic/hh-rlhf"], data, "train")
    encode_split(tokenizer, ["Anthropic/hh-rlhf"], data, "eval")
    assert requested == [("Anthropic/hh-rlhf", "helpful-base", "train[:10%]"),
                         ("Anthropic/hh-rlhf", "helpful-base", "validation")]


def test_columns_mapping_reads_the_users_names(tokenizer, tmp_path):
    path = write_rows(tmp_path / "qa.jsonl", [{"question": "Hi", "answer": "Hi!"}])
    data = DataSection(format="prompt_completion",
                       columns={"prompt": "question", "completion": "answer"})
    example = encode_split(tokenizer, [path], data, "train").examples[0]
    ids, labels = torch.tensor(example["input_ids"]), torch.tensor(example["labels"])
    assert labelled_runs(tokenizer, ids, labels) == ["Hi!" + END]


def long_and_short_rows(tmp_path: Path) -> str:
    long_answer = "Three chickens have six legs. " * 10
    return write_rows(tmp_path / "mixed.jsonl", [
        {"prompt": "Hi", "completion": "Hi!"},
        {"prompt": "How many legs do three chickens have?", "completion": long_answer},
    ])


def test_truncate_counts_and_keeps_the_start(tokenizer, tmp_path):
    split = encode_split(tokenizer, [long_and_short_rows(tmp_path)],
                         DataSection(max_length=24, truncation="truncate"), "train")
    assert (split.rows, len(split.examples), split.truncated, split.dropped) == (2, 2, 1, 0)
    assert len(split.examples[1]["input_ids"]) == 24
    assert split.counts() == {"train_examples": 2, "train_truncated": 1, "train_dropped": 0}
    assert split.describe(24) == "train 2 of 2 conversations (1 truncated to 24 tokens, 0 dropped)"


def test_drop_counts_the_dropped_rows(tokenizer, tmp_path):
    split = encode_split(tokenizer, [long_and_short_rows(tmp_path)],
                         DataSection(max_length=24, truncation="drop"), "train")
    assert (split.rows, len(split.examples), split.truncated, split.dropped) == (2, 1, 0, 1)


def test_every_row_dropped_is_a_user_error(tokenizer, tmp_path):
    path = write_rows(tmp_path / "long.jsonl", [{"prompt": "Hi " * 30, "completion": "Hi!"}])
    with pytest.raises(UserError, match=r"all 1 train conversations were dropped.*max_length=8"):
        encode_split(tokenizer, [path], DataSection(max_length=8, truncation="drop"), "train")


@pytest.mark.parametrize("row, message", [
    (chat(("user", "Hi")), "no assistant turn"),
    (chat(("user", "Hi"), ("assistant", " ")), "assistant turn 1 .* is empty"),
    (chat(("robot", "Hi"), ("assistant", "Hi")), "unknown role 'robot'"),
    (chat(("user", "Say <|end|> please"), ("assistant", "ok")), "special token '<\\|end\\|>'"),
])
def test_bad_rows_name_file_and_line(tokenizer, tmp_path, row, message):
    path = write_rows(tmp_path / "bad.jsonl", [chat(("user", "Hi"), ("assistant", "Hi!")), row])
    with pytest.raises(UserError, match=f"^{path}:2: .*{message}"):
        encode_split(tokenizer, [path], DataSection(max_length=64), "train")


def test_max_length_beyond_the_context_is_a_user_error(tokenizer, tmp_path):
    check_chat_model(str(tmp_path), tokenizer, "model.source", 256)  # no config: the tokenizer's
    with pytest.raises(UserError, match="max_length=512 is longer than the model's context of 256"):
        check_chat_model(str(tmp_path), tokenizer, "model.source", 512)
    # A model's position limit counts when it is below the tokenizer's (as it often is on the hub).
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 128}))
    with pytest.raises(UserError, match="max_length=256 is longer than the model's context of 128"):
        check_chat_model(str(tmp_path), tokenizer, "model.source", 256)


@pytest.mark.parametrize("config, context", [
    ({"n_positions": 64}, 64),                                      # GPT-2's name for it
    ({"text_config": {"max_position_embeddings": 96}}, 96),         # a multimodal config
    ({"max_position_embeddings": 4096}, 256),                       # the tokenizer's is smaller
])
def test_model_context_is_the_smaller_of_model_and_tokenizer(config, context, tokenizer, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert model_context(str(tmp_path), tokenizer) == context
    # A LoRA adapter's context is its base model's.
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": str(tmp_path)}))
    assert model_context(str(adapter), tokenizer) == context


def test_tokenizer_without_eos_is_refused_before_training(tokenizer, tmp_path):
    no_eos = copy.deepcopy(tokenizer)
    no_eos.eos_token = None
    with pytest.raises(UserError, match="^model.source: the tokenizer at .* has no EOS token"):
        check_chat_model(str(tmp_path), no_eos, "model.source", 64)


def test_fingerprint_follows_content_and_role(tmp_path):
    a = write_rows(tmp_path / "a.jsonl", [{"prompt": "Hi", "completion": "Hi!"}])
    base = data_fingerprint([a], [], None)
    assert data_fingerprint([a], [], None) == base
    assert data_fingerprint([], [a], None) != base
    assert data_fingerprint([a, "owner/hub-set"], [], None) != base
    write_rows(tmp_path / "a.jsonl", [{"prompt": "Hi", "completion": "Hello!"}])
    assert data_fingerprint([a], [], None) != base


def test_read_prompts_takes_the_first_n_and_names_bad_lines(tmp_path):
    path = write_rows(tmp_path / "prompts.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"text": "c"}])
    assert read_prompts(path, 2) == ["a", "b"]
    with pytest.raises(UserError, match=f"^{path}:3: expected a non-empty text field 'prompt'"):
        read_prompts(path, 3)


# --- the starting model ---------------------------------------------------------------------------


@pytest.fixture
def tiny_model(tokenizer):
    from pipeline.models import build_from_preset
    return build_from_preset("tiny", tokenizer, seed=0)


def test_added_tokens_grow_the_embeddings(tokenizer, tiny_model):
    from pipeline.config import LoraConfig
    from pipeline.registry import Resolved

    rows = tiny_model.get_input_embeddings().num_embeddings
    tokenizer = copy.deepcopy(tokenizer)  # the module's tokenizer stays as it is
    tokenizer.add_special_tokens({"extra_special_tokens": ["<|tool|>"]})
    assert len(tokenizer) == rows + 1
    model = prepare_model(tiny_model, tokenizer, LoraConfig(), Resolved("/unused"))
    assert model.get_input_embeddings().num_embeddings == rows + 1
    assert model.get_output_embeddings().weight.shape[0] == rows + 1


def test_lora_adapter_names_the_parent_directory_absolute(tokenizer, tiny_model, tmp_path,
                                                          monkeypatch):
    from pipeline.config import LoraConfig
    from pipeline.registry import Resolved

    (tmp_path / "parent").mkdir()
    monkeypatch.chdir(tmp_path)
    model = prepare_model(tiny_model, tokenizer, LoraConfig(enabled=True, r=2), Resolved("parent"))
    assert model.peft_config["default"].base_model_name_or_path == str(tmp_path / "parent")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)


def test_lora_refuses_an_adapter_parent_or_new_tokens(tokenizer, tiny_model, tmp_path):
    from pipeline.config import LoraConfig
    from pipeline.registry import Resolved

    lora = LoraConfig(enabled=True)
    tiny_model.config.save_pretrained(tmp_path / "full")
    check_lora_start(Resolved(str(tmp_path / "full")), tokenizer, lora, trust_remote_code=False)
    check_lora_start(Resolved(str(tmp_path / "full")), tokenizer, LoraConfig(), False)
    tiny_model.config.vocab_size = len(tokenizer) - 2
    tiny_model.config.save_pretrained(tmp_path / "small-vocab")
    with pytest.raises(UserError, match="needs 2 new token"):
        check_lora_start(Resolved(str(tmp_path / "small-vocab")), tokenizer, lora, False)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match="is a LoRA adapter; export it merged first"):
        check_lora_start(Resolved(str(tmp_path / "adapter")), tokenizer, lora, False)
