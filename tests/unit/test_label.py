"""`rlhf label`'s bookkeeping without a browser or a model: rankings (with ties) become rows the
reward stage reads, the files survive a torn last line, a reopened session resumes by prompt
content, chat feedback becomes pairwise rows, and bad input exits 2 with one line, writing
nothing."""

from __future__ import annotations

import json
import re
import socket
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline.data.formats import load_ranked_rows
from pipeline.errors import UserError
from pipeline.commands.label.store import (JsonlLog, LabelStore, distinct_answers, feedback_rows,
                                           labeler_agreement, pending_indices, prompt_key,
                                           ranking_row)

ANSWERS = ["Six legs.", "Moo.", "Three chickens have six legs in total.", "6."]
MESSAGES = [{"role": "user", "content": "How many legs do three chickens have?"}]


def write_lines(path: Path, *rows: dict | str) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n"
                            for row in rows), encoding="utf-8")
    return path


def test_a_ranking_with_a_tie_is_the_row_the_reward_stage_reads(tmp_path):
    row = ranking_row(MESSAGES, ANSWERS, [[2], [3, 0], [1]])
    assert row == {"prompt": MESSAGES, "responses": ANSWERS, "ranking": [2, [0, 3], 1]}
    log = JsonlLog(tmp_path / "labels.jsonl")
    log.append([row])
    log.close()
    line = (tmp_path / "labels.jsonl").read_text(encoding="utf-8")
    assert line == json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n"
    [read] = load_ranked_rows(tmp_path / "labels.jsonl")
    assert read["ranks"] == [1, 2, 0, 1] and read["prompt"] == MESSAGES


@pytest.mark.parametrize("answers, groups, message", [
    (ANSWERS, [[0], [1], [2]], "missing response index"),
    (ANSWERS, [[0], [0, 1], [2], [3]], "repeats index 0"),
    (ANSWERS, [[0, 1], [], [2, 3]], "non-empty groups"),
    (ANSWERS, "0123", "non-empty groups"),
    (ANSWERS, [[0], [1], [2], [7]], "out of range"),
    (ANSWERS[:1], [[0]], "at least 2"),
    (["Six.", "Six. "], [[0], [1]], "same text ranked in different places"),
    (["Six.", " "], [[0], [1]], "empty"),
])
def test_a_bad_ranking_is_refused(answers, groups, message):
    with pytest.raises(UserError, match=message):
        ranking_row("Legs?", answers, groups)


def test_an_unfinished_last_line_is_dropped_with_a_note(tmp_path, capsys):
    path = write_lines(tmp_path / "labels.jsonl", {"a": 1}, {"b": 2})
    with path.open("ab") as handle:
        handle.write(b'{"prompt": "half a ro')  # the write a crash interrupted
    log = JsonlLog(path)
    assert log.rows == [{"a": 1}, {"b": 2}]
    assert path.read_bytes().endswith(b"ro")  # reading alone changes nothing
    log.open()
    assert "dropped an unfinished last line (21 bytes)" in capsys.readouterr().err
    log.append([{"c": 3}])
    log.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"a": 1}, {"b": 2}, {"c": 3}]


def test_a_whole_last_row_without_its_line_ending_is_kept(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"a": 1}\n{"b": 2}')
    log = JsonlLog(path)
    assert log.rows == [{"a": 1}, {"b": 2}]
    log.append([{"c": 3}])
    log.close()
    assert path.read_text() == '{"a": 1}\n{"b": 2}\n{"c": 3}\n'


def test_a_bad_line_before_the_last_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "labels.jsonl", {"a": 1}, "{not json", {"b": 2})
    with pytest.raises(UserError, match=rf"^{path}:2: not valid JSON"):
        JsonlLog(path)


def test_pending_prompts_are_matched_by_content_and_count():
    prompts = ["A", MESSAGES, "A", "B", "C"]
    done = Counter([prompt_key("A"), prompt_key("B"), prompt_key("gone")])
    assert pending_indices(prompts, done) == [1, 2, 4]  # one "A" done, the other still to do
    assert pending_indices(prompts, Counter()) == [0, 1, 2, 3, 4]


def make_files(tmp_path: Path, prompts: list) -> tuple[Path, Path, Path]:
    prompts_file = write_lines(tmp_path / "prompts.jsonl", *({"prompt": p} for p in prompts))
    return prompts_file, tmp_path / "labels.jsonl", tmp_path / "labels.chat.jsonl"


