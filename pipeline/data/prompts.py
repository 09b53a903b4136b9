"""Prompt files: JSON Lines of `{"prompt": ...}` rows, read with file:line errors.

- `read_prompts`: text prompts (the gold evals, whose scorer reads the question as text).
- `read_chat_prompts`: text or chat messages ending with the user's turn (`rlhf label`).
- `collected_answers`: the answers a row brings along (`rlhf data collect --labeler people`), which
  `rlhf label` shows instead of sampling its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.data.formats import Record, chat_turns, read_jsonl
from pipeline.errors import UserError

Prompt = str | list[dict]


def read_prompts(path: str | Path, n: int) -> list[str]:
    """The first `n` prompts of a JSONL file of `{"prompt": "..."}` rows."""
    prompts = []
    for line, row in read_jsonl(path)[:n]:
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"{path}:{line}: expected a non-empty text field 'prompt'; "
                            "write one {\"prompt\": \"...\"} object per line")
        prompts.append(prompt)
    return prompts


def read_chat_prompts(path: str | Path) -> list[Prompt]:
    """The prompts of a JSONL file of {"prompt": text or chat messages} rows, in file order."""
    prompts = []
    for line, row in read_jsonl(path):
        record = Record(str(path), line, row)
        if "prompt" not in row:
            raise UserError(f"{record.where}: no 'prompt' field; write one "
                            "{\"prompt\": \"...\"} object per line")
        prompts.append(checked_prompt(row["prompt"], record))
    return prompts


def checked_prompt(value: Any, record: Record) -> Prompt:
    """Non-empty text, or chat messages ending with the user's turn (the answer comes next)."""
    if isinstance(value, list):
        messages = chat_turns(value, record, "prompt")
        if messages[-1]["role"] != "user":
            raise UserError(f"{record.where}: the prompt's last message is from "
                            f"'{messages[-1]['role']}'; end it with the user's message")
        return messages
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{record.where}: 'prompt' must be non-empty text or a list of chat "
                        "messages; fix the row")
    return value


def collected_answers(path: str | Path) -> dict[int, list[str]]:
    """{prompt index: its answers} for the rows of a prompts file that carry "responses" (two or
    more different, non-empty texts), indexed as `read_chat_prompts` orders the prompts."""
    found = {}
    for index, (line, row) in enumerate(read_jsonl(path)):
        answers = row.get("responses")
        if answers is None:
            continue
        if not isinstance(answers, list) or not all(isinstance(a, str) and a.strip()
                                                    for a in answers) \
                or len(set(answers)) < 2 or len(set(answers)) != len(answers):
            raise UserError(f"{path}:{line}: 'responses' must be a list of two or more different, "
                            "non-empty answers; fix the row or remove the field to sample answers")
        found[index] = answers
    return found
