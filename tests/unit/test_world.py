"""The embedded world's files: deterministic, held out where promised, well-formed, shipped as generated."""

import json
import re
from pathlib import Path

import pytest

from pipeline.errors import EXIT_USER_ERROR, UserError
from pipeline.world.gold import count_correct, find_mentions, format_ok, gold_score, parse_question
from pipeline.world.farm import (ANIMALS, COUNTS, HELD_OUT_COUNTS, SIZES, chinese_number,
                                 english_number, write_world)

REPO = Path(__file__).resolve().parents[2]
TRAINING_FILES = ("pretrain", "sft_train", "reward_train", "ppo_prompts")
EVAL_FILES = ("sft_eval", "reward_eval", "eval_prompts")
CJK = re.compile(r"[\u4e00-\u9fff]")
# A leg answer that shows its working: the legs of each animal, then the arithmetic.
WORKED = re.compile(r"\beach\b|每|×", re.IGNORECASE)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    return write_world(tmp_path_factory.mktemp("world"), seed=0, size="tiny")


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def texts(row: dict) -> list[str]:
    """Every string a row holds: prose, chat turns, prompt and responses."""
    if "text" in row:
        return [row["text"]]
    if "messages" in row:
        return [message["content"] for message in row["messages"]]
    return [row["prompt"], *row.get("responses", [])]


def prompt_of(row: dict) -> str:
    return row["messages"][0]["content"] if "messages" in row else row["prompt"]


def flat(ranking: list) -> list[int]:
    return [i for item in ranking for i in (item if isinstance(item, list) else [item])]


def test_writes_every_file_with_the_size_table_row_counts(world):
    assert list(world) == list(SIZES["tiny"])
    for name, path in world.items():
        assert path.name == f"{name}.jsonl"
        assert len(rows(path)) == SIZES["tiny"][name], name


def test_same_seed_gives_byte_identical_files_and_another_seed_does_not(world, tmp_path):
    again = write_world(tmp_path / "again", seed=0, size="tiny")
    other = write_world(tmp_path / "other", seed=1, size="tiny")
    for name, path in world.items():
        assert again[name].read_bytes() == path.read_bytes(), name
        assert other[name].read_bytes() != path.read_bytes(), name
    assert b"\r\n" not in world["pretrain"].read_bytes()


def test_training_files_never_mention_a_held_out_pair_but_do_mention_all_others(world):
    seen = {pair for name in TRAINING_FILES for row in rows(world[name]) for text in texts(row)
            for pair in find_mentions(text)}
    held_out = set(HELD_OUT_COUNTS.items())
    assert not seen & held_out
    every_other = {(name, count) for name in ANIMALS for count in COUNTS} - held_out
    assert every_other <= seen


def test_every_eval_leg_question_asks_a_combination_no_training_file_contains(world):
    seen = {pair for name in TRAINING_FILES for row in rows(world[name]) for text in texts(row)
            for pair in find_mentions(text)}
    trained_groups = {parse_question(prompt_of(row)).group for name in TRAINING_FILES[1:]
                      for row in rows(world[name])}
    for name in EVAL_FILES:
        questions = [parse_question(prompt_of(row)) for row in rows(world[name])]
        leg_questions = [q for q in questions if q.group]
        assert len(leg_questions) >= 0.5 * len(questions), name
        for question in leg_questions:
            assert set(question.group) - seen, (name, question)
            assert question.group not in trained_groups
    assert all(parse_question(row["prompt"]).group for row in rows(world["eval_prompts"]))


def test_gold_can_parse_every_prompt_the_world_writes(world):
    for name in ("sft_train", "sft_eval", "reward_train", "reward_eval", "ppo_prompts", "eval_prompts"):
        for row in rows(world[name]):
            assert parse_question(prompt_of(row)) is not None, (name, prompt_of(row))


@pytest.mark.parametrize("k", [2, 4, 9])
def test_reward_rows_are_valid_rankings(tmp_path, k):
    files = write_world(tmp_path, seed=3, size="tiny", k=k)
    for name in ("reward_train", "reward_eval"):
        for row in rows(files[name]):
            assert set(row) == {"prompt", "responses", "ranking"}
            responses = row["responses"]
            assert len(responses) == k
            assert all(isinstance(r, str) and r.strip() for r in responses)
            assert len(set(responses)) == k, row
            assert sorted(flat(row["ranking"])) == list(range(k)), row
            assert len(row["ranking"]) >= 2, row  # something to prefer
            groups = [item for item in row["ranking"] if isinstance(item, list)]
            assert all(len(group) >= 2 and group == sorted(group) for group in groups)


def test_default_reward_rows_include_ties_and_shuffled_positions(world):
    reward = rows(world["reward_train"])
    assert any(isinstance(item, list) for row in reward for item in row["ranking"])
    best_positions = {flat(row["ranking"])[0] for row in reward}
    assert best_positions == {0, 1, 2, 3}


def test_rank_one_answers_score_clearly_above_the_last_rank_and_never_below_a_later_rank(world):
    first, last = [], []
    for row in rows(world["reward_eval"]):
        scores = [[gold_score(row["prompt"], row["responses"][i]) for i in
                   (item if isinstance(item, list) else [item])] for item in row["ranking"]]
        for better, worse in zip(scores, scores[1:]):
            assert min(better) >= max(worse), row
        first += scores[0]
        last += scores[-1]
    assert sum(first) / len(first) - sum(last) / len(last) > 0.5


