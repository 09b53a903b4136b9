"""Property-based fuzzing of everything that reads user input before a model is touched: the data
readers, the override parser, the YAML loader, reference parsing and the ranked-row validator.

The property is the same everywhere: fed any input, they return, or raise the project's one
`UserError` (the CLI's one line and exit code 2) — never another exception, which would be a
traceback. Inputs are generated two ways: raw text and bytes, and structures close to the real
formats (the right column names, wrong values), which reach deeper checks than noise does.
`make test` runs a small fixed-seed budget; `make fuzz` a large random one (see conftest.py).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import example, given
from hypothesis import strategies as st

from pipeline.commands.label.store import ranking_row
from pipeline.config import load_config, read_yaml
from pipeline.data import formats
from pipeline.data.formats import Record, load_ranked_rows, load_sft_rows, ranked_row
from pipeline.data.prompts import read_chat_prompts, read_prompts
from pipeline.errors import UserError
from pipeline.registry import Registry, resolve_model
from stages import STAGES

pytestmark = pytest.mark.fuzz

# Every column name some format reads: generated rows use them often, so checks past "missing
# column" are reached.
COLUMNS = ["text", "messages", "prompt", "completion", "instruction", "input", "output",
           "conversations", "responses", "ranking", "chosen", "rejected", "role", "content",
           "from", "value", "score", "rank"]
ROLES = ["user", "assistant", "system", "human", "gpt", "robot"]

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-10, 10)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
           | st.sampled_from(ROLES + COLUMNS + ["", " ", "\n\nAssistant:", "<|end|>"]))
json_values = st.recursive(
    scalars,
    lambda children: (st.lists(children, max_size=5)
                      | st.dictionaries(st.sampled_from(COLUMNS) | st.text(max_size=6), children,
                                        max_size=5)),
    max_leaves=25)
rows = st.dictionaries(st.sampled_from(COLUMNS) | st.text(max_size=6), json_values, max_size=6)


@st.composite
def data_files(draw) -> bytes:
    """A data file: JSON Lines or one JSON array of generated rows, or lines of noise; with or
    without a byte order mark, CRLF line ends, blank lines and a torn last line."""
    kind = draw(st.sampled_from(["jsonl", "array", "noise", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    items = draw(st.lists(rows | json_values, max_size=6))
    if kind == "array":
        text = "[" + ",\n".join(json.dumps(item) for item in items) + "]"
    else:
        lines = [json.dumps(item) for item in items]
        if kind == "noise":
            lines += draw(st.lists(st.text(max_size=30), max_size=4))
        text = draw(st.sampled_from(["\n", "\r\n"])).join(draw(st.permutations(lines)))
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]  # torn
    prefix = draw(st.sampled_from(["", "\ufeff", "\n\n", "  "]))
    return (prefix + text).encode("utf-8", errors="surrogatepass")


def user_error_or_nothing(call, *args, **kwargs):
    """Run `call`; a UserError is a fine outcome (it is the CLI's one line), anything else
    propagates and fails the property."""
    try:
        return call(*args, **kwargs)
    except UserError as err:
        assert str(err) and "\n" not in str(err).strip(), f"a message of several lines: {err!r}"
        return None


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# -- the data readers -----------------------------------------------------------------------------
@given(content=data_files(), suffix=st.sampled_from([".jsonl", ".json", ".txt"]))
@example(content=b'{"messages": [{"role": ["user"], "content": "x"}]}', suffix=".jsonl")
@example(content=b'{"text": ' + b"1" * 5000 + b"}", suffix=".jsonl")
def test_data_readers_return_or_say_what_is_wrong(scratch, content, suffix):
    path = scratch / f"data{suffix}"
    path.write_bytes(content)
    user_error_or_nothing(formats.read_text_corpus, [path])
    if suffix == ".txt":
        return
    user_error_or_nothing(formats.read_jsonl, path)
    for fmt in ["auto", *formats.SFT_FORMATS]:
        user_error_or_nothing(load_sft_rows, path, fmt)
    for fmt in ["auto", *formats.RANKED_FORMATS]:
        user_error_or_nothing(load_ranked_rows, path, fmt)
    user_error_or_nothing(read_prompts, path, 10)
    user_error_or_nothing(read_chat_prompts, path)


@given(row=rows, columns=st.dictionaries(st.sampled_from(COLUMNS) | st.text(max_size=5),
                                         st.sampled_from(COLUMNS) | json_values, max_size=3))
def test_column_mappings_return_or_say_what_is_wrong(scratch, row, columns):
    path = scratch / "mapped.jsonl"
    path.write_text(json.dumps(row) + "\n")
    user_error_or_nothing(load_sft_rows, path, "auto", columns)
    user_error_or_nothing(load_ranked_rows, path, "auto", columns)


# -- the ranked-row validator ---------------------------------------------------------------------
rankings = st.recursive(st.integers(-2, 6) | st.booleans() | st.text(max_size=2) | st.none(),
                        lambda children: st.lists(children, max_size=6), max_leaves=12)
responses = st.lists(st.text(max_size=8) | json_values | st.fixed_dictionaries(
    {"text": st.text(max_size=6) | json_values}, optional={"score": json_values,
                                                           "rank": json_values}), max_size=6)


@given(prompt=json_values, answers=responses, ranking=rankings)
def test_ranked_rows_are_valid_or_refused(prompt, answers, ranking):
    row = {"prompt": prompt, "responses": answers, "ranking": ranking}
    record = Record("fuzz.jsonl", 1, row)
    checked = user_error_or_nothing(lambda: ranked_row(record, formats.ranked_parts(record, {})))
    if checked is not None:  # what passed is what the reward stage can train on
        assert len(checked["responses"]) == len(checked["ranks"]) >= 2
        assert sorted(set(checked["ranks"])) == list(range(max(checked["ranks"]) + 1))
    without_ranking = {"prompt": prompt, "responses": answers}
    scored = Record("fuzz.jsonl", 1, without_ranking)
    user_error_or_nothing(lambda: ranked_row(scored, formats.RANKED_ADAPTERS["scored"](scored, {})))


@given(prompt=json_values, answers=st.lists(st.text(max_size=8), max_size=5),
       groups=st.lists(st.lists(st.integers(-1, 5) | json_values, max_size=3), max_size=6)
       | json_values)
def test_the_label_pages_rankings_are_valid_or_refused(prompt, answers, groups):
    user_error_or_nothing(ranking_row, prompt, answers, groups)


# -- the override parser and the YAML loader ------------------------------------------------------
KEYS = ["train.lr", "train.max_steps", "seed", "data.sources", "data.world.seed", "runtime",
        "runtime.report_to", "model.preset", "checkpoint.keep_last", "data.eval_fraction", "train"]
yaml_texts = st.text(alphabet=string.printable + "\u00e9\u4e00\ufeff", max_size=80)
yaml_snippets = st.sampled_from(["nan", ".inf", "-.inf", "1e999", "0x10", "0o7", "true", "~",
                                 "[1, [2]]", "{a: 1, a: 2}", "&a [*a]", "!!python/object:os.system",
                                 "2001-13-45", "2001-02-30 25:61:61", "'", "{", "- a", "? a",
                                 "*unknown", "1_000", "!!binary x", "<<: 1", "9" * 5000])


@given(items=st.lists(st.tuples(st.sampled_from(KEYS) | st.text(max_size=10),
                                yaml_texts | yaml_snippets,
                                st.sampled_from(["=", "", "=="])), max_size=4),
       stage=st.sampled_from(sorted(STAGES)))
def test_overrides_give_a_config_or_say_what_is_wrong(items, stage):
    overrides = [f"{key}{sep}{value}" for key, value, sep in items]
    config = user_error_or_nothing(load_config, STAGES[stage].load().Config, None, overrides)
    if config is not None:
        json.dumps(config.model_dump(mode="json"))  # a stored config is plain JSON


@st.composite
def yaml_documents(draw) -> str:
    """YAML text: noise, or a dump of a generated config-shaped mapping with snippets spliced in
    (duplicate keys, aliases, tags, odd scalars)."""
    if draw(st.booleans()):
        return draw(yaml_texts)
    document = yaml.safe_dump(draw(st.dictionaries(st.sampled_from(["train", "data", "seed",
                                                                    "runtime", "model", "x"]),
                                                   json_values, max_size=4)))
    lines = document.splitlines()
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(lines)))
        lines.insert(at, draw(st.sampled_from(["train:", "  lr: 1", "seed: 1", "seed: 2"]))
                     if draw(st.booleans()) else f"x: {draw(yaml_snippets)}")
    return "\n".join(lines)


@given(text=yaml_documents())
@example(text="seed: 2001-13-45")
@example(text="a: &x [1]\nb: *x\nseed: 1\nseed: 2")
def test_yaml_configs_load_or_say_what_is_wrong(scratch, text):
    path = scratch / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    user_error_or_nothing(read_yaml, path)
    user_error_or_nothing(load_config, STAGES["sft"].load().Config, path)


# -- reference parsing ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def registry(scratch, add_run):
    registry = Registry(scratch / "home")
    run = add_run(registry, "pretrain")
    registry.set_alias("best", run.id)
    yield registry
    registry.close()


@st.composite
def references(draw, run_id: str) -> str:
    forms = [draw(st.text(max_size=40)),
             f"{draw(st.sampled_from([run_id, 'best', 'pretrain:latest', 'x', '']))}@"
             f"{draw(st.from_regex(r'[0-9]{1,6000}', fullmatch=True) | st.text(max_size=5))}",
             f"{draw(st.text(max_size=10))}:latest",
             draw(st.sampled_from(["/", ".", "..", "~", "/dev/null", "/proc/self", "\x00", "a/b",
                                   "../../etc/passwd", "org/name", "x" * 5000, " ", "@"]))]
    return draw(st.sampled_from(forms))


@given(data=st.data())
def test_references_resolve_or_say_what_is_wrong(registry, data):
    run_id = registry.runs()[0].id
    ref = data.draw(references(run_id))
    user_error_or_nothing(registry.resolve, ref)
    user_error_or_nothing(registry.lookup, ref)
    user_error_or_nothing(resolve_model, None, ref)
