"""The one exception type for mistakes a user can fix (bad config, bad data, bad reference).

The CLI prints its message as a single line and exits with code 2; no traceback. Messages say
what is wrong, where (file:line or the config key), and what to do.
"""


class UserError(Exception):
    """A problem with the user's input. `str(err)` is the whole message, one line."""


EXIT_USER_ERROR = 2
