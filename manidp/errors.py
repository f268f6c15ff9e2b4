"""One exception type for every mistake a user can fix.

The command line catches :class:`UserError` and prints its message alone (no
traceback), so each message must say what is wrong and what to change.
"""


class UserError(Exception):
    """Bad input from the user: an unknown name, a missing path, a corrupt file."""


def unknown_name(kind: str, name: str, valid) -> UserError:
    """The message every registry gives for a name it does not know."""
    choices = ", ".join(sorted(valid)) or "(none registered)"
    return UserError(f"unknown {kind} '{name}'; valid {kind}s: {choices}")
