"""The files `rlhf label` writes, and how a reopened session finds its place.

Three append-only JSON Lines files; a row is written whole, flushed and fsync'd before the page
hears "recorded", so a crash loses nothing already submitted:

    OUT            ranked rows {"prompt", "responses", "ranking"} (reward_data/README.md) and
                   nothing else, so `rlhf run reward data.train_files=[OUT]` reads it unchanged
    OUT.progress   the prompts set aside: {"action": "skipped" | "flagged", "prompt", "note"}; its
                   suffix keeps it out of a directory of reward files
    FEEDBACK       pairwise rows {"prompt": chat messages, "chosen", "rejected"} from the chat tab

Resuming: a prompt is done when OUT holds a ranking of it or OUT.progress set it aside. Prompts are
matched by content, not position, so an edited prompts file still resumes; a prompt listed twice
needs two decisions.

A team (the page served beyond localhost): every row also names its labeler, and a prompt is done
for a labeler who decided it, and for everyone once `per_prompt` labelers ranked it; with
`per_prompt` 2 or more, `labeler_agreement` says how often two labelers order two answers alike. A crash in the middle of a write can leave an unfinished last line; reopening
drops it (and says so) before the next row is appended. A bad line anywhere else is the user's to
look at: it stops the command with file:line.
"""

from __future__ import annotations

import fcntl
import json
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.data.formats import (JSONL_SUFFIXES, Record, is_int, parse_object, ranked_parts,
                                   ranked_row)
from pipeline.data.prompts import Prompt, checked_prompt, read_chat_prompts
from pipeline.errors import UserError
from pipeline.guard import NOT_FOUND, path_problem
from pipeline.ranking import rank_positions
from pipeline.registry import fsync_dir

SET_ASIDE = ("skipped", "flagged")


