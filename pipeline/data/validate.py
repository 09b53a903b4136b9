"""`rlhf data validate`: which stages can read a data file, checked row by row by the readers the
stages themselves use, so a file that validates for a stage loads in that stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.data.formats import (RANKED_FORMATS, SFT_FORMATS, detect_format, load_ranked_rows,
                                   load_sft_rows, read_records, read_text_corpus)
from pipeline.data.prompts import read_chat_prompts
from pipeline.errors import UserError
from pipeline.guard import path_problem


@dataclass(frozen=True)
class Reader:
    """How one stage reads a file: the config key that takes it, what a row is, the reader, and
    whether a first row is in the stage's format at all (its columns, with the default names)."""

    key: str
    unit: str
    read: Callable[[str], list]
    recognizes: Callable[[dict], bool]


READERS = {
    "pretrain": Reader("data.sources", "documents", read_text_corpus, lambda row: "text" in row),
    "sft": Reader("data.train_files", "conversations", load_sft_rows,
                  lambda row: detect_format(row, SFT_FORMATS) is not None),
    "reward": Reader("data.train_files", "ranked prompts", load_ranked_rows,
                     lambda row: detect_format(row, RANKED_FORMATS) is not None),
    "ppo": Reader("data.prompts_file", "prompts", read_chat_prompts, lambda row: "prompt" in row),
}


@dataclass(frozen=True)
class Fit:
    """One stage's verdict on a file: the row count when it reads, else why not, and whether the
    file is in that stage's format (then a problem is a bad row, not a different kind of file)."""

    stage: str
    rows: int | None
    problem: str | None = None
    recognized: bool = True


def stage_fits(path: str, stages: list[str] | None = None) -> list[Fit]:
    """Each stage's reader (all, or `stages`) run over the whole file."""
    problem = path_problem(Path(path), "any")
    if problem:
        raise UserError(f"{path}: {problem}")
    first = _first_row(path)
    fits = []
    for stage in stages or list(READERS):
        reader = READERS[stage]
        try:
            fits.append(Fit(stage, len(reader.read(path))))
        except UserError as err:
            plain_text = stage == "pretrain" and Path(path).suffix == ".txt"
            fits.append(Fit(stage, None, str(err), plain_text or reader.recognizes(first)))
    return fits


def _first_row(path: str) -> dict:
    """The first row of a file of rows (JSON Lines, JSON array, Parquet); {} for a text file or a
    file no reader can open (each reader then says why)."""
    try:
        records = read_records(path)
    except UserError:
        return {}
    return records[0].row if records else {}


def validate(path: str, stage: str | None = None) -> list[Fit]:
    """The stages that can read `path` (only `stage` when given). A UserError with the first bad
    row when the file is in a stage's format but a row is wrong (a ranked file with a bad ranking
    is refused, though its prompts alone would feed PPO), or with each reader's problem when no
    stage can read it."""
    fits = stage_fits(path, [stage] if stage else None)
    broken = [fit for fit in fits if fit.rows is None and (fit.recognized or stage)]
    if broken:
        raise UserError(broken[0].problem)
    readable = [fit for fit in fits if fit.rows is not None]
    if readable:
        return readable
    reasons = "; ".join(f"as {fit.stage} data: {fit.problem}" for fit in fits)
    raise UserError(f"no stage can read {path} ({reasons})")


def describe(path: str, fits: list[Fit]) -> str:
    lines = [f"{path}:"]
    for fit in fits:
        reader = READERS[fit.stage]
        lines.append(f"  {fit.stage:<8} {fit.rows} valid {reader.unit} (use it as {reader.key})")
    return "\n".join(lines)