def test_right_leg_answers_that_show_the_working_rank_above_right_answers_without_it(world):
    both_kinds = 0
    for row in rows(world["reward_train"]):
        question = parse_question(row["prompt"])
        if not question.group:
            continue
        rank = {i: position for position, item in enumerate(row["ranking"])
                for i in (item if isinstance(item, list) else [item])}
        right = [i for i, answer in enumerate(row["responses"])
                 if count_correct(row["prompt"], answer) and format_ok(answer)]
        worked = [i for i in right if WORKED.search(row["responses"][i])]
        bare = [i for i in right if i not in worked]
        assert all(rank[w] < rank[b] for w in worked for b in bare), row
        # The working never restates the asked group ("seven goats"), only counts and legs.
        assert not any(find_mentions(row["responses"][i]) for i in worked), row
        both_kinds += bool(worked and bare)
    assert both_kinds > 500


@pytest.mark.parametrize("name", list(SIZES["tiny"]))
def test_about_a_quarter_of_every_file_is_chinese(world, name):
    file_rows = rows(world[name])
    share = sum(bool(CJK.search(" ".join(texts(row)))) for row in file_rows) / len(file_rows)
    assert 0.15 < share < 0.35, share


def test_pretrain_is_prose_with_facts_and_arithmetic_and_no_chat_format(world):
    docs = [row["text"] for row in rows(world["pretrain"])]
    assert all(set(row) == {"text"} for row in rows(world["pretrain"]))
    chat = re.compile(r"\?|？|<\||\b(?:user|assistant|human|system)\s*:", re.IGNORECASE)
    assert not [doc for doc in docs if chat.search(doc)]
    corpus = "\n".join(docs)
    for statement in ("says moo", "Each spider has 8 legs", "牛有4条腿。", "have 12 legs", "一共有"):
        assert statement in corpus, statement


def test_sft_mixes_polite_curt_and_a_few_wrong_demonstrations(world):
    sft = rows(world["sft_train"])
    assert all([m["role"] for m in row["messages"]] == ["user", "assistant"] for row in sft)
    pairs = [(row["messages"][0]["content"], row["messages"][1]["content"]) for row in sft]
    scores = [gold_score(prompt, answer) for prompt, answer in pairs]
    polite_and_right = sum(score == 1.0 for score in scores) / len(scores)
    curt_and_right = sum(score in (0.8, 0.9) for score in scores) / len(scores)
    judged = [count_correct(prompt, answer) for prompt, answer in pairs]
    wrong = judged.count(False) / (len(judged) - judged.count(None))
    assert 0.6 < polite_and_right < 0.8
    leg_answers = [answer for (prompt, answer), score in zip(pairs, scores)
                   if score == 1.0 and parse_question(prompt).group]
    assert 0.4 < sum(bool(WORKED.search(a)) for a in leg_answers) / len(leg_answers) < 0.6
    assert 0.15 < curt_and_right < 0.3
    assert 0.03 < wrong < 0.15


def test_prompt_files_hold_distinct_bare_prompts(world):
    for name in ("ppo_prompts", "eval_prompts"):
        file_rows = rows(world[name])
        assert all(set(row) == {"prompt"} for row in file_rows)
        assert len({row["prompt"] for row in file_rows}) == len(file_rows)


def test_shipped_reward_data_is_the_generator_output(world):
    assert (REPO / "reward_data" / "train.jsonl").read_bytes() == world["reward_train"].read_bytes()
    assert (REPO / "reward_data" / "eval.jsonl").read_bytes() == world["reward_eval"].read_bytes()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"size": "huge"}, "unknown world size 'huge'; choose one of: tiny, small"),
    ({"k": 1}, "must be an integer from 2 to 9, got 1"),
    ({"k": 10}, "must be an integer from 2 to 9, got 10"),
])
def test_bad_arguments_are_user_errors(tmp_path, kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)):
        write_world(tmp_path, **kwargs)


def test_data_world_command_writes_files_and_reports_bad_k(tmp_path, capsys):
    from pipeline.commands.cli import main

    assert main(["data", "world", "--out", str(tmp_path / "w"), "--seed", "2"]) == 0
    assert (tmp_path / "w" / "reward_train.jsonl").exists()
    assert main(["data", "world", "--out", str(tmp_path / "w"), "--k", "12"]) == EXIT_USER_ERROR
    assert "from 2 to 9, got 12" in capsys.readouterr().err


@pytest.mark.parametrize(("n", "english", "chinese"), [
    (0, "zero", "零"), (2, "two", "两"), (10, "ten", "十"), (12, "twelve", "十二"),
    (24, "twenty-four", "二十四"), (40, "forty", "四十"), (105, "one hundred and five", "一百零五"),
    (110, "one hundred and ten", "一百一十"), (200, "two hundred", "两百"),
    (144, "one hundred and forty-four", "一百四十四"),
])
def test_numbers_in_words(n, english, chinese):
    assert english_number(n) == english
    assert chinese_number(n) == chinese