def prompt_key(prompt: Prompt) -> str:
    """One string per distinct prompt (text or chat messages), for matching rows to prompts."""
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def checked_out_path(path: str | Path, option: str) -> Path:
    """A file the command may create or extend: in an existing directory, named .jsonl/.json."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{option} {path} is a directory; name a .jsonl file")
    problem = path_problem(path, "file")
    if problem and problem != NOT_FOUND["file"]:  # a FIFO would block, a loop never resolve
        raise UserError(f"{option} {path} {problem}; name a regular .jsonl file")
    if not path.parent.is_dir():
        raise UserError(f"{option} {path}: the directory {path.parent} does not exist; create it "
                        "or choose another path")
    if path.suffix not in JSONL_SUFFIXES:  # what the reward stage reads as JSON Lines
        raise UserError(f"{option} {path}: name it .jsonl, so that the reward stage reads it")
    return path


def ranking_row(prompt: Prompt, answers: list[str], groups: list[list[int]]) -> dict:
    """The ranked row for answers ordered best → worst in `groups` (a group of several is a
    tie): [[2], [0, 3], [1]] → "ranking": [2, [0, 3], 1]. Checked as the reward stage checks it;
    a mistake raises UserError."""
    if not isinstance(groups, list) or not all(
            isinstance(group, list) and group and all(is_int(item) for item in group)
            for group in groups):
        raise UserError("a ranking is a list of non-empty groups of answer indices, best first")
    ranking = [group[0] if len(group) == 1 else sorted(group) for group in groups]
    row = {"prompt": prompt, "responses": list(answers), "ranking": ranking}
    check_ranked_row(row, Record("ranking", 1, row))
    return row


def check_ranked_row(row: dict, record: Record) -> None:
    """The reward stage's own checks of one ranked row (every index once, no empty answer, equal
    answers tied); raises UserError naming `record.where`."""
    for name in ("prompt", "responses", "ranking"):
        if name not in row:
            raise UserError(f"{record.where}: no '{name}' field; this file holds ranked rows "
                            "{\"prompt\", \"responses\", \"ranking\"} only")
    ranked_row(record, ranked_parts(record, {}))


def feedback_rows(messages: Any, chosen: Any, rejected: Any) -> list[dict]:
    """Pairwise rows, one per answer the user turned away from, against the answer kept.

    Empty answers and answers equal to the kept one are left out: they say nothing about which is
    better, and the reward stage refuses them.
    """
    record = Record("chat", 1, {})
    prompt = checked_prompt(messages, record) if isinstance(messages, list) else None
    if prompt is None or not isinstance(chosen, str) or not isinstance(rejected, list) or \
            not all(isinstance(text, str) for text in rejected):
        raise UserError("feedback needs messages (a list ending with the user's turn), the kept "
                        "answer and a list of the answers turned away from")
    if not chosen.strip():
        return []
    others = dict.fromkeys(text for text in rejected if text.strip() and
                           text.strip() != chosen.strip())
    return [{"prompt": prompt, "chosen": chosen, "rejected": text} for text in others]


def distinct_answers(draw, k: int, attempts: int = 3) -> list[str]:
    """Up to `k` different non-empty answers, drawing `draw(n, attempt)` → n samples up to
    `attempts` times: the same answer twice cannot be ranked against itself."""
    answers: list[str] = []
    seen: set[str] = set()
    for attempt in range(attempts):
        for text in draw(k - len(answers), attempt):
            if text.strip() and text.strip() not in seen:
                seen.add(text.strip())
                answers.append(text)
        if len(answers) >= k:
            break
    return answers[:k]


# -- append-only JSON Lines files -----------------------------------------------------------------
@dataclass
class Scan:
    """What a JSON Lines file holds: its complete rows and how to make it safe to append to."""

    rows: list[tuple[int, dict]]
    keep_bytes: int             # the file's length once an unfinished last line is dropped
    needs_newline: bool = False  # the last row is complete but its line ending was not written
    dropped: bytes = b""        # the unfinished last line


def scan_jsonl(path: Path) -> Scan:
    """Read a file this module appends to; a missing file is an empty one."""
    if not path.exists():
        return Scan([], 0)
    content = path.read_bytes()
    body, _, tail = content.rpartition(b"\n")
    lines = body.split(b"\n") if body or content.startswith(b"\n") else []
    rows = [(number, parse_line(raw, f"{path}:{number}"))
            for number, raw in enumerate(lines, start=1) if raw.strip()]
    if not tail.strip():
        return Scan(rows, len(content))
    try:  # the write stopped after the row but before its line ending: the row is whole
        rows.append((len(lines) + 1, parse_object(tail.decode("utf-8"), "")))
        return Scan(rows, len(content), needs_newline=True)
    except (UserError, UnicodeDecodeError):
        return Scan(rows, len(content) - len(tail), dropped=tail)


def parse_line(raw: bytes, where: str) -> dict:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{where}: not valid UTF-8; this file was not written by `rlhf label`, "
                        "choose another output file") from None
    return parse_object(text.rstrip("\r"), where)


class JsonlLog:
    """An append-only JSON Lines file: each row written in one piece, flushed and fsync'd."""

    def __init__(self, path: Path):
        self.path = path
        self.scan = scan_jsonl(path)
        self.handle = None

    @property
    def rows(self) -> list[dict]:
        return [row for _, row in self.scan.rows]

    def open(self, exclusive: bool = False) -> None:
        """Make the file ready to append to: drop an unfinished last line (with a note), end a
        complete one; `exclusive` refuses a second process writing the same file."""
        created = not self.path.exists()
        self.handle = open(self.path, "ab")
        if exclusive:
            try:
                fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self.handle.close()
                raise UserError(f"{self.path} is held by another `rlhf label` writing the same "
                                "output; stop it or choose another output file") from None
        if self.scan.dropped:
            print(f"label: {self.path}: dropped an unfinished last line ({len(self.scan.dropped)} "
                  "bytes) left by an interrupted write", file=sys.stderr)
            os.truncate(self.handle.fileno(), self.scan.keep_bytes)
        elif self.scan.needs_newline:
            self._write(b"\n")
        if created:  # the new file's directory entry must survive a crash too
            fsync_dir(self.path.parent)

    def append(self, rows: list[dict]) -> None:
        if self.handle is None:
            self.open()
        self._write(b"".join(json_line(row) for row in rows))
        self.scan.rows += [(0, row) for row in rows]

    def _write(self, data: bytes) -> None:
        self.handle.write(data)
        self.handle.flush()
        os.fsync(self.handle.fileno())

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def json_line(row: dict) -> bytes:
    # Keys sorted, as the shipped reward files are; json escapes control characters and "\n".
    return (json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")


# -- where the session stands ---------------------------------------------------------------------
def signed(row: dict, labeler: str | None) -> dict:
    """The row with its labeler's name, when there is one (a team's page)."""
    return row if labeler is None else {**row, "labeler": labeler}


def labeler_agreement(rows: list[dict]) -> dict:
    """How often two labelers order two answers alike, over the prompts several of them ranked.

    For each prompt, each pair of labelers who ranked the same answers, and each pair of answers
    both ordered strictly: agreement is the share of such answer pairs they ordered the same way.
    Returns {"prompts", "pairs", "agreement" (None without pairs), "by_labelers": {"a + b":
    {"pairs", "agreement"}}}.
    """
    by_prompt: dict[str, list[tuple[str, dict[str, int]]]] = {}
    for row in rows:
        if row.get("labeler") is None:
            continue
        places = rank_positions(row["ranking"])
        rank_of = {answer: places[index] for index, answer in enumerate(row["responses"])}
        by_prompt.setdefault(prompt_key(row["prompt"]), []).append((row["labeler"], rank_of))
    tally: dict[str, list[int]] = {}  # "a + b" → [agreeing pairs, pairs]
    prompts = 0
    for rankings in by_prompt.values():
        compared = False
        for first, (name_a, ranks_a) in enumerate(rankings):
            for name_b, ranks_b in rankings[first + 1:]:
                if name_a == name_b or set(ranks_a) != set(ranks_b):
                    continue
                compared = True
                counts = tally.setdefault(" + ".join(sorted((name_a, name_b))), [0, 0])
                for agree in answer_pair_agreements(ranks_a, ranks_b):
                    counts[0] += agree
                    counts[1] += 1
        prompts += compared
    agreeing, pairs = sum(c[0] for c in tally.values()), sum(c[1] for c in tally.values())
    return {"prompts": prompts, "pairs": pairs,
            "agreement": agreeing / pairs if pairs else None,
            "by_labelers": {names: {"pairs": n, "agreement": a / n if n else None}
                            for names, (a, n) in sorted(tally.items())}}


def answer_pair_agreements(ranks_a: dict[str, int], ranks_b: dict[str, int]) -> list[bool]:
    """For each pair of answers both labelers ordered strictly (no tie on either side): whether
    they put it in the same order."""
    answers = sorted(ranks_a)
    return [(ranks_a[x] < ranks_a[y]) == (ranks_b[x] < ranks_b[y])
            for i, x in enumerate(answers) for y in answers[i + 1:]
            if ranks_a[x] != ranks_a[y] and ranks_b[x] != ranks_b[y]]


def pending_indices(prompts: list[Prompt], done: Counter) -> list[int]:
    """Indices of the prompts still to label; `done` counts the decisions made per prompt key."""
    left = Counter(done)
    pending = []
    for index, prompt in enumerate(prompts):
        key = prompt_key(prompt)
        if left[key] > 0:
            left[key] -= 1
        else:
            pending.append(index)
    return pending


@dataclass
class LabelStore:
    """The prompts, the three files and what is left to do (for each labeler: None when the
    page is served on this machine alone and rows name nobody)."""

    prompts: list[Prompt]
    out: JsonlLog
    progress: JsonlLog
    feedback: JsonlLog
    per_prompt: int = 1  # labelers who rank each prompt
    record_ms: list[float] = field(default_factory=list)

    @classmethod
    def load(cls, prompts_file: str | Path, out: Path, feedback: Path,
             per_prompt: int = 1) -> LabelStore:
        """Read everything and check it; nothing is written until `open`."""
        prompts = read_chat_prompts(prompts_file)
        store = cls(prompts, JsonlLog(out), JsonlLog(out.with_name(out.name + ".progress")),
                    JsonlLog(feedback), per_prompt)
        for line, row in store.out.scan.rows:
            check_ranked_row(row, Record(str(out), line, row))
        for line, row in store.progress.scan.rows:
            if row.get("action") not in SET_ASIDE or "prompt" not in row:
                raise UserError(f"{store.progress.path}:{line}: not a progress row of `rlhf "
                                "label`; move the file away to start over")
        return store

    def open(self) -> None:
        """Ready the files for appending. The progress file is created now and locked for this
        process; OUT and FEEDBACK only when a row comes, since an empty .jsonl file is one the
        reward stage refuses."""
        self.progress.open(exclusive=True)
        for log in (self.out, self.feedback):
            if log.path.exists():
                log.open()

    def close(self) -> None:
        for log in (self.out, self.progress, self.feedback):
            log.close()

    def pending(self, labeler: str | None = None) -> list[int]:
        """Indices of the prompts `labeler` has still to decide, in file order: not decided by
        them, and not yet ranked by `per_prompt` labelers."""
        own = Counter(prompt_key(row["prompt"]) for row in self.out.rows + self.progress.rows
                      if row.get("labeler") == labeler)
        ranked = Counter(prompt_key(row["prompt"]) for row in self.out.rows)
        covered = Counter({key: count // self.per_prompt for key, count in ranked.items()})
        still_open = set(pending_indices(self.prompts, covered))
        return [index for index in pending_indices(self.prompts, own) if index in still_open]

    def current(self, labeler: str | None = None) -> int | None:
        pending = self.pending(labeler)
        return pending[0] if pending else None

    def check_pending(self, index: Any, labeler: str | None = None) -> int:
        if not is_int(index) or index not in self.pending(labeler):
            raise UserError(f"prompt {index} is not waiting for a decision (already done?); "
                            "reload the page")
        return index

    def record_ranking(self, index: Any, answers: list[str], groups: list[list[int]],
                       labeler: str | None = None) -> dict:
        """Check the ranking of prompt `index`, append its row to OUT (fsync'd) and time it."""
        started = time.perf_counter()
        row = ranking_row(self.prompts[self.check_pending(index, labeler)], answers, groups)
        self.out.append([signed(row, labeler)])
        self.record_ms.append((time.perf_counter() - started) * 1000)
        return row

    def set_aside(self, index: int, action: str, note: str = "",
                  labeler: str | None = None) -> None:
        if action not in SET_ASIDE:
            raise UserError(f"unknown action {action!r}; use one of {', '.join(SET_ASIDE)}")
        row = {"action": action, "prompt": self.prompts[self.check_pending(index, labeler)]}
        if note.strip():
            row["note"] = note.strip()
        self.progress.append([signed(row, labeler)])

    def save_feedback(self, messages: Any, chosen: Any, rejected: Any,
                      labeler: str | None = None) -> int:
        rows = feedback_rows(messages, chosen, rejected)
        if rows:
            self.feedback.append([signed(row, labeler) for row in rows])
        return len(rows)

    def counts(self, labeler: str | None = None) -> dict:
        actions = Counter(row["action"] for row in self.progress.rows)
        return {"total": len(self.prompts), "remaining": len(self.pending(labeler)),
                "ranked": len(self.out.rows), "skipped": actions["skipped"],
                "flagged": actions["flagged"], "chat_pairs": len(self.feedback.rows)}

    def timing(self) -> dict:
        """Server-side milliseconds to check, append and fsync one ranking (this session)."""
        times = self.record_ms
        if not times:
            return {"n": 0}
        return {"n": len(times), "last": times[-1], "mean": statistics.fmean(times),
                "median": statistics.median(times), "max": max(times)}
