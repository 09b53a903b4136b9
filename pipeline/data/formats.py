"""Data loading and format adapters: text corpora, SFT conversations and ranked answers.

Every loader returns plain Python structures and turns each data mistake into a one-line
`UserError` naming `file:line` (for Parquet files and hub data sets, the 1-based row number) and
what to do about it. Nothing is skipped silently except blank lines.

Sources, accepted by every loader:
- a local file: `.jsonl` / `.json` (JSON Lines, one object per line, or one JSON array of objects
  as LLaMA-Factory's Alpaca files are), `.parquet`, and for text corpora also `.txt` (documents
  separated by blank lines);
- a local directory: every such file in it and below it, in sorted path order;
- a hub data set name (anything that is not a local path), loaded with
  `datasets.load_dataset(name, config, split=split)`, `HubSplit` saying which config and split.

Text encoding: files must be UTF-8. A UTF-8 byte order mark at the start of a file is accepted and
dropped; CRLF line endings are accepted.

Normalized shapes:
- SFT rows: `{"messages": [{"role", "content"}, ...], "_line": n}`, from the `messages`,
  `prompt_completion`, `alpaca`, `sharegpt` and `transcripts` formats.
- Ranked rows: `{"prompt": str | messages, "responses": [str, ...], "ranks": [int, ...], "_line": n}`
  where `ranks[i]` is response i's place (0 = best, equal numbers = tie), from the `ranked`,
  `pairwise`, `transcripts`, `scored` and `ultrafeedback` formats.

Dialogue transcripts (Anthropic HH-RLHF: "\n\nHuman: …\n\nAssistant: …") become chat messages,
one per turn: for SFT the whole `chosen` conversation; for reward data the turns before the last
answer are the prompt and the two last answers are ranked. UltraFeedback rows (an `instruction`
and its `completions`, each with an `overall_score` or per-aspect ratings) rank the completions by
score, equal scores tied.

`columns` maps the names used here to the user's column names, e.g.
`{"prompt": "question", "completion": "answer"}`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Callable, NamedTuple

from pipeline.errors import UserError, first_line
from pipeline.guard import NOT_FOUND, input_file, input_path, path_problem

# A JSON Lines row longer than this is refused before it is held in memory (a row is one prompt
# with its answers: a megabyte is hundreds of thousands of tokens); a text corpus's line may be
# longer, up to TEXT_MAX_LINE_BYTES.
DEFAULT_MAX_LINE_BYTES = 1_000_000
TEXT_MAX_LINE_BYTES = 100_000_000
JSONL_SUFFIXES = (".jsonl", ".json")
ROW_SUFFIXES = (*JSONL_SUFFIXES, ".parquet")
TEXT_SUFFIXES = (*ROW_SUFFIXES, ".txt")
BYTE_ORDER_MARK = "\ufeff"

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "system": "system"}
TRANSCRIPT_ANSWER_MARK = "\n\nAssistant:"
TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant):")
TRANSCRIPT_ROLES = {"Human": "user", "Assistant": "assistant"}

# Each format with the columns it reads; a format is auto-detected when the first row has all of
# its required columns, checked in this order (more specific formats first).
SFT_FORMATS = {
    "messages": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "transcripts": ("chosen",),  # detected only when it holds a transcript (see detect_format)
}
SFT_OPTIONAL_COLUMNS = ("input",)
RANKED_FORMATS = {
    "ranked": ("prompt", "responses", "ranking"),
    "scored": ("prompt", "responses"),
    "pairwise": ("prompt", "chosen", "rejected"),
    "transcripts": ("chosen", "rejected"),
    "ultrafeedback": ("instruction", "completions"),
}


class HubSplit(NamedTuple):
    """Which part of a hub data set to read: a configuration (subset) and a split."""

    config: str | None = None
    split: str = "train"


class Record(NamedTuple):
    """One source row with where it came from, so every message can name `file:line`."""

    source: str  # file path or hub data set name
    line: int  # 1-based line (JSON Lines) or row number (Parquet, hub)
    row: dict

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


# --------------------------------------------------------------------------------------------
# Reading files


class _NonFiniteLiteral(ValueError):
    """Raised from the JSON parser on NaN / Infinity, which are not JSON and break losses."""


def _reject_non_finite(literal: str) -> Any:
    raise _NonFiniteLiteral(literal)


def read_jsonl(path: str | Path, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> list[tuple[int, dict]]:
    """Read a JSON Lines file strictly: `(line number, object)` per non-blank line. A file whose
    first character is `[` is one JSON array of objects instead (`(line it starts on, object)`
    each), as the `datasets` json loader also reads."""
    path = input_file(path)
    if _starts_with_array(path):
        rows = _read_json_array(path)
    else:
        rows = [(number, parse_object(text, f"{path}:{number}"))
                for number, text in _numbered_lines(path, max_line_bytes) if text.strip()]
    if not rows:
        raise UserError(f"{path}: the file has no rows (it is empty or blank); "
                        "write one JSON object per line")
    return rows


def _starts_with_array(path: Path) -> bool:
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 16):
            text = chunk.lstrip(b" \t\r\n")
            if text.startswith(BYTE_ORDER_MARK.encode()):
                text = text[len(BYTE_ORDER_MARK.encode()):].lstrip(b" \t\r\n")
            if text:
                return text.startswith(b"[")
    return False


def _read_json_array(path: Path) -> list[tuple[int, dict]]:
    """The objects of a file holding one JSON array, each with the line it starts on."""
    content = path.read_bytes()
    try:
        text = content.decode("utf-8").removeprefix(BYTE_ORDER_MARK)
    except UnicodeDecodeError as err:
        line = content.count(b"\n", 0, err.start) + 1
        raise UserError(f"{path}:{line}: not valid UTF-8 (byte 0x{content[err.start]:02x}); save "
                        "the file as UTF-8") from None
    decoder = json.JSONDecoder(parse_constant=_reject_non_finite)
    rows: list[tuple[int, dict]] = []
    index, line, counted = text.index("[") + 1, 1, 0
    while True:
        index = _skip_space(text, index)
        if text.startswith("]", index) and not rows:
            break
        line, counted = line + text.count("\n", counted, index), index
        where = f"{path}:{line}"
        value, index = _decode_value(decoder, text, index, path)
        if not isinstance(value, dict):
            raise UserError(f"{where}: expected a JSON object {{...}} in the array, found a JSON "
                            f"{_json_type(value)}; make every element an object")
        rows.append((line, value))
        index = _skip_space(text, index)
        if text.startswith("]", index):
            break
        if not text.startswith(",", index):
            raise UserError(f"{path}:{text.count(chr(10), 0, index) + 1}: not valid JSON (expected "
                            "',' or ']' after an element of the file's JSON array); fix the array")
        index += 1
    if text[index + 1:].strip():
        raise UserError(f"{path}:{line + text.count(chr(10), counted, index)}: text after the "
                        "JSON array's closing ']'; a file holds one array or JSON Lines")
    return rows


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _decode_value(decoder: json.JSONDecoder, text: str, index: int, path: Path):
    try:
        return decoder.raw_decode(text, index)
    except _NonFiniteLiteral as err:
        line = text.count("\n", 0, index) + 1
        raise UserError(f"{path}:{line}: {err} is not allowed in JSON; use a finite number or "
                        "null") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: not valid JSON ({err.msg} at column {err.colno}) "
                        "in the file's JSON array; fix the array") from None
    except ValueError as err:  # a number of more than 4300 digits
        line = text.count("\n", 0, index) + 1
        raise UserError(f"{path}:{line}: {err}; fix the row") from None
    except RecursionError:
        line = text.count("\n", 0, index) + 1
        raise UserError(f"{path}:{line}: JSON is nested too deeply; flatten the row") from None


def _numbered_lines(path: Path, max_line_bytes: int | None) -> Iterator[tuple[int, str]]:
    """Yield (1-based number, decoded line without its line ending); strict UTF-8.

    Lines are split on b"\\n" only (not on Unicode line separators inside JSON strings), and are
    read with a size limit so a huge line is rejected before it is held in memory.
    """
    # Two extra bytes leave room for "\r\n" on a line of exactly max_line_bytes.
    read_limit = -1 if max_line_bytes is None else max_line_bytes + 2
    with path.open("rb") as handle:
        number = 0
        while raw := handle.readline(read_limit):
            number += 1
            content = raw.rstrip(b"\r\n")
            if max_line_bytes is not None and len(content) > max_line_bytes:
                raise UserError(f"{path}:{number}: line is longer than {max_line_bytes:,} bytes, "
                                "the most a line may hold; shorten the row or split it")
            text = _decode(content, path, number)
            yield number, text.removeprefix(BYTE_ORDER_MARK) if number == 1 else text


def _decode(content: bytes, path: Path, number: int) -> str:
    try:
        return content.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}:{number}: not valid UTF-8 (byte 0x{content[err.start]:02x} at "
                        f"byte {err.start + 1} of the line); save the file as UTF-8") from None


def parse_object(text: str, where: str) -> dict:
    try:
        value = json.loads(text, parse_constant=_reject_non_finite)
    except _NonFiniteLiteral as err:
        raise UserError(f"{where}: {err} is not allowed in JSON; use a finite number or null") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{where}: not valid JSON ({err.msg} at column {err.colno}); "
                        "write one JSON object per line") from None
    except ValueError as err:  # a number of more than 4300 digits
        raise UserError(f"{where}: {err}; fix the row") from None
    except RecursionError:
        raise UserError(f"{where}: JSON is nested too deeply; flatten the row") from None
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a JSON object {{...}}, found a JSON {_json_type(value)}; "
                        "write one JSON object per line")
    return value


def _json_type(value: Any) -> str:
    names = {list: "array", str: "string", bool: "boolean", int: "number", float: "number",
             type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _read_parquet(path: Path) -> list[tuple[int, dict]]:
    import pyarrow  # lazy: heavy, and only Parquet users need it
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as err:
        raise UserError(f"{path}: not a readable Parquet file ({first_line(err)}); "
                        "check the file or convert it to JSON Lines") from None
    if not rows:
        raise UserError(f"{path}: the Parquet file has no rows; give a file with data")
    return list(enumerate(rows, start=1))


def _read_txt_documents(path: Path) -> list[str]:
    """Plain text: documents are separated by one or more blank lines."""
    documents, current = [], []
    for _, line in _numbered_lines(path, max_line_bytes=TEXT_MAX_LINE_BYTES):
        if line.strip():
            current.append(line)
        elif current:
            documents.append("\n".join(current))
            current = []
    if current:
        documents.append("\n".join(current))
    return documents


def load_hub_rows(name: str, hub: HubSplit = HubSplit()) -> list[tuple[int, dict]]:
    """Load a data set with `datasets.load_dataset(name, config, split=split)`: `(row number, row)`
    pairs."""
    import datasets  # lazy: heavy, and only hub users need it

    try:
        rows = datasets.load_dataset(name, hub.config, split=hub.split).to_list()
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as err:
        raise UserError(f"{name}: not a local file or directory, and loading it as a hub data set "
                        f"failed ({first_line(err)}); check the path, or the data set name with its "
                        f"config and split") from None
    if not rows:
        raise UserError(f"{name}: the data set's {hub.split!r} split has no rows; give a data set "
                        "with data")
    return list(enumerate(rows, start=1))


# --------------------------------------------------------------------------------------------
# Resolving sources


def as_list(sources: str | Path | Iterable[str | Path]) -> list[str | Path]:
    return [sources] if isinstance(sources, (str, Path)) else list(sources)


def visible_files(root: Path) -> list[Path]:
    """Every file under a directory, sorted, skipping hidden files and folders (.git, .cache)."""
    return sorted(path for path in root.rglob("*") if path.is_file()
                  and not any(part.startswith(".") for part in path.relative_to(root).parts))


def _local_files(source: str | Path, suffixes: tuple[str, ...]) -> list[Path] | None:
    """The local files a source names, or None when it is a hub data set name."""
    path = Path(source).expanduser()
    if path_problem(path, "any") == NOT_FOUND["any"] and not (isinstance(source, Path)
                                                              or _looks_like_path(source)):
        return None
    input_path(path)
    if path.is_dir():
        files = [file for file in visible_files(path) if file.suffix in suffixes]
        if not files:
            raise UserError(f"{path}: the directory holds no {', '.join(suffixes)} files; "
                            "point at a directory with data files")
        return files
    if path.suffix not in suffixes:
        raise UserError(f"{path}: unsupported file type {path.suffix or '(none)'!r}; "
                        f"use one of {', '.join(suffixes)}")
    return [path]


def _looks_like_path(source: str) -> bool:
    # Hub names look like "name" or "owner/name"; anything clearly meant as a file path is
    # reported as missing instead of being sent to the hub.
    return source.startswith(("/", ".", "~", "\\")) or Path(source).suffix in (*TEXT_SUFFIXES, ".csv")


def _file_records(path: Path) -> list[Record]:
    numbered = _read_parquet(path) if path.suffix == ".parquet" else read_jsonl(path)
    return [Record(str(path), number, row) for number, row in numbered]


def _hub_records(name: str, hub: HubSplit) -> list[Record]:
    return [Record(name, number, row) for number, row in load_hub_rows(name, hub)]


def read_records(path_or_name: str | Path, hub: HubSplit = HubSplit()) -> list[Record]:
    """Every row of a data file, a directory of them, or a hub data set, with where it came from."""
    files = _local_files(path_or_name, ROW_SUFFIXES)
    if files is None:
        return _hub_records(str(path_or_name), hub)
    return [record for path in files for record in _file_records(path)]


def read_text_corpus(paths_or_dirs: str | Path | Iterable[str | Path], text_field: str = "text",
                     hub: HubSplit = HubSplit()) -> list[str]:
    """All documents of one or more text sources (.txt, JSON Lines, Parquet, directory, hub name)."""
    documents: list[str] = []
    for source in as_list(paths_or_dirs):
        files = _local_files(source, TEXT_SUFFIXES)
        if files is None:
            documents += _texts(_hub_records(str(source), hub), text_field)
        for path in files or []:
            documents += (_read_txt_documents(path) if path.suffix == ".txt"
                          else _texts(_file_records(path), text_field))
    if not any(document.strip() for document in documents):
        raise UserError(f"{', '.join(map(str, as_list(paths_or_dirs)))}: the corpus holds no text; "
                        "point at files with text in them")
    return documents


def _texts(records: list[Record], text_field: str) -> list[str]:
    hint = "set text_field to the column that holds the text"
    return [_string(_column(record, text_field, hint), record, text_field) for record in records]


# --------------------------------------------------------------------------------------------
# Shared row checks


def _column(record: Record, column: str, hint: str) -> Any:
    if column not in record.row:
        found = ", ".join(map(str, record.row)) or "none"
        raise UserError(f"{record.where}: missing column '{column}' (found: {found}); {hint}")
    return record.row[column]


def _mapped(record: Record, name: str, columns: dict[str, str]) -> Any:
    """Read our column `name` through the user's `columns` mapping."""
    column = columns.get(name, name)
    hint = (f"check columns['{name}']" if name in columns
            else f"map your column name with columns={{'{name}': '<your column>'}}")
    return _column(record, column, hint)


def _string(value: Any, record: Record, what: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{record.where}: {what} must be text, found {_json_type(value)}; fix the row")
    return value


def _checked_columns(columns: dict[str, str] | None, formats: dict[str, tuple[str, ...]],
                     optional: tuple[str, ...] = ()) -> dict[str, str]:
    known = sorted({name for names in formats.values() for name in names} | set(optional))
    for name, column in (columns or {}).items():
        if name not in known:
            raise UserError(f"columns: unknown name {name!r}; valid names: {', '.join(known)}")
        if not isinstance(column, str):
            raise UserError(f"columns.{name}: expected a column name (text), got {column!r}")
    return dict(columns or {})


def detect_format(row: dict, formats: dict[str, tuple[str, ...]],
                  columns: dict[str, str] | None = None) -> str | None:
    """The first format whose required columns (after the column mapping) the row has. SFT's
    `transcripts` row must also hold a transcript in `chosen`: a pairwise file has that column
    too, with one answer in it."""
    columns = columns or {}
    for name, needed in formats.items():
        if all(columns.get(column, column) in row for column in needed):
            if formats is SFT_FORMATS and name == "transcripts" and not _holds_transcript(
                    row[columns.get("chosen", "chosen")]):
                continue
            return name
    return None


def _holds_transcript(value: Any) -> bool:
    return isinstance(value, str) and TRANSCRIPT_TURN.match(value) is not None


def _resolved_format(fmt: str, first: Record, columns: dict[str, str],
                     formats: dict[str, tuple[str, ...]]) -> str:
    if fmt in formats:
        return fmt
    if fmt != "auto":
        raise UserError(f"unknown data format {fmt!r}; valid formats: auto, {', '.join(formats)}")
    detected = detect_format(first.row, formats, columns)
    if detected:
        return detected
    found = ", ".join(map(str, first.row)) or "none"
    raise UserError(f"{first.where}: cannot tell the data format from the columns ({found}); "
                    f"set the format to one of {', '.join(formats)} or map column names with columns")


def chat_turns(value: Any, record: Record, what: str, role_key: str = "role",
           content_key: str = "content", role_names: dict[str, str] | None = None) -> list[dict]:
    """Normalize a list of chat turns to [{"role", "content"}]; `role_names` maps source roles."""
    role_names = role_names or {role: role for role in ROLES}
    if not isinstance(value, list) or not value:
        raise UserError(f"{record.where}: {what} must be a non-empty list of "
                        f"{{'{role_key}', '{content_key}'}} objects; fix the row")
    messages = []
    for index, turn in enumerate(value):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise UserError(f"{record.where}: {what}[{index}] must be an object with "
                            f"'{role_key}' and '{content_key}'; fix the row")
        role = turn[role_key]
        if not isinstance(role, str) or role not in role_names:
            raise UserError(f"{record.where}: unknown role {role!r} in {what}[{index}]; "
                            f"valid roles: {', '.join(role_names)}")
        content = _string(turn[content_key], record, f"{what}[{index}].{content_key}")
        messages.append({"role": role_names[role], "content": content})
    return messages


def _text_or_turns(value: Any, record: Record, what: str) -> str | list[dict]:
    """Prompts, completions and responses are either plain text or a list of chat messages."""
    return chat_turns(value, record, what) if isinstance(value, list) else _string(value, record, what)


# --------------------------------------------------------------------------------------------
# SFT adapters


def _sft_messages(record: Record, columns: dict[str, str]) -> list[dict]:
    return chat_turns(_mapped(record, "messages", columns), record, "messages")


def _sft_prompt_completion(record: Record, columns: dict[str, str]) -> list[dict]:
    prompt = _text_or_turns(_mapped(record, "prompt", columns), record, "prompt")
    completion = _text_or_turns(_mapped(record, "completion", columns), record, "completion")
    prompt_messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    completion_messages = ([{"role": "assistant", "content": completion}] if isinstance(completion, str)
                           else completion)
    return prompt_messages + completion_messages


def _sft_alpaca(record: Record, columns: dict[str, str]) -> list[dict]:
    instruction = _string(_mapped(record, "instruction", columns), record, "instruction")
    extra_input = record.row.get(columns.get("input", "input")) or ""
    output = _string(_mapped(record, "output", columns), record, "output")
    user = f"{instruction}\n\n{_string(extra_input, record, 'input')}" if extra_input else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def _sft_sharegpt(record: Record, columns: dict[str, str]) -> list[dict]:
    return chat_turns(_mapped(record, "conversations", columns), record, "conversations",
                  role_key="from", content_key="value", role_names=SHAREGPT_ROLES)


def _sft_transcript(record: Record, columns: dict[str, str]) -> list[dict]:
    return transcript_messages(_string(_mapped(record, "chosen", columns), record, "chosen"),
                               record, "chosen")


def transcript_messages(transcript: str, record: Record, what: str) -> list[dict]:
    """A transcript's turns as chat messages, each without the space after its mark:
    "\\n\\nHuman: Hi\\n\\nAssistant: Hello." → [{user: "Hi"}, {assistant: "Hello."}]."""
    pieces = TRANSCRIPT_TURN.split(transcript)  # [before the first mark, role, text, role, ...]
    if pieces[0].strip() or len(pieces) == 1:
        raise UserError(f"{record.where}: {what} does not start with a '\\n\\nHuman:' turn; a "
                        "transcript is '\\n\\nHuman: …\\n\\nAssistant: …' turns")
    return [{"role": TRANSCRIPT_ROLES[role], "content": text.strip()}
            for role, text in zip(pieces[1::2], pieces[2::2])]


SFT_ADAPTERS: dict[str, Callable[[Record, dict[str, str]], list[dict]]] = {
    "messages": _sft_messages,
    "sharegpt": _sft_sharegpt,
    "alpaca": _sft_alpaca,
    "prompt_completion": _sft_prompt_completion,
    "transcripts": _sft_transcript,
}


def _checked_conversation(messages: list[dict], record: Record) -> list[dict]:
    answers = [(i, m["content"]) for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not answers:
        raise UserError(f"{record.where}: the conversation has no assistant turn; "
                        "every row needs at least one answer to learn from")
    for index, content in answers:
        if not content.strip():
            raise UserError(f"{record.where}: assistant turn {index} (counting all turns from 0) is "
                            "empty; write the answer or remove the row")
    return messages


def load_sft_rows(path_or_name: str | Path, fmt: str = "auto",
                  columns: dict[str, str] | None = None, hub: HubSplit = HubSplit()) -> list[dict]:
    """Load SFT data as `{"messages": [...], "_line": n}` rows from any supported format."""
    columns = _checked_columns(columns, SFT_FORMATS, SFT_OPTIONAL_COLUMNS)
    records = read_records(path_or_name, hub)
    adapter = SFT_ADAPTERS[_resolved_format(fmt, records[0], columns, SFT_FORMATS)]
    return [{"messages": _checked_conversation(adapter(record, columns), record), "_line": record.line}
            for record in records]


# --------------------------------------------------------------------------------------------
# Reward (ranked answers) adapters

# An adapter returns (prompt, raw responses, ranks); ranked_row then normalizes and checks them.
RankedParts = tuple[Any, list, list[int]]


def _response_list(record: Record, columns: dict[str, str], name: str = "responses") -> list:
    responses = _mapped(record, name, columns)
    if not isinstance(responses, list):
        raise UserError(f"{record.where}: {name} must be a list, found {_json_type(responses)}; "
                        "fix the row")
    if len(responses) < 2:
        raise UserError(f"{record.where}: {len(responses)} response(s), a ranking needs at least 2; "
                        "add answers or remove the row")
    return responses


def _ranks_from_ranking(ranking: Any, count: int, record: Record) -> list[int]:
    """[2, [0, 3], 1] (indices best → worst, lists are ties) → ranks [1, 2, 0, 1]."""
    if not isinstance(ranking, list):
        raise UserError(f"{record.where}: ranking must be a list of response indices, best first; "
                        "fix the row")
    ranks: list[int | None] = [None] * count
    for place, group in enumerate(ranking):
        indices = group if isinstance(group, list) else [group]
        if not indices:
            raise UserError(f"{record.where}: ranking[{place}] is an empty group; remove it")
        for index in indices:
            if not is_int(index):
                raise UserError(f"{record.where}: ranking entry {index!r} is not a response index; "
                                "use integers")
            if not 0 <= index < count:
                raise UserError(f"{record.where}: ranking index {index} is out of range "
                                f"({count} responses, indices 0..{count - 1}); fix the ranking")
            if ranks[index] is not None:
                raise UserError(f"{record.where}: ranking repeats index {index}; "
                                "rank every response exactly once")
            ranks[index] = place
    missing = [index for index, rank in enumerate(ranks) if rank is None]
    if missing:
        raise UserError(f"{record.where}: ranking is missing response index(es) "
                        f"{', '.join(map(str, missing))}; rank every response exactly once")
    return ranks


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dense_ranks(values: list[float], higher_is_better: bool) -> list[int]:
    """Place of each value among the distinct values, best first: [0.5, 2, 0.5] → [1, 0, 1]."""
    distinct = sorted(set(values), reverse=higher_is_better)
    return [distinct.index(value) for value in values]


def _scored_value(item: Any, index: int, record: Record) -> tuple[str, float]:
    if not isinstance(item, dict) or "text" not in item or ("rank" in item) == ("score" in item):
        raise UserError(f"{record.where}: responses[{index}] must be {{'text', 'rank'}} or "
                        "{'text', 'score'} (plain-text responses need a 'ranking' column); fix the row")
    key = "rank" if "rank" in item else "score"
    return key, _finite_number(item[key], f"responses[{index}]", key, record)


def _finite_number(value: Any, where: str, key: str, record: Record) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"{record.where}: {where} has a non-numeric {key} {value!r}; use a number")
    if math.isnan(value):
        raise UserError(f"{record.where}: {where} has a NaN {key}; use a number")
    if math.isinf(value):
        raise UserError(f"{record.where}: {where} has an infinite {key}; use a finite number")
    return value


def ranked_parts(record: Record, columns: dict[str, str]) -> RankedParts:
    responses = _response_list(record, columns)
    ranks = _ranks_from_ranking(_mapped(record, "ranking", columns), len(responses), record)
    return _mapped(record, "prompt", columns), responses, ranks


def _scored_parts(record: Record, columns: dict[str, str]) -> RankedParts:
    items = _response_list(record, columns)
    keyed = [_scored_value(item, index, record) for index, item in enumerate(items)]
    keys = {key for key, _ in keyed}
    if len(keys) > 1:
        raise UserError(f"{record.where}: responses mix 'rank' and 'score'; use one of them per row")
    ranks = _dense_ranks([value for _, value in keyed], higher_is_better=keys == {"score"})
    return _mapped(record, "prompt", columns), [item["text"] for item in items], ranks


def _pairwise_parts(record: Record, columns: dict[str, str]) -> RankedParts:
    chosen, rejected = _mapped(record, "chosen", columns), _mapped(record, "rejected", columns)
    return _mapped(record, "prompt", columns), [chosen, rejected], [0, 1]


def _transcript_parts(record: Record, columns: dict[str, str]) -> RankedParts:
    chosen_prompt, chosen = _split_transcript(record, "chosen", columns)
    rejected_prompt, rejected = _split_transcript(record, "rejected", columns)
    if chosen_prompt != rejected_prompt:
        raise UserError(f"{record.where}: chosen and rejected differ before their last "
                        "'\\n\\nAssistant:'; both transcripts must share the conversation up to the answer")
    return chosen_prompt, [chosen, rejected], [0, 1]


def _split_transcript(record: Record, name: str, columns: dict[str, str]) -> tuple[list[dict], str]:
    """A transcript as (the conversation before its last turn, as messages; that turn's answer)."""
    transcript = _string(_mapped(record, name, columns), record, name)
    if TRANSCRIPT_ANSWER_MARK not in transcript:
        raise UserError(f"{record.where}: {name} has no '\\n\\nAssistant:' turn; a transcript must "
                        "end with the assistant's answer")
    messages = transcript_messages(transcript, record, name)
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{record.where}: {name} ends with a '\\n\\nHuman:' turn; a transcript "
                        "must end with the assistant's answer")
    return messages[:-1], messages[-1]["content"]


