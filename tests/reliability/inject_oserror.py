"""Run `rlhf` with a disk error injected into one checkpoint commit, as a full or read-only disk
raises it while the commit flushes its files:

    python tests/reliability/inject_oserror.py ENOSPC step-4 --home H run pretrain ...

The second argument names the committed directory whose flush fails (`step-4`, `model`); every
other commit goes through. The process otherwise is `rlhf` itself, so its stderr and exit code are
what a user would see.
"""

from __future__ import annotations

import errno
import os
import sys

import pipeline.registry as registry
from pipeline.commands.cli import main


def fail_commit(code: int, name: str) -> None:
    flush = registry._fsync_tree

    def flush_or_fail(root):
        if root.name.startswith(f".tmp-{name}-"):
            raise OSError(code, os.strerror(code))  # as os.write / os.fsync raise it: no path
        flush(root)

    registry._fsync_tree = flush_or_fail


if __name__ == "__main__":
    fail_commit(getattr(errno, sys.argv[1]), sys.argv[2])
    sys.exit(main(sys.argv[3:]))
