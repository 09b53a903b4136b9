"""The labelers (`pipeline.labelers`) and the row building of `pipeline.data.collect`, against
values worked out by hand. No model: a scripted stand-in returns fixed answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.data.collect import CollectCounts, collect, distinct_texts, write_collected
from pipeline.data.formats import load_ranked_rows
from pipeline.errors import UserError
from pipeline.generation import Answer, SamplingConfig
from pipeline.labelers import (GoldLabeler, PeopleLabeler, agreement_counts, held_out_pairs,
                               make_labeler, plackett_luce_order, question_text, tie_groups)
from pipeline.world.gold import gold_score

QUESTION = "How many legs do 2 cows have in total?"  # 2 × 4 = 8
RIGHT = "Sure! 2 cows have 8 legs in total. Hope this helps!"
CURT = "8."
WRONG = "Sure! 2 cows have 10 legs in total. Hope this helps!"


def test_tie_groups_put_equal_scores_together_best_first():
    assert tie_groups([0.2, 0.8, 0.2]) == [[1], [0, 2]]
    assert tie_groups([0.5, 0.5]) == [[0, 1]]


def test_plackett_luce_at_temperature_zero_is_the_gold_order():
    rng = np.random.default_rng(0)
    assert plackett_luce_order([0.2, 1.0, 0.6], 0.0, rng) == [1, 2, 0]


def test_plackett_luce_at_a_low_temperature_keeps_the_gold_order():
    # Gaps of 0.4 at temperature 0.01 are 40 nats apart: no draw of 200 reorders them.
    rng = np.random.default_rng(0)
    assert all(plackett_luce_order([0.2, 1.0, 0.6], 0.01, rng) == [1, 2, 0] for _ in range(200))


def test_plackett_luce_first_place_follows_the_softmax():
    # Two values 1 apart at temperature 1: the better one comes first with e / (1 + e) = 0.7311.
    rng = np.random.default_rng(0)
    draws = 20_000
    first = sum(plackett_luce_order([1.0, 0.0], 1.0, rng)[0] == 0 for _ in range(draws))
    assert first / draws == pytest.approx(math.e / (1 + math.e), abs=0.01)


def test_agreement_counts_leave_equal_scores_out():
    # Scores 0.9, 0.5, 0.5, 0.1: five ordered pairs (1-2 tie). Labeled [[1], [0], [2], [3]]
    # orders 0 below 1: pair (0,1) disagrees, and so does none of the other four.
    assert agreement_counts([[1], [0], [2], [3]], [0.9, 0.5, 0.5, 0.1]) == (4, 5)
    assert agreement_counts([[0], [1, 2], [3]], [0.9, 0.5, 0.5, 0.1]) == (5, 5)


def test_gold_labeler_ranks_by_gold_and_ties_equal_scores():
    answers = [WRONG, RIGHT, CURT, "Sure! Two cows have 8 legs in total. Hope this helps!"]
    scores = [gold_score(QUESTION, a) for a in answers]
    assert scores[1] == scores[3] > scores[2] > scores[0]
    labeler = GoldLabeler(temperature=0.0)
    assert labeler.rank(QUESTION, answers) == [[1, 3], 2, 0]
    assert labeler.report()["agreement_with_gold"] == 1.0
    assert labeler.report()["pairs"] == 5


def test_gold_labeler_noise_lowers_its_reported_agreement():
    answers = [WRONG, RIGHT, CURT]
    labeler = GoldLabeler(temperature=1.0, seed=0)
    for _ in range(300):
        labeler.rank(QUESTION, answers)
    report = labeler.report()
    assert report["pairs"] == 900
    assert 0.5 < report["agreement_with_gold"] < 0.8


def test_gold_labeler_refuses_held_out_prompts():
    assert held_out_pairs("How many legs do 3 chickens have in total?") == [("chicken", 3)]
    assert held_out_pairs("How many legs do 2 chickens have in total?") == []
    assert held_out_pairs("What does a cow say?") == []
    with pytest.raises(UserError, match=r"prompt 2 asks about held-out legs \(3 chicken\)"):
        GoldLabeler().check_prompts([QUESTION, "How many legs do 3 chickens have in total?"])


def test_a_chat_prompt_is_judged_by_its_last_user_message():
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": QUESTION}]
    assert question_text(chat) == QUESTION


def test_unknown_labeler_names_the_ones_there_are():
    with pytest.raises(UserError, match="unknown labeler 'robot'; choose one of: gold, people"):
        make_labeler("robot")


def test_distinct_texts_count_what_they_leave_out():
    counts = CollectCounts()
    assert distinct_texts(["a", "", "b", "a", "c"], counts) == ["a", "b", "c"]
    assert (counts.empty, counts.repeated) == (1, 1)


class ScriptedAnswers:
    """Stands in for `sample_answers`: hands out the scripted answers in order."""

    def __init__(self, answers: list[Answer]):
        self.answers = answers

    def __call__(self, model, tokenizer, prompts, sampling, seed, max_prompt_tokens, progress):
        assert len(prompts) == len(self.answers)
        return self.answers


def collect_scripted(monkeypatch, answers: list[Answer], prompts: list, k: int, labeler):
    monkeypatch.setattr("pipeline.data.collect.sample_answers", ScriptedAnswers(answers))
    return collect(None, None, prompts, k, SamplingConfig(), labeler)


def test_collect_writes_ranked_rows_the_reward_stage_reads(monkeypatch, tmp_path):
    other = "How many legs do 4 ducks have in total?"
    answers = [Answer(WRONG, True), Answer(RIGHT, True), Answer(CURT, False),  # prompt 1
               Answer("8 legs", True), Answer("8 legs", True), Answer("", True)]  # prompt 2
    collected = collect_scripted(monkeypatch, answers, [QUESTION, other], 3, GoldLabeler())
    counts = collected.counts
    assert (counts.prompts, counts.answers, counts.unended) == (2, 6, 1)
    assert (counts.repeated, counts.empty, counts.too_few_answers, counts.rows) == (1, 1, 1, 1)
    assert collected.rows == [{"prompt": QUESTION, "responses": [WRONG, RIGHT, CURT],
                               "ranking": [1, 2, 0]}]
    out = tmp_path / "collected.jsonl"
    sidecar = write_collected(out, collected, {"policy": {"ref": "sft:latest"}})
    assert [row["ranks"] for row in load_ranked_rows(out)] == [[2, 0, 1]]
    record = json.loads(sidecar.read_text())
    assert record["policy"] == {"ref": "sft:latest"} and record["counts"]["rows"] == 1
    assert sidecar.name == "collected.jsonl.provenance"


def test_collect_leaves_rows_unranked_for_people(monkeypatch):
    answers = [Answer(RIGHT, True), Answer(CURT, True)]
    collected = collect_scripted(monkeypatch, answers, [QUESTION], 2, PeopleLabeler())
    assert collected.rows == [{"prompt": QUESTION, "responses": [RIGHT, CURT]}]


def test_collect_leaves_out_prompts_whose_answers_all_tie(monkeypatch):
    same_score = [Answer(RIGHT, True), Answer("Sure! Two cows have 8 legs in total. Hope this "
                                              "helps!", True)]
    collected = collect_scripted(monkeypatch, same_score, [QUESTION], 2, GoldLabeler())
    assert collected.rows == [] and collected.counts.all_tied == 1


def test_collect_refuses_a_policy_that_never_ends(monkeypatch):
    answers = [Answer(RIGHT, False), Answer(CURT, False)]
    with pytest.raises(UserError, match="ended none of its 2 answers"):
        collect_scripted(monkeypatch, answers, [QUESTION], 2, GoldLabeler())


@pytest.mark.parametrize("k, prompts, message", [
    (1, [QUESTION], "k=1 answers per prompt: a ranking needs at least 2"),
    (4, [], "no prompts to collect answers for"),
])
def test_collect_refuses_what_cannot_be_ranked(k, prompts, message):
    with pytest.raises(UserError, match=message):
        collect(None, None, prompts, k, SamplingConfig(), GoldLabeler())


def test_sample_answers_says_which_answers_ended(monkeypatch):
    from pipeline.generation import sample_answers

    class EndsAfterTwo(torch.nn.Module):
        """Not a model: `generate` returns two answers, one ending in EOS (id 2), then pad (0)."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def generate(self, input_ids, attention_mask, **kwargs):
            new = torch.tensor([[5, 2, 0], [5, 6, 7]])
            return torch.cat([input_ids, new], dim=1)

    class Tokenizer:
        eos_token_id, pad_token_id = 2, 0

        def decode(self, row, skip_special_tokens):
            return " ".join(str(int(t)) for t in row if int(t) not in (0, 2))

    monkeypatch.setattr("pipeline.generation.encode_prompt", lambda tokenizer, prompt, limit: [9])
    answers = sample_answers(EndsAfterTwo(), Tokenizer(), ["a", "b"], SamplingConfig())
    # The scored sequence is the prompt, then the answer through its EOS: the padding after it goes.
    assert answers == [Answer("5", True, [9, 5, 2]), Answer("5 6 7", False, [9, 5, 6, 7])]