def test_a_reopened_session_resumes_after_the_decisions_made(tmp_path):
    files = make_files(tmp_path, ["A", MESSAGES, "A", "B"])
    store = LabelStore.load(*files)
    store.open()
    assert store.current() == 0 and not files[1].exists()  # OUT appears with its first row
    store.record_ranking(0, ANSWERS, [[1], [0, 2], [3]])
    with pytest.raises(UserError, match="not waiting for a decision"):
        store.record_ranking(0, ANSWERS, [[0], [1], [2], [3]])
    store.set_aside(1, "flagged", " rude ")
    store.set_aside(3, "skipped")
    assert store.timing()["n"] == 1 and store.timing()["last"] > 0
    store.close()

    reopened = LabelStore.load(*files)
    assert reopened.pending() == [2]  # the second "A" still needs its own ranking
    assert reopened.counts() == {"total": 4, "remaining": 1, "ranked": 1, "skipped": 1,
                                 "flagged": 1, "chat_pairs": 0}
    assert reopened.progress.rows == [{"action": "flagged", "prompt": MESSAGES, "note": "rude"},
                                      {"action": "skipped", "prompt": "B"}]
    assert load_ranked_rows(files[1])[0]["ranks"] == [1, 0, 1, 2]


def test_a_team_ranks_each_prompt_as_often_as_asked_and_signs_its_rows(tmp_path):
    files = make_files(tmp_path, ["A", "B"])
    store = LabelStore.load(*files, per_prompt=2)
    store.open()
    assert store.pending("ann") == store.pending("bob") == [0, 1]
    store.record_ranking(0, ANSWERS, [[0], [1], [2], [3]], "ann")
    assert store.pending("ann") == [1] and store.pending("bob") == [0, 1]
    with pytest.raises(UserError, match="not waiting for a decision"):
        store.record_ranking(0, ANSWERS, [[0], [1], [2], [3]], "ann")
    store.record_ranking(0, ANSWERS, [[3], [2], [1], [0]], "bob")
    assert store.pending("cy") == [1]  # "A" has its two rankings: nobody else is asked
    store.set_aside(1, "skipped", labeler="ann")
    store.save_feedback(MESSAGES, "Six.", ["Moo."], labeler="bob")
    store.close()

    reopened = LabelStore.load(*files, per_prompt=2)
    assert reopened.pending("ann") == [] and reopened.pending("bob") == [1]
    assert [row["labeler"] for row in reopened.out.rows] == ["ann", "bob"]
    assert reopened.progress.rows == [{"action": "skipped", "prompt": "B", "labeler": "ann"}]
    assert reopened.feedback.rows[0]["labeler"] == "bob"
    assert len(load_ranked_rows(files[1])) == 2  # the reward stage reads signed rows as they are


def test_agreement_between_labelers_over_the_pairs_both_ordered():
    rows = [
        # "P": ann a > b > c; bob, listing the answers in another order, a > c > b.
        {"prompt": "P", "responses": ["a", "b", "c"], "ranking": [0, 1, 2], "labeler": "ann"},
        {"prompt": "P", "responses": ["c", "b", "a"], "ranking": [2, 0, 1], "labeler": "bob"},
        # "Q": ann ties the two answers, so no pair is ordered by both.
        {"prompt": "Q", "responses": ["x", "y"], "ranking": [[0, 1]], "labeler": "ann"},
        {"prompt": "Q", "responses": ["x", "y"], "ranking": [1, 0], "labeler": "bob"},
        # Ranked by one labeler, or by nobody named: nothing to compare.
        {"prompt": "R", "responses": ["x", "y"], "ranking": [0, 1], "labeler": "ann"},
        {"prompt": "P", "responses": ["a", "b", "c"], "ranking": [2, 1, 0]},
    ]
    # On "P" the pairs (a, b) and (a, c) agree, (b, c) does not: 2 of 3.
    assert labeler_agreement(rows) == {
        "prompts": 2, "pairs": 3, "agreement": pytest.approx(2 / 3),
        "by_labelers": {"ann + bob": {"pairs": 3, "agreement": pytest.approx(2 / 3)}}}
    assert labeler_agreement(rows[2:]) == {"prompts": 1, "pairs": 0, "agreement": None,
                                           "by_labelers": {"ann + bob": {"pairs": 0,
                                                                         "agreement": None}}}


def test_a_second_writer_of_the_same_output_is_refused(tmp_path):
    files = make_files(tmp_path, ["A"])
    first = LabelStore.load(*files)
    first.open()
    second = LabelStore.load(*files)
    with pytest.raises(UserError, match="held by another `rlhf label`"):
        second.open()
    first.close()


