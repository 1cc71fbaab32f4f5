"""Exceptions a user can act on, and the one way a pydantic validation error becomes a message.

The command line prints a `CurationError` as one line (no traceback) and exits with status 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydantic import ValidationError


class CurationError(Exception):
    """A problem with the user's input: a manifest, a path, a file. The message says what to fix."""


class ItemError(CurationError):
    """One input item could not be used. Carries the item's name so a ledger row can record it."""

    def __init__(self, where: str, reason: str):
        super().__init__(f"{where}: {reason}")
        self.where = where
        self.reason = reason


# How a CurationError raised in a Ray worker reaches the driver, where Ray wraps it: Ray Data
# in a UserCodeException `from` it, Ray Train in a WorkerGroupError of every rank's failure.
# Only the worker's traceback text crosses the process boundary (an exception's pickle drops
# its __cause__), whose line for it reads so.
REMOTE_ERROR = re.compile(r"^curation\.errors\.(\w+): (.+)$", re.MULTILINE)


def user_error(error: BaseException) -> CurationError | None:
    """The `CurationError` (a full disk, a damaged file) at the root of an exception Ray
    wrapped, raised in this process or in a worker (`REMOTE_ERROR`); None for a bug."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, CurationError):
            return e
        todo += [e.__cause__, e.__context__, getattr(e, "cause", None)]
    for found in REMOTE_ERROR.finditer(str(error)):
        kind = globals().get(found.group(1))
        if isinstance(kind, type) and issubclass(kind, CurationError):
            return CurationError(found.group(2))
    return None


def brief(error: BaseException) -> str:
    """A library's error for a line of ours: on one line, its first sentence (the rest is
    usually its advice, or its guesses).

    >>> brief(RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory. This is an "
    ...                    "internal miniz error."))
    'PytorchStreamReader failed reading zip archive: failed finding central directory'
    """
    return " ".join(str(error).split()).split(". ")[0].rstrip(".: ")


def validation_message(err: ValidationError, *, prefix: str = "", unknown: str = "unknown key (check its spelling)",
                       empty: str = "", show_input: bool = True) -> str:
    """Every problem of a pydantic `ValidationError` as `key: what is wrong`, joined by "; ".

    The manifest, template declarations and runner options all report through this, so a typo
    reads the same everywhere: keys as written in YAML (`sources[0].dicom.rooot`), `prefix`
    before each key (`options.`), `unknown` for a key that is not declared, `empty` as the key
    of a problem with the whole mapping, and the offending value when `show_input` (not for
    mappings, which would flood the line).

    >>> from pydantic import BaseModel, ConfigDict
    >>> class M(BaseModel):
    ...     model_config = ConfigDict(extra="forbid")
    ...     n: int
    >>> try:
    ...     M.model_validate({"n": "x", "m": 1})
    ... except Exception as e:
    ...     print(validation_message(e))
    n: Input should be a valid integer, unable to parse string as an integer (got 'x'); m: unknown key (check its spelling)
    """
    parts = []
    for e in err.errors():
        loc = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in e["loc"]).replace(".[", "[")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = unknown
        elif show_input and "input" in e and e["type"] != "missing" and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        key = f"{prefix}{loc}" if loc else empty
        parts.append(f"{key}: {msg}" if key else msg)
    return "; ".join(parts)
