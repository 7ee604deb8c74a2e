"""User-facing errors.

Anything the user can fix (a missing file, a malformed TOML, an unknown strategy, a budget
larger than the pool, ...) is raised as :class:`QBudgetError` with a one-line message that
names the problem. The CLI turns it into that line on stderr and exit code 2, never a
traceback. Internal bugs stay ordinary exceptions.
"""


class QBudgetError(Exception):
    """A problem with the user's input, reported as one line and exit code 2."""

    exit_code = 2
