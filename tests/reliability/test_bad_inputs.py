"""A catalogue of bad inputs: configs, data files, registry references and command-line arguments.

Every row is one `rlhf` command and a fragment its message must contain. Each must fail the same
way: exit code 2, exactly one (non-blank) line on stderr, no traceback, and every file of the
registry home byte-for-byte unchanged — the home already holds a completed pretrain run, so a
stray registration, status change or metric would show. Rows run in this process (most fail in
validation, before a model loads); a crash instead of a clean exit fails the row.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from faults import copy_home, file_digests

pytestmark = pytest.mark.reliability

BAD_FILES: dict[str, bytes] = {
    # configs
    "syntax.yaml": b"train: [1, 2\n",
    "list.yaml": b"- train\n- lr\n",
    "latin1.yaml": b"seed: 0  # caf\xe9\n",
    # text corpora (pretrain)
    "array.jsonl": b'{"text": "a"}\n["text", "b"]\n',
    "bom_line2.jsonl": '{"text": "a"}\n\ufeff{"text": "b"}\n'.encode(),
    "empty.jsonl": b"",
    "latin1.jsonl": b'{"text": "caf\xe9"}\n',
    "huge_line.jsonl": b'{"text": "' + b"a" * 10_000_000 + b'"}\n',
    "nan.jsonl": b'{"text": NaN}\n',
    "no_text.jsonl": b'{"content": "x"}\n',
    "number.jsonl": b'{"text": 3}\n',
    "truncated.jsonl": b'{"text": "a"\n',
    "crlf.jsonl": b'{"text": "a"}\r\n{"text": "b"}\r\n{"text": "c"\r\n',
    "table.csv": b"text\nhello\n",
    "blank.txt": b"\n\n   \n",
    "no_data/readme.md": b"notes",
    # SFT conversations
    "sft_no_answer.jsonl": b'{"messages": [{"role": "user", "content": "hi"}]}\n',
    "sft_role.jsonl": b'{"messages": [{"role": "robot", "content": "hi"}, '
                      b'{"role": "assistant", "content": "x"}]}\n',
    "sft_not_list.jsonl": b'{"messages": "hi"}\n',
    "sft_ok.jsonl": b'{"messages": [{"role": "user", "content": "hi"}, '
                    b'{"role": "assistant", "content": "hello"}]}\n',
    # ranked answers (reward)
    "ranked_out_of_range.jsonl": b'{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 2]}\n',
    "ranked_repeat.jsonl": b'{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}\n',
    "ranked_one.jsonl": b'{"prompt": "p", "responses": ["a"], "ranking": [0]}\n',
    "ranked_same_text.jsonl": b'{"prompt": "p", "responses": ["a", "a"], "ranking": [0, 1]}\n',
    "scored_nan.jsonl": b'{"prompt": "p", "responses": [{"text": "a", "score": NaN}, '
                        b'{"text": "b", "score": 1}]}\n',
    "pairwise_half.jsonl": b'{"prompt": "p", "chosen": "a"}\n',
    # registry homes
    "garbage_home/registry.db": b"this is not a database\n" * 64,
    "empty_home/.keep": b"",
}


@dataclass
class Row:
    """One bad command: `{bad}` is the folder of BAD_FILES, `{run}` the pretrain run id."""

    name: str
    argv: list[str]
    fragment: str
    home: str = "{home}"     # the registry home the command is given
    stage: str = "pretrain"  # the stage whose module must exist for the row to run


def run_args(*extra: str) -> list[str]:
    return ["run", "pretrain", *extra]


def sft_args(*extra: str) -> list[str]:
    return ["run", "sft", "model.source={run}", *extra]


def reward_args(*extra: str) -> list[str]:
    return ["run", "reward", "model.source={run}", *extra]


def corpus(name: str) -> str:
    return f"data.sources=[{{bad}}/{name}]"


ROWS = [
    # -- configs --------------------------------------------------------------------------------
    Row("config-missing", run_args("--config", "{bad}/missing.yaml"), "does not exist"),
    Row("config-is-directory", run_args("--config", "{bad}"), "is a directory"),
    Row("config-yaml-syntax", run_args("--config", "{bad}/syntax.yaml"),
        "syntax.yaml:2: YAML syntax"),
    Row("config-top-level-list", run_args("--config", "{bad}/list.yaml"), "must be a mapping"),
    Row("config-not-utf8", run_args("--config", "{bad}/latin1.yaml"), "not UTF-8"),
    Row("unknown-key-typo", run_args("train.max_stepz=3"), "did you mean 'train.max_steps'"),
    Row("unknown-section", run_args("wandb.project=x"), "unknown key 'wandb'"),
    Row("wrong-type-deep", run_args("data.world.seed=abc"), "data.world.seed expects an integer"),
    Row("negative-lr", run_args("train.lr=-1"), "train.lr"),
    Row("keep-last-zero", run_args("checkpoint.keep_last=0"), "checkpoint.keep_last"),
    Row("preset-unknown", run_args("model.preset=huge"), "model.preset must be"),
    Row("bool-not-bool", run_args("runtime.trust_remote_code=maybe"),
        "runtime.trust_remote_code expects true or false"),
    Row("section-is-scalar", run_args("train=3"), "train expects a mapping"),
    Row("list-is-string", run_args("data.sources={bad}/nan.jsonl"), "data.sources expects a list"),
    Row("override-without-value", run_args("train.lr"), "not of the form key=value"),
    Row("sft-format-unknown", sft_args("data.format=csv"), "data.format must be", stage="sft"),
    Row("sft-columns-unknown",
        sft_args("data.columns={foo: bar}", "data.train_files=[{bad}/sft_ok.jsonl]"),
        "unknown name 'foo'", stage="sft"),
    Row("sft-longer-than-context", sft_args("data.max_length=100000"),
        "longer than the model's context", stage="sft"),
    # -- data files -----------------------------------------------------------------------------
    Row("jsonl-line-is-array", run_args(corpus("array.jsonl")),
        "array.jsonl:2: expected a JSON object"),
    Row("bom-inside-file", run_args(corpus("bom_line2.jsonl")),
        "bom_line2.jsonl:2: not valid JSON"),
    Row("empty-file", run_args(corpus("empty.jsonl")), "empty.jsonl: the file has no rows"),
    Row("invalid-utf8", run_args(corpus("latin1.jsonl")), "latin1.jsonl:1: not valid UTF-8"),
    Row("10mb-line", run_args(corpus("huge_line.jsonl")), "huge_line.jsonl:1: line is longer than"),
    Row("nan-literal", run_args(corpus("nan.jsonl")), "nan.jsonl:1: NaN is not allowed"),
    Row("missing-column", run_args(corpus("no_text.jsonl")),
        "no_text.jsonl:1: missing column 'text'"),
    Row("text-is-number", run_args(corpus("number.jsonl")), "number.jsonl:1: text must be text"),
    Row("truncated-json", run_args(corpus("truncated.jsonl")), "truncated.jsonl:1: not valid JSON"),
    Row("crlf-error-names-line", run_args(corpus("crlf.jsonl")), "crlf.jsonl:3: not valid JSON"),
    Row("missing-corpus", run_args(corpus("missing.txt")),
        "missing.txt: file or directory not found"),
    Row("directory-without-data", run_args(corpus("no_data")), "holds no .jsonl"),
    Row("unsupported-suffix", run_args(corpus("table.csv")), "unsupported file type '.csv'"),
    Row("blank-text-corpus", run_args(corpus("blank.txt")), "the corpus holds no text"),
    Row("directory-where-file-expected",
        sft_args("data.train_files=[{bad}/sft_ok.jsonl]", "eval.prompts_file={bad}/no_data"),
        "is a directory, expected a file", stage="sft"),
    Row("sft-no-assistant-turn", sft_args("data.train_files=[{bad}/sft_no_answer.jsonl]"),
        "sft_no_answer.jsonl:1: the conversation has no assistant turn", stage="sft"),
    Row("sft-unknown-role", sft_args("data.train_files=[{bad}/sft_role.jsonl]"),
        "sft_role.jsonl:1: unknown role 'robot'", stage="sft"),
    Row("sft-messages-not-list", sft_args("data.train_files=[{bad}/sft_not_list.jsonl]"),
        "sft_not_list.jsonl:1: messages must be a non-empty list", stage="sft"),
    Row("ranking-index-out-of-range",
        reward_args("data.train_files=[{bad}/ranked_out_of_range.jsonl]"),
        "ranked_out_of_range.jsonl:1: ranking index 2 is out of range", stage="reward"),
    Row("ranking-repeats-index", reward_args("data.train_files=[{bad}/ranked_repeat.jsonl]"),
        "ranked_repeat.jsonl:1: ranking repeats index 0", stage="reward"),
    Row("ranking-one-response", reward_args("data.train_files=[{bad}/ranked_one.jsonl]"),
        "ranked_one.jsonl:1: 1 response(s)", stage="reward"),
    Row("same-answer-two-ranks", reward_args("data.train_files=[{bad}/ranked_same_text.jsonl]"),
        "ranked_same_text.jsonl:1: responses[0] and responses[1] are the same text",
        stage="reward"),
    Row("nan-score", reward_args("data.train_files=[{bad}/scored_nan.jsonl]"),
        "scored_nan.jsonl:1: NaN is not allowed", stage="reward"),
    Row("pairwise-without-rejected", reward_args("data.train_files=[{bad}/pairwise_half.jsonl]"),
        "pairwise_half.jsonl:1: cannot tell the data format", stage="reward"),
    Row("validate-bad-ranking", ["data", "validate", "{bad}/ranked_repeat.jsonl"],
        "ranked_repeat.jsonl:1: ranking repeats index 0"),
    # -- registry references and names ----------------------------------------------------------
    Row("ref-does-not-exist", sft_args("model.source=nosuchrun"), "'nosuchrun' is not a run id",
        stage="sft"),
    Row("ref-stage-never-ran", ["run", "sft", "model.source=sft:latest"], "no completed sft run",
        stage="sft"),
    Row("ref-step-not-committed", sft_args("model.source={run}@99"),
        "has no committed state at step 99", stage="sft"),
    Row("ref-is-a-file", ["run", "sft", "model.source={bad}/nan.jsonl"], "is a file", stage="sft"),
    Row("reward-ref-not-a-reward-model", ["run", "ppo", "model.policy={run}", "model.reward={run}"],
        "is not a reward model", stage="ppo"),
    Row("show-unknown-run", ["registry", "show", "nosuch"], "no run 'nosuch'"),
    Row("verify-unknown-run", ["registry", "verify", "nosuch"], "no run 'nosuch'"),
    Row("rm-path-escape", ["registry", "rm", "../../etc"], "no run '../../etc'"),
    Row("alias-parent-dir", ["registry", "alias", "../evil", "{run}"], "invalid alias '../evil'"),
    Row("alias-absolute-path", ["registry", "alias", "/tmp/evil", "{run}"],
        "invalid alias '/tmp/evil'"),
    Row("alias-nul-byte", ["registry", "alias", "a\x00b", "{run}"], "invalid alias"),
    Row("alias-too-long", ["registry", "alias", "a" * 65, "{run}"], "invalid alias"),
    Row("alias-to-missing-run", ["registry", "alias", "best", "nosuchrun"],
        "no run 'nosuchrun' to alias"),
    Row("export-unknown-ref", ["export", "nosuch", "{bad}/out"], "'nosuch' is not a run id"),
    # -- homes and command-line arguments -------------------------------------------------------
    Row("home-not-writable", ["run", "pretrain"], "is not writable", home="{bad}/nan.jsonl/home"),
    Row("home-without-registry", ["registry", "show", "x"], "no registry at",
        home="{bad}/empty_home"),
    Row("registry-db-garbage", ["registry", "ls"], "cannot be used as a registry",
        home="{bad}/garbage_home"),
    Row("world-k-out-of-range", ["data", "world", "--out", "{bad}/world", "--k", "12"], "got 12"),
    Row("unknown-stage", ["run", "nosuchstage"], "'nosuchstage'"),
    Row("unknown-option", run_args("--bogus"), "unrecognized arguments: --bogus"),
    Row("source-is-not-a-model", run_args("model.source={bad}/no_data"), "cannot load a tokenizer"),
]


@pytest.fixture(scope="module")
def catalogue(chain, tmp_path_factory) -> dict[str, str]:
    """The placeholders of the rows: a home with a completed pretrain run, the bad files."""
    root = tmp_path_factory.mktemp("catalogue")
    reference = chain.reference("pretrain")
    home = copy_home(reference.home, root / "home")
    bad = root / "bad"
    for name, content in BAD_FILES.items():
        (bad / name).parent.mkdir(parents=True, exist_ok=True)
        (bad / name).write_bytes(content)
    return {"{home}": str(home), "{bad}": str(bad), "{run}": reference.run_id}


def fill(text: str, values: dict[str, str]) -> str:
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text




def test_catalogue_is_large_and_names_are_unique():
    assert len({row.name for row in ROWS}) == len(ROWS)
    assert len(ROWS) >= 30


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input_fails_cleanly_and_changes_nothing(row: Row, catalogue, in_process_cli):
    home = Path(fill(row.home, catalogue))
    homes = {home, Path(catalogue["{home}"])}
    before = homes_digest(homes)

    argv = ["--home", str(home), *(fill(arg, catalogue) for arg in row.argv)]
    code, lines, _ = in_process_cli(argv)

    assert code == 2, lines
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {lines}"
    assert row.fragment in lines[0]
    assert "Traceback" not in lines[0]
    after = homes_digest(homes)
    assert not changed_files(before, after), "the registry home changed"


def homes_digest(homes: set[Path]) -> dict[str, str]:
    return {str(home / name): digest for home in homes if home.is_dir()
            for name, digest in file_digests(home).items()}


def changed_files(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(name for name in before.keys() | after.keys()
                  if before.get(name) != after.get(name))
