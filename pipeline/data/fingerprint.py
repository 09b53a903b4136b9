"""What a run's result depends on, as one digest: reuse and resume compare it.

Local files count by name and content (so the same data in another place fingerprints the same);
hub data sets by name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

from pipeline.data.formats import as_list, visible_files
from pipeline.guard import input_file


def fingerprint_files(paths: str | Path | Iterable[str | Path]) -> str:
    """A stable sha256 over file names and contents (directories: every visible file, sorted).

    Names are taken relative to the directory given (a plain file: its base name), so the same
    data in another place gives the same fingerprint.
    """
    digest = hashlib.sha256()
    for source in as_list(paths):
        root = Path(source).expanduser()
        if root.is_dir():
            named = [(path.relative_to(root).as_posix(), path) for path in visible_files(root)]
        else:
            named = [(root.name, input_file(root))]
        for name, path in named:
            # Length-prefixing keeps ("ab", "c") and ("a", "bc") apart.
            encoded = name.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "big") + encoded)
            digest.update(path.stat().st_size.to_bytes(8, "big"))
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(train_files: list[str], eval_files: list[str],
                     prompts_file: str | None) -> str:
    """One digest of a stage's inputs by role: local sources by content, hub data sets by name."""
    digest = hashlib.sha256()
    for role, sources in (("train", train_files), ("eval", eval_files),
                          ("prompts", [prompts_file] if prompts_file else [])):
        for source in sources:
            local = Path(source).expanduser().exists()
            digest.update(f"{role}\0{fingerprint_files(source) if local else source}\0".encode())
    return digest.hexdigest()
