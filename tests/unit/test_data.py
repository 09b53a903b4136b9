"""Tests for pipeline.data.formats: strict readers, format adapters and their error messages."""

import json
from pathlib import Path

import pytest

from pipeline.data import formats as data
from pipeline.data.fingerprint import fingerprint_files
from pipeline.data.validate import READERS, validate
from pipeline.errors import UserError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "data"


def write_lines(path: Path, lines: list[str], newline: str = "\n") -> Path:
    path.write_text("".join(line + newline for line in lines), encoding="utf-8", newline="")
    return path


def write_rows(path: Path, rows: list[dict]) -> Path:
    return write_lines(path, [json.dumps(row, ensure_ascii=False) for row in rows])


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow
    import pyarrow.parquet

    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    return path


def error_of(call, *args, **kwargs) -> str:
    """The UserError message of a call; it must be one line."""
    with pytest.raises(UserError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def local_datasets_cache(tmp_path, monkeypatch):
    """Keep the datasets library's cache inside the test's temporary directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


# --------------------------------------------------------------------------------------------
# read_jsonl


def test_read_jsonl_accepts_bom_crlf_and_skips_blank_lines_keeping_line_numbers(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\r\n   \r\n{"b": "\xe4\xb8\xad"}\r\n')
    assert data.read_jsonl(path) == [(1, {"a": 1}), (4, {"b": "中"})]


def test_read_jsonl_missing_file(tmp_path):
    message = error_of(data.read_jsonl, tmp_path / "nope.jsonl")
    assert f"{tmp_path / 'nope.jsonl'}: file not found" in message


def test_read_jsonl_directory(tmp_path):
    assert "is a directory, expected a file" in error_of(data.read_jsonl, tmp_path)


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"])
def test_read_jsonl_empty_or_blank_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    assert f"{path}: the file has no rows" in error_of(data.read_jsonl, path)


def test_read_jsonl_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    message = error_of(data.read_jsonl, path)
    assert f"{path}:2: not valid UTF-8 (byte 0xe9 at byte 11 of the line)" in message


def test_read_jsonl_invalid_json_names_line_and_column(tmp_path):
    path = write_lines(tmp_path / "bad.jsonl", ['{"a": 1}', '{"a": 1,}'])
    message = error_of(data.read_jsonl, path)
    assert f"{path}:2: not valid JSON" in message
    assert "column 9" in message


@pytest.mark.parametrize("line, kind", [("[1, 2]", "array"), ('"text"', "string"),
                                        ("3.5", "number"), ("null", "null")])
def test_read_jsonl_rejects_non_objects(tmp_path, line, kind):
    path = write_lines(tmp_path / "bad.jsonl", ['{"a": 1}', line])
    assert f"{path}:2: expected a JSON object {{...}}, found a JSON {kind}" in error_of(data.read_jsonl, path)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_read_jsonl_rejects_non_finite_literals(tmp_path, literal):
    path = write_lines(tmp_path / "bad.jsonl", [f'{{"score": {literal}}}'])
    assert f"{path}:1: {literal} is not allowed" in error_of(data.read_jsonl, path)


def test_read_jsonl_rejects_deep_nesting(tmp_path):
    path = write_lines(tmp_path / "deep.jsonl", ['{"a": ' + "[" * 100_000 + "]" * 100_000 + "}"])
    assert f"{path}:1: JSON is nested too deeply" in error_of(data.read_jsonl, path)


def test_read_jsonl_rejects_10mb_line_under_default_limit(tmp_path):
    path = write_lines(tmp_path / "huge.jsonl", ['{"a": 1}', '{"text": "' + "x" * 10_000_000 + '"}'])
    assert f"{path}:2: line is longer than 1,000,000 bytes" in error_of(data.read_jsonl, path)


def test_read_jsonl_line_limit_is_configurable_and_exact(tmp_path):
    row = '{"text": "' + "x" * 10 + '"}'  # 22 bytes
    path = write_lines(tmp_path / "rows.jsonl", [row, row], newline="\r\n")
    assert data.read_jsonl(path, max_line_bytes=22) == [(1, {"text": "x" * 10}), (2, {"text": "x" * 10})]
    assert f"{path}:1: line is longer than 21 bytes" in error_of(data.read_jsonl, path, max_line_bytes=21)
    assert len(data.read_jsonl(write_lines(tmp_path / "big.jsonl", ['{"t": "' + "y" * 2_000_000 + '"}']),
                               max_line_bytes=3_000_000)) == 1


# --------------------------------------------------------------------------------------------
# read_text_corpus


def test_text_corpus_txt_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes("\ufeff第一段。\r\nline two\r\n\r\n\r\nsecond doc\n  \nthird\n".encode("utf-8"))
    assert data.read_text_corpus(path) == ["第一段。\nline two", "second doc", "third"]


def test_text_corpus_jsonl_and_parquet_with_text_field(tmp_path):
    jsonl = write_rows(tmp_path / "a.jsonl", [{"body": "一"}, {"body": "two"}])
    parquet = write_parquet(tmp_path / "b.parquet", [{"body": "three"}])
    assert data.read_text_corpus([jsonl, str(parquet)], text_field="body") == ["一", "two", "three"]


def test_text_corpus_directory_reads_supported_files_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    write_rows(tmp_path / "a.jsonl", [{"text": "ay"}])
    write_rows(tmp_path / "sub" / "c.jsonl", [{"text": "sea"}])
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / ".hidden" / "x.txt").write_text("ignored", encoding="utf-8")
    assert data.read_text_corpus(tmp_path) == ["ay", "bee", "sea"]


def test_load_hub_rows_reads_a_local_directory_through_datasets(tmp_path, local_datasets_cache):
    source = tmp_path / "hub-like"
    source.mkdir()
    write_rows(source / "part-0.jsonl", [{"text": "alpha"}, {"text": "贝塔"}])
    assert data.load_hub_rows(str(source)) == [(1, {"text": "alpha"}), (2, {"text": "贝塔"})]


def test_text_corpus_non_local_name_goes_to_the_hub(tmp_path, monkeypatch, local_datasets_cache):
    import datasets

    source = tmp_path / "hub-like"
    source.mkdir()
    write_rows(source / "part-0.jsonl", [{"text": "from the hub"}])
    real_load = datasets.load_dataset
    requested = []

    def load_dataset(name, config, split):
        requested.append((name, config, split))
        return real_load(str(source), split="train")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert data.read_text_corpus("someone/corpus") == ["from the hub"]
    assert data.read_text_corpus("someone/corpus", hub=data.HubSplit("en", "train[:10%]")) == \
        ["from the hub"]
    assert requested == [("someone/corpus", None, "train"), ("someone/corpus", "en", "train[:10%]")]


def test_text_corpus_hub_failure_is_a_user_error(monkeypatch):
    import datasets

    def unreachable(name, config, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    message = error_of(data.read_text_corpus, "someone/corpus")
    assert "someone/corpus: not a local file or directory, and loading it as a hub data set failed" in message
    assert "Couldn't reach 'someone/corpus' on the Hub" in message


@pytest.mark.parametrize("name", ["missing.txt", "./missing", "/no/such/dir"])
def test_text_corpus_missing_local_path_is_not_sent_to_the_hub(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert "file or directory not found" in error_of(data.read_text_corpus, name)


def test_text_corpus_empty(tmp_path):
    (tmp_path / "blank.txt").write_text("\n \n\n", encoding="utf-8")
    write_rows(tmp_path / "empty.jsonl", [{"text": ""}])
    assert "the corpus holds no text" in error_of(data.read_text_corpus, tmp_path)


def test_text_corpus_non_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"fine\n\nbad \xff here\n")
    assert f"{path}:3: not valid UTF-8" in error_of(data.read_text_corpus, path)


def test_text_corpus_missing_text_field(tmp_path):
    path = write_rows(tmp_path / "a.jsonl", [{"content": "x", "id": 1}])
    message = error_of(data.read_text_corpus, path)
    assert f"{path}:1: missing column 'text' (found: content, id); set text_field" in message


def test_text_corpus_unsupported_file_type(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text("text\nx\n", encoding="utf-8")
    assert "unsupported file type '.csv'" in error_of(data.read_text_corpus, path)


# --------------------------------------------------------------------------------------------
# fingerprint_files


def test_fingerprint_is_stable_and_tracks_names_contents_and_order(tmp_path):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    for folder in (first, second):
        (folder / "x.jsonl").write_text("one", encoding="utf-8")
        (folder / "y.jsonl").write_text("two", encoding="utf-8")
    base = fingerprint_files([first / "x.jsonl", first / "y.jsonl"])
    assert len(base) == 64
    assert fingerprint_files([second / "x.jsonl", second / "y.jsonl"]) == base
    assert fingerprint_files([first / "y.jsonl", first / "x.jsonl"]) != base
    assert fingerprint_files(first) == fingerprint_files(second)
    (second / "y.jsonl").write_text("two!", encoding="utf-8")
    assert fingerprint_files(first) != fingerprint_files(second)
    (second / "y.jsonl").write_text("two", encoding="utf-8")
    (second / "y.jsonl").rename(second / "z.jsonl")
    assert fingerprint_files(first) != fingerprint_files(second)


def test_fingerprint_separates_names_from_contents(tmp_path):
    (tmp_path / "ab").write_text("c", encoding="utf-8")
    (tmp_path / "a").write_text("bc", encoding="utf-8")
    assert fingerprint_files(tmp_path / "ab") != fingerprint_files(tmp_path / "a")


def test_fingerprint_missing_file(tmp_path):
    assert "file not found" in error_of(fingerprint_files, [tmp_path / "gone.jsonl"])


# --------------------------------------------------------------------------------------------
# SFT adapters

SFT_EXPECTED = {
    "messages": [
        {"messages": [{"role": "system", "content": "You are terse."},
                      {"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "4"}], "_line": 1},
        {"messages": [{"role": "user", "content": "你好"},
                      {"role": "assistant", "content": "你好！有什么可以帮你？"},
                      {"role": "user", "content": "谢谢"},
                      {"role": "assistant", "content": "不客气。"}], "_line": 2},
    ],
    "prompt_completion": [
        {"messages": [{"role": "user", "content": "Name a primary colour."},
                      {"role": "assistant", "content": "Red."}], "_line": 1},
        {"messages": [{"role": "system", "content": "Answer in Chinese."},
                      {"role": "user", "content": "What is water?"},
                      {"role": "assistant", "content": "水。"}], "_line": 2},
        {"messages": [{"role": "user", "content": "Say hi."},
                      {"role": "assistant", "content": "Hi!"}], "_line": 3},
    ],
    "alpaca": [
        {"messages": [{"role": "user", "content": "Translate to English.\n\n猫"},
                      {"role": "assistant", "content": "cat"}], "_line": 1},
        {"messages": [{"role": "user", "content": "Give a synonym for big."},
                      {"role": "assistant", "content": "large"}], "_line": 2},
        {"messages": [{"role": "user", "content": "Count to three."},
                      {"role": "assistant", "content": "1, 2, 3"}], "_line": 3},
    ],
    "sharegpt": [
        {"messages": [{"role": "user", "content": "What is 3*3?"},
                      {"role": "assistant", "content": "9"}], "_line": 1},
        {"messages": [{"role": "system", "content": "用中文回答。"},
                      {"role": "user", "content": "天空是什么颜色？"},
                      {"role": "assistant", "content": "蓝色。"}], "_line": 2},
    ],
    "transcripts": [  # the `chosen` conversation, turn by turn
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                      {"role": "user", "content": "How many legs do two chickens have?"},
                      {"role": "assistant", "content": "Two chickens have 4 legs."}], "_line": 1},
        {"messages": [{"role": "user", "content": "一只猫有几条腿？"},
                      {"role": "assistant", "content": "四条。"}], "_line": 2},
    ],
}


def test_a_pairwise_file_is_no_sft_transcript(tmp_path):
    """`chosen` alone does not make a row a transcript: it must hold '\\n\\nHuman:' turns."""
    path = write_rows(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    assert "cannot tell the data format" in error_of(data.load_sft_rows, path)
    assert "does not start with a '\\n\\nHuman:' turn" in error_of(
        data.load_sft_rows, path, fmt="transcripts")


@pytest.mark.parametrize("fmt", sorted(SFT_EXPECTED))
@pytest.mark.parametrize("requested", ["explicit", "auto"])
def test_sft_fixture_loads_to_expected_messages(fmt, requested):
    rows = data.load_sft_rows(FIXTURES / f"sft_{fmt}.jsonl", fmt=fmt if requested == "explicit" else "auto")
    assert rows == SFT_EXPECTED[fmt]


def test_sft_column_mapping_prompt_completion(tmp_path):
    path = write_rows(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A."}])
    rows = data.load_sft_rows(path, columns={"prompt": "question", "completion": "answer"})
    assert rows == [{"messages": [{"role": "user", "content": "Q?"},
                                  {"role": "assistant", "content": "A."}], "_line": 1}]


def test_sft_column_mapping_messages(tmp_path):
    dialog = [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    path = write_rows(tmp_path / "d.jsonl", [{"dialog": dialog}])
    assert data.load_sft_rows(path, fmt="messages", columns={"messages": "dialog"}) == [
        {"messages": dialog, "_line": 1}]


def test_sft_parquet_rows_use_row_numbers(tmp_path):
    path = write_parquet(tmp_path / "s.parquet", [{"prompt": "p1", "completion": "c1"},
                                                 {"prompt": "p2", "completion": ""}])
    assert f"{path}:2: assistant turn 1" in error_of(data.load_sft_rows, path)


def test_sft_hub_name_goes_through_datasets(tmp_path, monkeypatch, local_datasets_cache):
    import datasets

    source = tmp_path / "hub-like"
    source.mkdir()
    write_rows(source / "train.jsonl", [{"instruction": "i", "input": None, "output": "o"}])
    real_load = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, config, split: real_load(str(source), split=split))
    assert data.load_sft_rows("someone/sft") == [
        {"messages": [{"role": "user", "content": "i"}, {"role": "assistant", "content": "o"}], "_line": 1}]


def test_sft_missing_column_names_it_and_suggests_mapping(tmp_path):
    path = write_rows(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A."}])
    message = error_of(data.load_sft_rows, path, fmt="prompt_completion")
    assert f"{path}:1: missing column 'prompt' (found: question, answer)" in message
    assert "columns={'prompt': '<your column>'}" in message


def test_sft_missing_mapped_column(tmp_path):
    path = write_rows(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A."}])
    message = error_of(data.load_sft_rows, path, columns={"prompt": "query", "completion": "answer"},
                       fmt="prompt_completion")
    assert f"{path}:1: missing column 'query' (found: question, answer); check columns['prompt']" in message


def test_sft_auto_detection_failure(tmp_path):
    path = write_rows(tmp_path / "x.jsonl", [{"foo": 1}])
    message = error_of(data.load_sft_rows, path)
    assert f"{path}:1: cannot tell the data format from the columns (foo)" in message


def test_sft_unknown_format_and_unknown_column_name(tmp_path):
    path = FIXTURES / "sft_messages.jsonl"
    assert "unknown data format 'chatml'; valid formats: auto, messages" in error_of(
        data.load_sft_rows, path, fmt="chatml")
    assert "columns: unknown name 'question'" in error_of(data.load_sft_rows, path, columns={"question": "q"})


def test_sft_no_assistant_turn(tmp_path):
    path = write_rows(tmp_path / "s.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}])
    assert f"{path}:2: the conversation has no assistant turn" in error_of(data.load_sft_rows, path)


def test_sft_empty_assistant_turn(tmp_path):
    path = write_rows(tmp_path / "s.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "},
        {"role": "user", "content": "?"}, {"role": "assistant", "content": "ok"}]}])
    message = error_of(data.load_sft_rows, path)
    assert f"{path}:1: assistant turn 1 (counting all turns from 0) is empty" in message


def test_sft_unknown_role_is_named_with_valid_ones(tmp_path):
    path = write_rows(tmp_path / "s.jsonl", [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}])
    message = error_of(data.load_sft_rows, path)
    assert f"{path}:1: unknown role 'bot' in messages[1]; valid roles: system, user, assistant" in message


def test_sharegpt_unknown_speaker(tmp_path):
    path = write_rows(tmp_path / "s.jsonl", [{"conversations": [
        {"from": "human", "value": "hi"}, {"from": "robot", "value": "yo"}]}])
    message = error_of(data.load_sft_rows, path)
    assert f"{path}:1: unknown role 'robot' in conversations[1]; valid roles: human, user, gpt" in message


def test_sft_message_without_content_and_non_text_content(tmp_path):
    path = write_rows(tmp_path / "s.jsonl", [{"messages": [{"role": "user"}]}])
    assert f"{path}:1: messages[0] must be an object with 'role' and 'content'" in error_of(
        data.load_sft_rows, path)
    path = write_rows(tmp_path / "t.jsonl", [{"prompt": "p", "completion": 7}])
    assert f"{path}:1: completion must be text, found number" in error_of(data.load_sft_rows, path)


# --------------------------------------------------------------------------------------------
# Ranked (reward) adapters

RANKED_EXPECTED = {
    "ranked": [
        {"prompt": "Pick a fruit.", "responses": ["apple", "rock", "banana", "pear"],
         "ranks": [1, 2, 0, 1], "_line": 1},
        {"prompt": "一加一等于几？", "responses": ["三", "二"], "ranks": [1, 0], "_line": 2},
        {"prompt": [{"role": "user", "content": "Greet me."}], "responses": ["Hello!", "Go away."],
         "ranks": [0, 1], "_line": 3},
    ],
    "pairwise": [
        {"prompt": "Capital of France?", "responses": ["Paris.", "Lyon."], "ranks": [0, 1], "_line": 1},
        {"prompt": "中国的首都是哪里？", "responses": ["北京。", "上海。"], "ranks": [0, 1], "_line": 2},
    ],
    "transcripts": [  # the turns before the last answer become the prompt's messages
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                    {"role": "user", "content": "Capital of Japan?"}],
         "responses": ["Tokyo.", "Kyoto."], "ranks": [0, 1], "_line": 1},
        {"prompt": [{"role": "user", "content": "你好"}], "responses": ["你好！", "走开。"],
         "ranks": [0, 1], "_line": 2},
    ],
    "ultrafeedback": [  # by overall_score, else the mean of the numeric ratings; ties kept
        {"prompt": "Name a primary colour.", "responses": ["Red.", "Purple.", "Blue."],
         "ranks": [0, 1, 0], "_line": 1},
        {"prompt": "两只鸡有几条腿？", "responses": ["五条。", "四条。"], "ranks": [1, 0], "_line": 2},
    ],
    "scored": [
        {"prompt": "Describe the sea.", "responses": ["wet", "vast and blue", "salty"],
         "ranks": [1, 0, 1], "_line": 1},
        {"prompt": "写一句问候。", "responses": ["早上好！", "嗯。", "你好呀！"], "ranks": [0, 1, 0], "_line": 2},
    ],
}


@pytest.mark.parametrize("fmt", sorted(RANKED_EXPECTED))
@pytest.mark.parametrize("requested", ["explicit", "auto"])
def test_ranked_fixture_loads_to_expected_rows(fmt, requested):
    rows = data.load_ranked_rows(FIXTURES / f"reward_{fmt}.jsonl",
                                 fmt=fmt if requested == "explicit" else "auto")
    assert rows == RANKED_EXPECTED[fmt]


@pytest.mark.parametrize("name, stages", [
    ("reward_ranked.jsonl", {"reward": 3, "ppo": 3}),   # its prompts can also feed PPO
    ("reward_transcripts.jsonl", {"reward": 2, "sft": 2}),  # SFT learns the chosen dialogue
    ("reward_ultrafeedback.jsonl", {"reward": 2}),
    ("sft_transcripts.jsonl", {"sft": 2}),
    ("sft_alpaca.jsonl", {"sft": 3}),
    ("sft_messages.jsonl", {"sft": 2}),
])
def test_validate_names_every_stage_that_reads_a_file(name, stages):
    fits = validate(str(FIXTURES / name))
    assert {fit.stage: fit.rows for fit in fits} == stages


def test_validate_reads_prompts_and_text_for_ppo_and_pretrain(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "How many legs?"}\n{"prompt": "Hi"}\n', encoding="utf-8")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Cows have four legs.\n\nBirds have two.\n", encoding="utf-8")
    assert [(fit.stage, fit.rows) for fit in validate(str(prompts))] == [("ppo", 2)]
    assert [fit.stage for fit in validate(str(corpus))] == ["pretrain"]


def test_validate_a_bad_row_is_refused_even_when_another_stage_could_read_the_file(tmp_path):
    # Its prompts alone would feed PPO, but the file is ranked data with a broken ranking.
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "Q", "responses": ["a", "b"], "ranking": [0, 0]}\n',
                   encoding="utf-8")
    for stage in (None, "reward"):
        with pytest.raises(UserError, match=r"bad.jsonl:1: ranking repeats index 0"):
            validate(str(bad), stage)
    with pytest.raises(UserError, match=r"bad.jsonl:1: missing column 'text'"):
        validate(str(bad), "pretrain")


def test_validate_a_file_no_stage_reads_names_each_readers_problem(tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text('{"question": "Q", "answer": "A"}\n', encoding="utf-8")
    with pytest.raises(UserError, match="no stage can read") as err:
        validate(str(other))
    assert all(f"as {stage} data: " in str(err.value) for stage in READERS)


def test_ranked_column_mapping(tmp_path):
    path = write_rows(tmp_path / "p.jsonl", [{"question": "q", "good": "yes", "bad": "no"}])
    rows = data.load_ranked_rows(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert rows == [{"prompt": "q", "responses": ["yes", "no"], "ranks": [0, 1], "_line": 1}]


def test_ranked_ties_of_identical_text_are_allowed(tmp_path):
    path = write_rows(tmp_path / "r.jsonl", [{"prompt": "p", "responses": ["a", "a ", "b"],
                                              "ranking": [[0, 1], 2]}])
    assert data.load_ranked_rows(path)[0]["ranks"] == [0, 0, 1]


VALID_RANKED_ROWS = {
    "ranked": {"prompt": "fine", "responses": ["x", "y"], "ranking": [0, 1]},
    "pairwise": {"prompt": "fine", "chosen": "x", "rejected": "y"},
    "transcripts": {"chosen": "\n\nHuman: q\n\nAssistant: x", "rejected": "\n\nHuman: q\n\nAssistant: y"},
    "scored": {"prompt": "fine", "responses": [{"text": "x", "score": 1}, {"text": "y", "score": 0}]},
    "ultrafeedback": {"instruction": "fine", "completions": [{"response": "x", "overall_score": 2},
                                                             {"response": "y", "overall_score": 1}]},
}


def ranked_error(tmp_path, fmt: str, row: dict) -> str:
    """The message for a bad row placed on line 2, after a valid row of the same format."""
    path = write_rows(tmp_path / "bad.jsonl", [VALID_RANKED_ROWS[fmt], row])
    message = error_of(data.load_ranked_rows, path)
    assert message.startswith(f"{path}:2: ")
    return message


@pytest.mark.parametrize("ranking, reason", [
    ([0, 1], "ranking is missing response index(es) 2"),
    ([0, [1, 0], 2], "ranking repeats index 0"),
    ([0, 1, 3], "ranking index 3 is out of range (3 responses, indices 0..2)"),
    ([0, -1, 1, 2], "ranking index -1 is out of range"),
    ([0, "1", 2], "ranking entry '1' is not a response index"),
    ([0, [], 1, 2], "ranking[1] is an empty group"),
    ("0,1,2", "ranking must be a list of response indices"),
])
def test_ranking_must_be_a_permutation(tmp_path, ranking, reason):
    row = {"prompt": "p", "responses": ["a", "b", "c"], "ranking": ranking}
    assert reason in ranked_error(tmp_path, "ranked", row)


def test_ranked_needs_two_responses(tmp_path):
    row = {"prompt": "p", "responses": ["only"], "ranking": [0]}
    assert "1 response(s), a ranking needs at least 2" in ranked_error(tmp_path, "ranked", row)


def test_ranked_empty_response(tmp_path):
    assert "responses[1] is empty" in ranked_error(
        tmp_path, "pairwise", {"prompt": "p", "chosen": "a", "rejected": " "})


def test_ranked_duplicate_answers_ranked_apart(tmp_path):
    row = {"prompt": "p", "responses": ["same", "other", "same"], "ranking": [0, 1, 2]}
    assert "responses[0] and responses[2] are the same text ranked in different places" in ranked_error(
        tmp_path, "ranked", row)


def test_pairwise_chosen_equal_to_rejected(tmp_path):
    assert "are the same text ranked in different places" in ranked_error(
        tmp_path, "pairwise", {"prompt": "p", "chosen": "a", "rejected": "a"})


def test_scored_nan_score_from_parquet(tmp_path):
    path = write_parquet(tmp_path / "s.parquet", [
        {"prompt": "p", "responses": [{"text": "a", "score": 1.0}, {"text": "b", "score": float("nan")}]}])
    assert f"{path}:1: responses[1] has a NaN score" in error_of(data.load_ranked_rows, path)


@pytest.mark.parametrize("item, reason", [
    ({"text": "b", "score": "high"}, "responses[1] has a non-numeric score 'high'"),
    ({"text": "b", "rank": True}, "responses[1] has a non-numeric rank True"),
    ({"text": "b"}, "responses[1] must be {'text', 'rank'} or {'text', 'score'}"),
])
def test_scored_bad_values(tmp_path, item, reason):
    row = {"prompt": "p", "responses": [{"text": "a", "score": 1}, item]}
    assert reason in ranked_error(tmp_path, "scored", row)


def test_scored_overflowing_number_is_infinite(tmp_path):
    # 1e400 is valid JSON but parses to inf, which would poison a ranking loss.
    line = '{"prompt": "p", "responses": [{"text": "a", "score": 1}, {"text": "b", "score": 1e400}]}'
    path = write_lines(tmp_path / "bad.jsonl", [line])
    assert f"{path}:1: responses[1] has an infinite score" in error_of(data.load_ranked_rows, path)


def test_scored_mixing_rank_and_score(tmp_path):
    row = {"prompt": "p", "responses": [{"text": "a", "score": 1}, {"text": "b", "rank": 1}]}
    assert "responses mix 'rank' and 'score'" in ranked_error(tmp_path, "scored", row)


def test_transcripts_with_different_prompts(tmp_path):
    row = {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: y"}
    assert "chosen and rejected differ before their last" in ranked_error(tmp_path, "transcripts", row)


def test_transcript_without_assistant_turn(tmp_path):
    row = {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: A"}
    assert "rejected has no '\\n\\nAssistant:' turn" in ranked_error(tmp_path, "transcripts", row)


def test_transcript_ending_with_the_human(tmp_path):
    row = {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: A\n\nAssistant: y\n\nHuman: ?"}
    assert "rejected ends with a '\\n\\nHuman:' turn" in ranked_error(tmp_path, "transcripts", row)


@pytest.mark.parametrize("completion, reason", [
    ({"text": "x", "overall_score": 1}, "completions[1] must be an object with 'response'"),
    ({"response": "x", "overall_score": "high"}, "completions[1] has a non-numeric overall_score"),
    ({"response": "x", "annotations": {"honesty": {"Rating": "N/A"}}},
     "completions[1] has no 'overall_score' and no numeric annotations.*.Rating"),
])
def test_ultrafeedback_completion_without_a_score(tmp_path, completion, reason):
    row = {"instruction": "i", "completions": [{"response": "a", "overall_score": 1}, completion]}
    assert reason in ranked_error(tmp_path, "ultrafeedback", row)


def test_response_message_list_without_assistant(tmp_path):
    row = {"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "y"}
    assert "responses[0] has no assistant message" in ranked_error(tmp_path, "pairwise", row)


def test_ranked_missing_column(tmp_path):
    row = {"prompt": "p", "responses": ["a", "b"], "order": [0, 1]}
    message = ranked_error(tmp_path, "ranked", row)
    assert "missing column 'ranking' (found: prompt, responses, order)" in message


def test_a_transcript_is_the_same_conversation_for_sft_and_reward():
    """SFT learns the chosen dialogue; the reward model scores its last answer after the same
    turns, as messages the chat template renders turn by turn."""
    sft = data.load_sft_rows(FIXTURES / "reward_transcripts.jsonl")
    ranked = data.load_ranked_rows(FIXTURES / "reward_transcripts.jsonl")
    for conversation, row in zip(sft, ranked):
        chosen = row["responses"][row["ranks"].index(0)]
        assert conversation["messages"] == [*row["prompt"], {"role": "assistant", "content": chosen}]
