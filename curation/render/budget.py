"""What one rendering may spend: a step budget every loop, call, filter and operator draws on,
and a size cap on every text or list a template builds.

Jinja's sandbox bounds `range` and `*` only; `replace`, `center`, `ljust`, `%`-format, `format`,
`format_each`, `~` and `+` in a loop can each build gigabytes in seconds, and nested loops run
unbounded. Here every value a template makes is checked *before* it is made where the operation
can grow it (an integer argument above the cap, a format string asking for a wide field, a
`replace` whose result would be too long, a `join` of too much) and measured after; every loop
item, call, filter and operator costs a step, and every produced text costs steps in proportion
to its length (so building a string by repeated concatenation runs out of steps long before it
runs out of memory). Output written by a turn, a macro or a `{% set %}` block is counted as it
is written. Exceeding any limit raises `BudgetExceeded`, which the renderer reports as a
template error naming the line; in a build the item is set aside and the rest goes on.

The limits are constants, not manifest options: they are far above what a conversation needs
(a VISTA3D conversation uses a few hundred steps and a few kilobytes) and far below what hurts.

>>> b = Budget()
>>> b.value("x" * 10, "demo") == "x" * 10
True
>>> check_format("%5s and {:>10}", "demo")
>>> check_format("%1000000000s", "demo")
Traceback (most recent call last):
...
curation.render.budget.BudgetExceeded: demo asks for a field of 1000000000 characters; the limit is 1,000,000
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

MAX_TEXT = 1_000_000  # characters in any one value a template builds, and in a whole conversation
MAX_ITEMS = 100_000  # items in any one list a template builds (Jinja's own range limit too)
MAX_STEPS = 1_000_000  # loop items, calls, filters, operators (and text produced / CHARS_PER_STEP)
MAX_OUTPUT = 8 * MAX_TEXT  # characters written to all output buffers of one rendering
CHARS_PER_STEP = 256

_INTEGER = re.compile(r"\d+")


class BudgetExceeded(Exception):
    """A template went over a limit of its budget (the message says which and how far)."""


class Budget:
    """The counters of one rendering."""

    __slots__ = ("output", "steps")

    def __init__(self) -> None:
        self.steps = 0
        self.output = 0

    def step(self, n: int = 1) -> None:
        self.steps += n
        if self.steps > MAX_STEPS:
            raise BudgetExceeded(f"the template ran more than {MAX_STEPS:,} steps (loop items, calls, filters; long texts count more): "
                                 "a loop that does not end soon enough")

    def value(self, value: Any, what: str) -> Any:
        """`value` if its size is within the caps (charging steps for its length), else raise."""
        if isinstance(value, (str, bytes)):
            if len(value) > MAX_TEXT:
                raise BudgetExceeded(f"{what} built a text of {len(value):,} characters; the limit is {MAX_TEXT:,}")
            self.step(1 + len(value) // CHARS_PER_STEP)
        elif isinstance(value, (list, tuple, dict, set)):
            if len(value) > MAX_ITEMS:
                raise BudgetExceeded(f"{what} built a collection of {len(value):,} items; the limit is {MAX_ITEMS:,}")
            if isinstance(value, (list, tuple)):
                size = sum(len(v) for v in value if isinstance(v, (str, bytes)))
                if size > MAX_TEXT:
                    raise BudgetExceeded(f"{what} built texts of {size:,} characters; the limit is {MAX_TEXT:,}")
            self.step(1 + len(value) // CHARS_PER_STEP)
        elif type(value) is int and value.bit_length() > 65536:
            raise BudgetExceeded(f"{what} built a {value.bit_length():,}-bit number; the limit is 65,536 bits")
        else:
            self.step()
        return value

    def write(self, text: str) -> None:
        """Output written to a buffer (a turn's body, a macro's, a `{% set %}` block's)."""
        n = len(text)
        self.output += n
        self.steps += 1 + n // CHARS_PER_STEP
        if self.output > MAX_OUTPUT:
            raise BudgetExceeded(f"the template wrote more than {MAX_OUTPUT:,} characters of output")
        if self.steps > MAX_STEPS:
            self.step(0)  # raises, with the message


def check_arguments(args: Iterable[Any], kwargs: dict[str, Any], what: str) -> None:
    """No integer argument may ask for more than the cap (a width, a count, a repeat)."""
    for v in (*args, *kwargs.values()):
        if type(v) is int and abs(v) > MAX_TEXT:
            raise BudgetExceeded(f"{what} was given {v:,}; arguments above {MAX_TEXT:,} are refused (they would build huge values)")
        if type(v) in (tuple, list) and len(v) <= 64:  # `"%*s" % (10**9, x)`: a width inside the operand
            for w in v:
                if type(w) is int and abs(w) > MAX_TEXT:
                    raise BudgetExceeded(f"{what} was given {w:,}; arguments above {MAX_TEXT:,} are refused (they would build huge values)")


def check_format(pattern: Any, what: str) -> None:
    """A `%`- or `{}`-format string may not ask for a field wider than the cap."""
    if isinstance(pattern, str):
        for m in _INTEGER.finditer(pattern):
            if len(m.group()) > 6 and int(m.group()) > MAX_TEXT:
                raise BudgetExceeded(f"{what} asks for a field of {int(m.group())} characters; the limit is {MAX_TEXT:,}")


def check_replace(text: Any, old: Any, new: Any, count: Any = -1) -> None:
    """`text.replace(old, new)` may not grow past the cap (computed without building it)."""
    if isinstance(text, str) and isinstance(old, str) and isinstance(new, str):
        hits = text.count(old) if old else len(text) + 1
        if isinstance(count, int) and count >= 0:
            hits = min(hits, count)
        size = len(text) + hits * (len(new) - len(old))
        if size > MAX_TEXT:
            raise BudgetExceeded(f"replace would build a text of {size:,} characters; the limit is {MAX_TEXT:,}")


def check_join(parts: list[Any], separator: Any, what: str) -> None:
    """A join of `parts` may not pass the cap (computed without building it)."""
    size = sum(len(p) if isinstance(p, str) else 16 for p in parts) + len(str(separator)) * max(len(parts) - 1, 0)
    if size > MAX_TEXT:
        raise BudgetExceeded(f"{what} would build a text of {size:,} characters; the limit is {MAX_TEXT:,}")


def counted(values: Iterable[Any], budget: Budget | None) -> Iterator[Any]:
    """A loop's items, one step each."""
    if budget is None:
        yield from values
        return
    for v in values:
        budget.step()
        yield v


class OutputBuffer(list):  # type: ignore[type-arg]
    """A template's output buffer that counts what is written to it."""

    __slots__ = ("budget",)

    def __init__(self, budget: Budget | None):
        super().__init__()
        self.budget = budget

    def append(self, text: Any) -> None:
        if self.budget is not None:
            self.budget.write(text if type(text) is str else str(text))
        super().append(text)

    def extend(self, texts: Iterable[Any]) -> None:
        texts = tuple(texts)
        if self.budget is not None:
            self.budget.write("".join(t if type(t) is str else str(t) for t in texts))
        super().extend(texts)
