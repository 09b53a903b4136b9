"""Unit tests of the reward stage's pieces: collation, score position, bias shift, loading, data.

A two-layer Llama (hidden size 32) with a tokenizer trained on a few sentences stands in for the
parent model, so each test runs in milliseconds to a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.registry import Resolved
from pipeline.commands.score import disagreement, worst_prompts
from pipeline.data.packing import right_pad
from pipeline.reward_model import (build_reward_model, encode_answers, load_reward_model,
                                   read_marker, regroup, reward_tokenizer, score_sequences,
                                   score_texts, sequence_scores, set_score_bias)
from stages.reward import (Config, DataSection, collate_rankings, encode_rankings, hold_out,
                           ranking_loss, read_rows, LossSection)

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "data"
TEXTS = ["Three chickens have six legs.", "A cow says moo.", "一只鸡有两条腿。",
         "Spiders have eight legs each.", "Happy to help!"] * 4


def save_parent(directory: Path, pad_is_eos: bool = False) -> Path:
    """A tiny causal LM with the project's tokenizer (or one whose pad is its EOS)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.tokenizer import train_tokenizer

    tokenizer = train_tokenizer(TEXTS, vocab_size=300, model_max_length=64)
    if pad_is_eos:
        tokenizer.pad_token = tokenizer.eos_token
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, vocab_size=len(tokenizer), max_position_embeddings=64,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=None, attention_dropout=0.1)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    return save_parent(tmp_path_factory.mktemp("parent"))


@pytest.fixture(scope="module")
def reward_parts(parent):
    tokenizer = reward_tokenizer(str(parent))
    model = build_reward_model(Resolved(str(parent)), tokenizer, seed=0).eval()
    return model, tokenizer


def eos_scores(model, seqs: list[list[int]]) -> torch.Tensor:
    """The score head applied to the backbone's last hidden state at each sequence's final token,
    one unpadded sequence at a time: what `sequence_scores` must return for a padded batch."""
    values = []
    for seq in seqs:
        hidden = model.model(input_ids=torch.tensor([seq])).last_hidden_state  # (1, T, H)
        values.append(model.score(hidden[0, -1]).squeeze())
    return torch.stack(values)


# --- collation ---------------------------------------------------------------------------------


def test_right_pad_exact_tensors():
    input_ids, attention_mask = right_pad([[5, 6, 7], [8]], pad_id=1)
    assert input_ids.tolist() == [[5, 6, 7], [8, 1, 1]]
    assert attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_collate_flattens_every_answer_of_every_prompt_once():
    # Prompt 0 has K = 2, prompt 1 has K = 3 with a tie: variable K in one batch.
    sequences = [[[5, 6, 0], [7, 0]], [[8, 9, 10, 0], [11, 0], [12, 13, 0]]]
    batch = collate_rankings(sequences, [[0, 1], [1, 0, 1]], pad_id=1, shared_prompt=False)
    assert batch["input_ids"].tolist() == [[5, 6, 0, 1], [7, 0, 1, 1], [8, 9, 10, 0],
                                           [11, 0, 1, 1], [12, 13, 0, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1],
                                                [1, 1, 0, 0], [1, 1, 1, 0]]
    assert batch["group_ids"].tolist() == [0, 0, 1, 1, 1]
    assert batch["ranks"].tolist() == [0, 1, 1, 0, 1]


def test_ranking_loss_scores_all_answers_in_one_forward_pass():
    calls = []

    class FixedScores(torch.nn.Module):
        """Scores each row by its first token id, and records the batch it was given."""

        def forward(self, input_ids, attention_mask):
            calls.append(tuple(input_ids.shape))
            return type("Out", (), {"logits": input_ids[:, :1].float()})()

    # Prompt 0: answers scored 3 (rank 0) and 1 (rank 1): one pair with gap 2.
    # Prompt 1: scores 2, 4, 2 with ranks 1, 0, 1: two pairs with gap 2; the tie forms no pair.
    batch = collate_rankings([[[3, 0], [1, 0]], [[2, 0], [4, 0], [2, 0]]], [[0, 1], [1, 0, 1]], 9,
                             shared_prompt=False)
    loss, stats = ranking_loss(FixedScores(), batch, LossSection())
    assert calls == [(5, 2)]  # one forward, one row per answer (not one per pair side)
    assert loss.item() == pytest.approx(0.126928011042973)  # −log σ(2) for every pair
    assert stats["pairwise_accuracy"].item() == 1.0


