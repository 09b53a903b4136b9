"""The one exception type for mistakes a user can fix (bad config, bad data, bad reference).

The CLI prints its message as a single line and exits with code 2; no traceback. Messages say
what is wrong, where (file:line or the config key), and what to do.
"""

from __future__ import annotations

import sys
from typing import Callable


class UserError(Exception):
    """A problem with the user's input. `str(err)` is the whole message, one line: line breaks
    in it (a quoted key, path or value of the user's may hold some) are written as \\n."""

    def __init__(self, message: str):
        super().__init__(message.replace("\r", "\\r").replace("\n", "\\n"))


def first_line(err: Exception) -> str:
    """The first line of an exception's message (its type name when it has none): library
    errors can span many lines, and the project's messages are one."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130  # as a shell reports a process ended by Ctrl-C (SIGINT)


def run_command(command: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """`command()`'s exit code; a UserError is printed as one line (exit 2), Ctrl-C as
    `interrupted` (exit 130), neither with a traceback."""
    try:
        return command() or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return EXIT_INTERRUPTED