def test_chat_feedback_keeps_only_pairs_that_say_something():
    rows = feedback_rows(MESSAGES, "Six legs.", ["Moo.", "Six legs. ", "", "Moo.", "6."])
    assert rows == [{"prompt": MESSAGES, "chosen": "Six legs.", "rejected": "Moo."},
                    {"prompt": MESSAGES, "chosen": "Six legs.", "rejected": "6."}]
    assert feedback_rows(MESSAGES, "  ", ["Moo."]) == []
    with pytest.raises(UserError, match="end it with the user's message"):
        feedback_rows([*MESSAGES, {"role": "assistant", "content": "Six."}], "Six.", ["Moo."])
    with pytest.raises(UserError, match="feedback needs messages"):
        feedback_rows("not messages", "Six.", ["Moo."])


def test_distinct_answers_draws_again_for_repeats_and_empties():
    draws = {0: ["Six.", "Six.", " ", "Moo."], 1: ["Moo.", "6."], 2: ["never drawn"]}
    asked = []

    def draw(n, attempt):
        asked.append((n, attempt))
        return draws[attempt][:n]

    assert distinct_answers(draw, 3) == ["Six.", "Moo.", "6."]
    assert asked == [(3, 0), (2, 1)]
    assert distinct_answers(lambda n, attempt: ["Same."] * n, 4) == ["Same."]


# -- the command refuses bad input before it loads a model or writes a byte ----------------------
BAD_INPUT = {
    "missing prompts file": ({"--prompts": "{tmp}/nope.jsonl"}, "nope.jsonl: file not found"),
    "row without a prompt": ({"prompts": '{"question": "Legs?"}'},
                             r"prompts.jsonl:1: no 'prompt' field"),
    "prompt ending with an answer": (
        {"prompts": '{"prompt": [{"role": "user", "content": "Hi"}, '
                    '{"role": "assistant", "content": "Hello"}]}'},
        "prompts.jsonl:1: the prompt's last message is from 'assistant'"),
    "out in a missing directory": ({"--out": "{tmp}/missing/labels.jsonl"},
                                   r"the directory .*missing does not exist"),
    "out not .jsonl": ({"--out": "{tmp}/labels.txt"}, "name it .jsonl"),
    "out holding other rows": ({"out": '{"prompt": "Legs?", "chosen": "Six.", "rejected": "Moo."}'},
                               r"labels.jsonl:1: no 'responses' field"),
    "feedback into out": ({"--feedback-out": "{tmp}/labels.jsonl"}, "must differ from --out"),
    "k too small": ({"--k": "1"}, "argument --k: must be at least 2, got 1"),
    "k too large": ({"--k": "10"}, "argument --k: must be at most 9, got 10"),
    "greedy": ({"--temperature": "0"}, "nothing to rank"),
    "negative temperature": ({"--temperature": "-1"}, "argument --temperature: must be at least 0"),
    "NaN temperature": ({"--temperature": "nan"}, "argument --temperature: must be a finite"),
    "port out of range": ({"--port": "70000"}, "argument --port: must be at most 65535"),
    "unknown policy": ({"--policy": "sft:latest"}, "no registry to look it up in"),
}


def prepare(tmp_path: Path, files: dict) -> None:
    # What the guard reads of a model (its config, its weights' header) without loading it.
    from safetensors.torch import save_file

    (tmp_path / "policy").mkdir()
    (tmp_path / "policy" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    save_file({"weight": torch.zeros(1)}, str(tmp_path / "policy" / "model.safetensors"))
    (tmp_path / "prompts.jsonl").write_text(files.get("prompts", '{"prompt": "Legs?"}') + "\n")
    if "out" in files:
        (tmp_path / "labels.jsonl").write_text(files["out"] + "\n")


def run_label(tmp_path: Path, capsys, options: dict) -> tuple[int, str]:
    from pipeline.commands.cli import main

    arguments = {"--policy": str(tmp_path / "policy"), "--prompts": str(tmp_path / "prompts.jsonl"),
                 "--out": str(tmp_path / "labels.jsonl"), **options}
    argv = ["--home", str(tmp_path / "home"), "label"]
    for name, value in arguments.items():
        argv += [name, value.format(tmp=tmp_path)]
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    return code, capsys.readouterr().err


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(path): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys, case):
    options, message = BAD_INPUT[case]
    prepare(tmp_path, {key: value for key, value in options.items() if not key.startswith("--")})
    before = snapshot(tmp_path)
    code, err = run_label(tmp_path, capsys, {key: value for key, value in options.items()
                                             if key.startswith("--")})
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert re.search(message, lines[0]), lines[0]
    assert snapshot(tmp_path) == before


def test_a_port_in_use_is_said_before_any_model_loads(tmp_path, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        prepare(tmp_path, {})
        code, err = run_label(tmp_path, capsys, {"--port": str(port)})
    assert code == 2 and f"cannot listen on 127.0.0.1:{port}" in err
    assert not (tmp_path / "labels.jsonl").exists()