def test_packed_micro_batch_holds_each_prompt_once_with_the_same_loss(reward_parts):
    model, tokenizer = reward_parts
    answers = [["Six.", "Three chickens have six legs.", "Happy to help!"], ["Moo.", "A cow."]]
    sequences = [encode_answers(tokenizer, [prompt] * len(texts), texts, 64)[0]
                 for prompt, texts in zip(["How many legs?", "What does a cow say?"], answers)]
    ranks = [[1, 0, 2], [0, 1]]
    packed = collate_rankings(sequences, ranks, tokenizer.pad_token_id, shared_prompt=True)
    flat = collate_rankings(sequences, ranks, tokenizer.pad_token_id, shared_prompt=False)
    assert packed["input_ids"].shape[0] <= 2 and flat["input_ids"].shape[0] == 5
    # The prompt's tokens are in the packed batch once, not once per answer.
    assert packed["attention_mask"].sum() < flat["attention_mask"].sum()
    loss = LossSection(margin=0.5, center_coef=0.1)
    with torch.no_grad():
        packed_loss, packed_stats = ranking_loss(model, packed, loss)
        flat_loss, flat_stats = ranking_loss(model, flat, loss)
    assert packed_loss.item() == pytest.approx(flat_loss.item(), abs=1e-6)
    assert packed_stats["score_mean"].item() == pytest.approx(flat_stats["score_mean"].item(),
                                                              abs=1e-6)


# --- where the score is read --------------------------------------------------------------------


def test_batched_scores_are_read_at_each_answers_eos_with_right_padding(reward_parts):
    model, tokenizer = reward_parts
    seqs, _ = encode_answers(tokenizer, ["How many legs?"] * 3,
                             ["Six.", "Three chickens have six legs.", "一只鸡有两条腿。"], 64)
    assert all(seq[-1] == tokenizer.eos_token_id for seq in seqs)
    assert len({len(seq) for seq in seqs}) == 3  # the batch really is padded
    input_ids, attention_mask = right_pad(seqs, model.config.pad_token_id)
    with torch.no_grad():
        batched = sequence_scores(model, input_ids, attention_mask)
        expected = eos_scores(model, seqs)
    torch.testing.assert_close(batched, expected, atol=1e-5, rtol=1e-5)


def test_pad_equal_to_eos_gets_a_pad_token_of_its_own(tmp_path):
    parent = save_parent(tmp_path / "parent", pad_is_eos=True)
    tokenizer = reward_tokenizer(str(parent))
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    model = build_reward_model(Resolved(str(parent)), tokenizer, seed=0).eval()
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    seqs, _ = encode_answers(tokenizer, ["How many legs?"] * 2, ["Six.", "Spiders have eight."], 64)
    input_ids, attention_mask = right_pad(seqs, model.config.pad_token_id)
    with torch.no_grad():
        expected = eos_scores(model, seqs)
        torch.testing.assert_close(sequence_scores(model, input_ids, attention_mask), expected,
                                   atol=1e-5, rtol=1e-5)
        # What the new pad token prevents: padding with the EOS hides the EOS itself.
        model.config.pad_token_id = tokenizer.eos_token_id
        eos_padded, _ = right_pad(seqs, tokenizer.eos_token_id)
        skipped = sequence_scores(model, eos_padded, attention_mask)
    assert not torch.allclose(skipped, expected, atol=1e-4)


def test_reward_model_has_no_dropout_and_a_one_label_head(reward_parts):
    model, _ = reward_parts
    assert model.config.num_labels == 1
    assert model.config.attention_dropout == 0.0  # the parent had 0.1
    assert all(layer.self_attn.attention_dropout == 0.0 for layer in model.model.layers)


def test_build_copies_the_parent_backbone_and_seeds_the_head(parent, reward_parts):
    from transformers import AutoModelForCausalLM

    model, tokenizer = reward_parts
    causal = AutoModelForCausalLM.from_pretrained(parent)
    for name, value in causal.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[name], value), name
    again = build_reward_model(Resolved(str(parent)), tokenizer, seed=0)
    other = build_reward_model(Resolved(str(parent)), tokenizer, seed=1)
    assert torch.equal(again.score.weight, model.score.weight)
    assert not torch.equal(other.score.weight, model.score.weight)


# --- normalization bias -------------------------------------------------------------------------


def test_set_score_bias_shifts_every_score_by_exactly_the_bias(parent):
    tokenizer = reward_tokenizer(str(parent))
    model = build_reward_model(Resolved(str(parent)), tokenizer, seed=0).eval()
    prompts, answers = ["Legs?"] * 3, ["Six.", "Eight legs.", "Moo."]
    raw = torch.tensor(score_texts(model, tokenizer, prompts, answers))
    set_score_bias(model, -raw.mean().item())
    shifted = torch.tensor(score_texts(model, tokenizer, prompts, answers))
    torch.testing.assert_close(shifted, raw - raw.mean(), atol=1e-6, rtol=0)
    assert abs(shifted.mean().item()) < 1e-6