def _ultrafeedback_parts(record: Record, columns: dict[str, str]) -> RankedParts:
    completions = _response_list(record, columns, "completions")
    scores = [_completion_score(item, index, record) for index, item in enumerate(completions)]
    return (_mapped(record, "instruction", columns), [item["response"] for item in completions],
            _dense_ranks(scores, higher_is_better=True))


def _completion_score(item: Any, index: int, record: Record) -> float:
    """An UltraFeedback completion's `overall_score`, else the mean of its aspects' ratings
    (`annotations: {helpfulness: {Rating: "4"}, ...}`, "N/A" left out)."""
    where = f"completions[{index}]"
    if not isinstance(item, dict) or "response" not in item:
        raise UserError(f"{record.where}: {where} must be an object with 'response' and "
                        "'overall_score' (or 'annotations' with ratings); fix the row")
    if "overall_score" in item:
        return _finite_number(item["overall_score"], where, "overall_score", record)
    annotations = item.get("annotations")
    ratings = [aspect.get("Rating") for aspect in annotations.values()
               if isinstance(aspect, dict)] if isinstance(annotations, dict) else []
    numbers = [float(rating) for rating in ratings
               if isinstance(rating, (int, float, str)) and _is_number(rating)]
    if not numbers:
        raise UserError(f"{record.where}: {where} has no 'overall_score' and no numeric "
                        "annotations.*.Rating; give it a score")
    return sum(numbers) / len(numbers)


