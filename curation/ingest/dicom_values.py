"""DICOM header values as plain Python, leniently: a value that is missing, empty or does not
parse counts as absent (None or the default), because real archives hold every kind of odd
value and one odd optional attribute must not cost a whole series.

Each function takes what pydicom's `Dataset.get` or the fast header path gives (str, int,
float, pydicom's DSfloat/IS/MultiValue, a list) and returns a plain type.
"""

from __future__ import annotations

from typing import Any


def text(value: Any) -> str:
    """A string, "" for missing."""
    return str(value) if value is not None else ""


def as_list(value: Any) -> list[Any]:
    """A value as a list of its values (DICOM multiplicity)."""
    if value is None:
        return []
    if isinstance(value, (str, bytes, int, float)):
        return [value]
    return list(value)


def floats(value: Any, n: int) -> tuple[float, ...] | None:
    """Exactly `n` numbers, or None."""
    items = as_list(value)
    if len(items) != n:
        return None
    try:
        return tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None


def positive_pair(value: Any) -> tuple[float, float] | None:
    """Two numbers above zero (a spacing), or None."""
    pair = floats(value, 2)
    return pair if pair and min(pair) > 0 else None  # type: ignore[return-value]


def positive(value: Any) -> float | None:
    """A number above zero (a thickness, a spacing), or None."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if v > 0 else None


def number(value: Any, default: float) -> float:
    """A number, or `default` when missing or unparseable (RescaleSlope: 1)."""
    try:
        return float(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def integer(value: Any) -> int | None:
    """An integer, or None."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