def test_the_shift_is_taken_on_ended_answers_as_ppo_scores_them(monkeypatch):
    """The sequences scored are the sampled token ids (prompt as encoded for sampling, answer
    through its EOS), not a re-encoding; an answer that never ended is left out, as PPO gives it
    the missing-EOS penalty instead of a reward-model score."""
    from pipeline.generation import Answer
    import stages.reward as reward

    sampled = [Answer("six", True, [7, 8, 5, 2]), Answer("moo moo", False, [7, 8, 6, 6]),
               Answer("eight", True, [7, 8, 9, 9, 2])]
    monkeypatch.setattr(reward, "sample_policy", lambda policy, prompts, config: sampled)
    scored = []
    monkeypatch.setattr(reward, "score_sequences",
                        lambda model, seqs, batch_size, progress: scored.extend(seqs) or
                        [float(len(seq)) for seq in seqs])
    eval_set = reward.RankedSet(rows=[{"prompt": "Legs?", "ranks": [0, 1]}] * 3)
    result = reward.normalization_shift(None, eval_set, Config(), Resolved("parent"))
    assert scored == [[7, 8, 5, 2], [7, 8, 9, 9, 2]]
    assert result == {"shift": 4.5, "answers": "sft_samples", "count": 2, "unended": 1}


def test_load_reward_model_applies_the_marker_shift(tmp_path, reward_parts):
    model, tokenizer = reward_parts
    published = tmp_path / "reward"
    model.save_pretrained(published)
    tokenizer.save_pretrained(published)
    (published / "reward_model.json").write_text(json.dumps({"kind": "reward_model", "shift": 2.5}))
    loaded, loaded_tokenizer = load_reward_model(Resolved(str(published)))
    prompts, answers = ["Legs?"] * 2, ["Six.", "Moo."]
    raw = score_texts(model, tokenizer, prompts, answers)
    normalized = score_texts(loaded, loaded_tokenizer, prompts, answers)
    assert normalized == pytest.approx([value - 2.5 for value in raw], abs=1e-5)
    assert read_marker(published)["shift"] == 2.5


def test_load_reward_model_refuses_a_causal_lm(parent):
    with pytest.raises(UserError, match="is not a reward model"):
        load_reward_model(Resolved(str(parent)))


def test_load_reward_model_refuses_a_foreign_marker(tmp_path, reward_parts):
    model, tokenizer = reward_parts
    model.save_pretrained(tmp_path)
    (tmp_path / "reward_model.json").write_text('{"kind": "value_model"}')
    with pytest.raises(UserError, match="does not describe a reward model"):
        load_reward_model(Resolved(str(tmp_path)))


def test_score_sequences_keeps_input_order(reward_parts):
    model, tokenizer = reward_parts
    seqs, _ = encode_answers(tokenizer, ["Legs?"] * 3, ["Three chickens have six legs.", "Six.",
                                                         "Moo moo."], 64)
    one_by_one = [score_sequences(model, [seq])[0] for seq in seqs]
    assert score_sequences(model, seqs, batch_size=2) == pytest.approx(one_by_one, abs=1e-5)


# --- data path ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, fmt, ks, first_ranks", [
    ("reward_ranked.jsonl", "ranked", [4, 2, 2], [1, 2, 0, 1]),
    ("reward_pairwise.jsonl", "pairwise", [2, 2], [0, 1]),
    ("reward_transcripts.jsonl", "transcripts", [2, 2], [0, 1]),
    ("reward_scored.jsonl", "scored", [3, 3], [1, 0, 1]),
    ("reward_ultrafeedback.jsonl", "ultrafeedback", [3, 2], [0, 1, 0]),
])
@pytest.mark.parametrize("requested", ["auto", "explicit"])
def test_every_format_goes_through_the_stage_data_path(reward_parts, name, fmt, ks, first_ranks,
                                                       requested):
    _, tokenizer = reward_parts
    data = DataSection(format=fmt if requested == "explicit" else "auto", max_length=64)
    rows = read_rows([str(FIXTURES / name)], data)
    ranked = encode_rankings(tokenizer, rows, data, "train")
    assert [len(seqs) for seqs in ranked.sequences] == ks
    assert ranked.rows[0]["ranks"] == first_ranks
    assert all(seq[-1] == tokenizer.eos_token_id for seqs in ranked.sequences for seq in seqs)
    assert ranked.rows[0]["_where"] == f"{FIXTURES / name}:1"