def _is_number(value: int | float | str) -> bool:
    try:
        return math.isfinite(float(value)) and not isinstance(value, bool)
    except ValueError:
        return False


RANKED_ADAPTERS: dict[str, Callable[[Record, dict[str, str]], RankedParts]] = {
    "ranked": ranked_parts,
    "scored": _scored_parts,
    "pairwise": _pairwise_parts,
    "transcripts": _transcript_parts,
    "ultrafeedback": _ultrafeedback_parts,
}


def _response_text(value: Any, index: int, record: Record) -> str:
    """A response is text, or a chat-message list whose last assistant message is the answer."""
    what = f"responses[{index}]"
    response = _text_or_turns(value, record, what)
    if isinstance(response, str):
        return response
    answers = [m["content"] for m in response if m["role"] == "assistant"]
    if not answers:
        raise UserError(f"{record.where}: {what} has no assistant message; give the answer as "
                        "text or as an assistant message")
    return answers[-1]


def ranked_row(record: Record, parts: RankedParts) -> dict:
    prompt, raw_responses, ranks = parts
    responses = [_response_text(value, index, record) for index, value in enumerate(raw_responses)]
    rank_of_text: dict[str, tuple[int, int]] = {}
    for index, (text, rank) in enumerate(zip(responses, ranks)):
        if not text.strip():
            raise UserError(f"{record.where}: responses[{index}] is empty; write the answer or remove it")
        first_index, first_rank = rank_of_text.setdefault(text.strip(), (index, rank))
        if first_rank != rank:
            raise UserError(f"{record.where}: responses[{first_index}] and responses[{index}] are the "
                            "same text ranked in different places; tie them or remove one")
    return {"prompt": _text_or_turns(prompt, record, "prompt"), "responses": responses, "ranks": ranks,
            "_line": record.line}


def load_ranked_rows(path_or_name: str | Path, fmt: str = "auto",
                     columns: dict[str, str] | None = None, hub: HubSplit = HubSplit()) -> list[dict]:
    """Load reward data as `{"prompt", "responses", "ranks", "_line"}` rows from any ranked format."""
    columns = _checked_columns(columns, RANKED_FORMATS)
    records = read_records(path_or_name, hub)
    adapter = RANKED_ADAPTERS[_resolved_format(fmt, records[0], columns, RANKED_FORMATS)]
    return [ranked_row(record, adapter(record, columns)) for record in records]