def test_label_shows_the_answers_a_collected_row_brings(tmp_path):
    from pipeline.data.prompts import collected_answers, read_chat_prompts

    path = tmp_path / "collected.jsonl"
    path.write_text(json.dumps({"prompt": "p0"}) + "\n" +
                    json.dumps({"prompt": "p1", "responses": ["a", "b"]}) + "\n")
    assert read_chat_prompts(path)[1] == "p1"
    assert collected_answers(path) == {1: ["a", "b"]}
    path.write_text(json.dumps({"prompt": "p", "responses": ["a", "a"]}) + "\n")
    with pytest.raises(UserError, match=r"collected.jsonl:1: 'responses' must be a list of two"):
        collected_answers(path)


def test_a_collection_is_made_once_per_key_and_then_read_from_the_cache(tmp_path):
    from pipeline.data.collect import Collected, cached_collection, read_provenance
    from pipeline.registry import Registry

    registry = Registry(tmp_path / "home")
    made = []

    def make():
        made.append(1)
        rows = [{"prompt": QUESTION, "responses": [RIGHT, CURT], "ranking": [0, 1]}]
        return Collected(rows, CollectCounts(rows=1)), {"policy": {"run": "sft-1"}}

    first = cached_collection(registry, {"policy": "sft-1", "k": 2}, make)
    again = cached_collection(registry, {"policy": "sft-1", "k": 2}, make)
    other = cached_collection(registry, {"policy": "sft-2", "k": 2}, make)
    assert first == again != other and len(made) == 2
    assert [row["ranks"] for row in load_ranked_rows(first)] == [[0, 1]]
    assert read_provenance(first)["key"] == {"policy": "sft-1", "k": 2}
    registry.close()
