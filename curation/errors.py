"""Exceptions a user can act on.

The command line prints a `CurationError` as one line (no traceback) and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class CurationError(Exception):
    """A problem with the user's input: a manifest, a path, a file. The message says what to fix."""


class ItemError(CurationError):
    """One input item could not be used. Carries the item's name so a ledger row can record it."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason
