"""The filters templates may use besides Jinja's own: small pure functions of text and data.

`label` (`Pleural_Thickening` → `pleural thickening`), `ml` (a volume as text), `join_and`,
`plural`, `largest`, `without` and `format_each`. The sandbox wraps each in the template budget
(`curation.render.templates`); here they are plain functions, with doctests.
"""

from __future__ import annotations

import operator
import string
from collections.abc import Iterable
from functools import lru_cache
from typing import Any

from curation.render.prompt_data import check_phrasing

@lru_cache(maxsize=4096)
def label_text(name: str) -> str:
    """A class name as text: lower case, `_` as a space (VILA-M3's CXR convention).

    >>> label_text("Pleural_Thickening")
    'pleural thickening'
    """
    return str(name).lower().replace("_", " ")


def ml_text(volume: float) -> str:
    """A volume as text, one decimal.

    >>> ml_text(1505.754)
    '1505.8 mL'
    """
    return f"{float(volume):.1f} mL"


def join_and(values: Iterable[Any], word: str = "and") -> str:
    """`a, b and c`.

    >>> join_and(["liver"]), join_and(["liver", "spleen", "aorta"])
    ('liver', 'liver, spleen and aorta')
    """
    items = [str(v) for v in values]
    if len(items) < 2:
        return "".join(items)
    return f"{', '.join(items[:-1])} {word} {items[-1]}"


def plural(word: str, count: int = 2) -> str:
    """The word with an `s` unless count is 1 (enough for the names our experts use)."""
    return str(word) if count == 1 else f"{word}s"


def largest(structures: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The structure with the largest `volume_ml` (the first of equals); None for none.

    >>> largest([{"name": "a", "volume_ml": 2.0}, {"name": "b", "volume_ml": 5.0}])["name"]
    'b'
    """
    best = None
    for s in structures:
        if best is None or s["volume_ml"] > best["volume_ml"]:
            best = s
    return best


def without(values: Iterable[Any], others: Iterable[Any]) -> list[Any]:
    """The values not among `others`, in order.

    >>> without(["liver", "spleen", "aorta"], ["spleen"])
    ['liver', 'aorta']
    """
    drop = set(others)
    return [v for v in values if v not in drop]


@lru_cache(maxsize=256)
def _each_pattern(pattern: str) -> tuple[str, Any] | None:
    """A checked `format_each` pattern whose fields are all plain (no format spec) as %-style
    text and a getter of its fields' values: `str.format_map` parses the pattern again for
    every entry, which made this filter the slowest step of a VISTA3D conversation. None: use
    `format_map` (a field has a format spec)."""
    check_phrasing(pattern, "format_each")
    parts = list(string.Formatter().parse(pattern))
    if any(spec for _, f, spec, _ in parts if f is not None):
        return None
    fields = [f for _, f, _, _ in parts if f is not None]
    text = "".join(literal.replace("%", "%%") + ("%s" if f is not None else "") for literal, f, _, _ in parts)
    if len(fields) == 1:
        one = operator.itemgetter(fields[0])
        return text, lambda v: (one(v),)
    return text, operator.itemgetter(*fields) if fields else (lambda v: ())


def format_each(values: Iterable[dict[str, Any]], pattern: str) -> list[str]:
    """`pattern` filled from each mapping: `structures | format_each("the {name} ({colour})")`.

    >>> format_each([{"name": "liver", "colour": "red", "volume_ml": 2.0}], "the {name} ({colour}), 100% {volume_ml}")
    ['the liver (red), 100% 2.0']
    >>> format_each([{"volume_ml": 1505.75}], "{volume_ml:.1f} mL")
    ['1505.8 mL']
    """
    fast = _each_pattern(pattern)
    try:
        if fast is None:
            return [pattern.format_map(v) for v in values]
        text, fields = fast
        return [text % fields(v) for v in values]
    except KeyError as e:
        raise KeyError(f"format_each: pattern {pattern!r} names {e.args[0]!r}, which an entry lacks") from None


FILTERS = {
    "label": label_text,
    "ml": ml_text,
    "join_and": join_and,
    "plural": plural,
    "without": without,
    "largest": largest,
    "format_each": format_each,
}