def test_held_out_hub_rows_come_from_the_eval_split(monkeypatch):
    import datasets

    requested = []

    def load_dataset(name, config, split):
        requested.append((name, config, split))
        return datasets.Dataset.from_list([{"prompt": "p", "chosen": "a", "rejected": "b"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    data = DataSection(config="cfg", split="train", eval_split="test_prefs")
    read_rows(["someone/prefs"], data)
    read_rows(["someone/prefs"], data, held_out=True)
    assert requested == [("someone/prefs", "cfg", "train"), ("someone/prefs", "cfg", "test_prefs")]


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                    encoding="utf-8")
    return path


def test_truncation_keeps_the_end_and_counts(tmp_path, reward_parts):
    _, tokenizer = reward_parts
    long_prompt = "Three chickens have six legs. " * 10
    path = write_rows(tmp_path / "r.jsonl", [
        {"prompt": long_prompt, "responses": ["Six.", "Moo."], "ranking": [0, 1]},
        {"prompt": "Legs?", "responses": ["Six.", "Moo."], "ranking": [0, 1]}])
    full, _ = encode_answers(tokenizer, [long_prompt], ["Six."], 10_000)
    assert len(full[0]) > 24
    data = DataSection(max_length=24, truncation="truncate")
    kept = encode_rankings(tokenizer, read_rows([str(path)], data), data, "train")
    assert (kept.read, len(kept.rows), kept.truncated, kept.dropped) == (2, 2, 2, 0)
    assert kept.sequences[0][0] == full[0][-24:]  # the end survives, EOS included
    dropping = DataSection(max_length=24, truncation="drop")
    dropped = encode_rankings(tokenizer, read_rows([str(path)], dropping), dropping, "train")
    assert (dropped.read, len(dropped.rows), dropped.truncated, dropped.dropped) == (2, 1, 0, 1)
    assert dropped.report("train") == {"train_prompts": 1, "train_answers_truncated": 0,
                                       "train_prompts_dropped": 1}


def test_everything_dropped_is_a_user_error(tmp_path, reward_parts):
    _, tokenizer = reward_parts
    path = write_rows(tmp_path / "r.jsonl", [
        {"prompt": "Legs? " * 40, "responses": ["Six.", "Moo."], "ranking": [0, 1]}])
    data = DataSection(max_length=16, truncation="drop")
    with pytest.raises(UserError, match="all 1 eval prompts were dropped"):
        encode_rankings(tokenizer, read_rows([str(path)], data), data, "eval")


def test_special_token_in_an_answer_names_file_and_line(tmp_path, reward_parts):
    _, tokenizer = reward_parts
    path = write_rows(tmp_path / "r.jsonl", [
        {"prompt": "Legs?", "responses": ["Six.", "Moo."], "ranking": [0, 1]},
        {"prompt": "Legs?", "responses": ["Six<|end|>", "Moo."], "ranking": [0, 1]}])
    data = DataSection()
    with pytest.raises(UserError, match=rf"^{path}:2: .*special token"):
        encode_rankings(tokenizer, read_rows([str(path)], data), data, "train")


def test_hold_out_is_seeded_disjoint_and_complete():
    rows = [{"i": i} for i in range(20)]
    train, held = hold_out(rows, 0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert sorted(r["i"] for r in train + held) == list(range(20))
    assert hold_out(rows, 0.25, seed=3) == (train, held)
    assert hold_out(rows, 0.25, seed=4)[1] != held
    with pytest.raises(UserError, match="too few"):
        hold_out(rows[:1], 0.5, seed=0)


# --- score report helpers -----------------------------------------------------------------------


def test_disagreement_sums_how_far_worse_answers_score_above_better_ones():
    # ranks 0, 1, 2 scored 1.0, 3.0, 0.5: pair (0,1) inverted by 2.0, (0,2) fine, (1,2) fine.
    assert disagreement([1.0, 3.0, 0.5], [0, 1, 2]) == pytest.approx(2.0)
    assert disagreement([3.0, 1.0, 0.5], [0, 1, 2]) == 0.0
    assert disagreement([1.0, 2.0], [0, 0]) == 0.0  # a tie orders nothing


def test_worst_prompts_sorted_by_disagreement_and_only_disagreeing():
    rows = [{"prompt": p, "responses": ["a", "b"], "ranks": [0, 1], "_line": n}
            for n, p in enumerate(["agree", "mild", "strong"], start=1)]
    worst = worst_prompts(rows, [[1.0, 0.0], [0.0, 0.5], [0.0, 3.0]], "f.jsonl", n_worst=5)
    assert [item["prompt"] for item in worst] == ["strong", "mild"]
    assert worst[0]["where"] == "f.jsonl:3"
    assert worst[0]["answers"][1] == {"response": "b", "label_rank": 1, "score": 3.0}


def test_regroup():
    assert regroup([1, 2, 3, 4, 5], [2, 3]) == [[1, 2], [3, 4, 5]]


# --- configs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["tiny", "small", "base"])
def test_shipped_configs_validate(preset):
    config = load_config(Config, ROOT / "configs" / preset / "reward.yaml")
    assert config.model.source == "sft:latest"


def test_unknown_loss_key_suggests_the_right_one():
    with pytest.raises(UserError, match="did you mean 'loss.center_coef'"):
        load_config(Config, None, ["loss.centre_coef=0.1"])
