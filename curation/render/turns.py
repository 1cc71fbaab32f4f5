"""One rendering: the seeded RNG, the turns, the pictures placed, the facts stated, the meta.

`{% turn "user" %}…{% endturn %}` (see `curation.render.templates.TurnExtension`) calls
`turn_begin(role, line)`, captures its body as text, then calls `turn_end(text, line)`, which
appends the message: roles come from the tags, in the order the template runs them, and are
never read from text. Inside a turn, `{{ image(…) }}` registers the picture and writes a slot
marker, NUL + a random secret of the renderer + `:image:<n>` + NUL, which no template text or
data can produce; `turn_end` cuts the text at these markers into text and image parts.

The state knows only what it is given (`Shared`, the template's name and source, the task,
the item and the views of its findings); the helpers templates call live in
`curation.render.helpers` and reach it through the few methods below.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from curation.findings import Findings
from curation.items import StudyItem
from curation.manifest import TaskSpec
from curation.render.budget import MAX_TEXT, Budget

META_SET_BY_RENDERER = frozenset({"kind", "template", "args", "variant", "call", "calls", "facts", "images", "legends", "prompt",
                                  "answer_turn"})
SCALARS = frozenset({str, bool, int, float, type(None)})
MAX_IMAGES = 64


class Fault(Exception):
    """A misuse detected while rendering; the renderer turns it into a `TemplateError`."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


class Skip(Exception):
    """`skip("reason")` in a template (or a helper that finds nothing to ask)."""


class Markers:
    """The image slot markers of one renderer.

    >>> m = Markers("42")
    >>> m.image[3] == "\\x0042:image:3\\x00", m.slot["42:image:3"]
    (True, 3)
    """

    def __init__(self, secret: str):
        self.tokens = [f"{secret}:image:{n}" for n in range(MAX_IMAGES)]
        self.image = [f"\x00{token}\x00" for token in self.tokens]
        self.slot = {token: n for n, token in enumerate(self.tokens)}


@dataclass(frozen=True, slots=True)
class Shared:
    """What every rendering of one renderer shares."""

    markers: Markers
    phrasings: dict[str, tuple[str, ...]]


@dataclass(frozen=True, slots=True)
class Subject:
    """What one rendering is about: the task and argument, the item, the expert's findings and
    the plain views templates read (`findings`, `truth`: see `curation.render.helpers`)."""

    task: TaskSpec
    arg: str
    item: StudyItem
    findings: Findings | None
    view: dict[str, Any] | None
    truth: dict[str, Any] | None


def json_safe(value: Any, key: str) -> Any:
    kind = type(value)
    if kind in SCALARS:
        return value
    if kind is list or kind is tuple:
        return [v if type(v) in SCALARS else json_safe(v, key) for v in value]
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [json_safe(v, key) for v in value]
    if isinstance(value, dict):
        return {str(k): json_safe(v, key) for k, v in value.items()}
    raise Fault(f"meta({key}=…) takes text, numbers, yes/no, lists and mappings, not a {type(value).__name__}")


class RenderState:
    """The state of one rendering: the RNG, the turns so far, the pictures, the statements."""

    __slots__ = ("budget", "call", "facts", "images", "legends", "lines", "messages", "meta", "open", "pending", "pictures",
                 "results", "rng", "shared", "source", "subject", "template")

    def __init__(self, shared: Shared, template: str, source: str, kind: str, subject: Subject, variant: int, seed: int):
        self.shared = shared
        self.template = template
        self.source = source  # the template's text, to find the line of stray output
        self.subject = subject
        task = subject.task
        self.call = "" if task.expert is None else f"<{task.expert}({subject.arg})>"
        self.rng = random.Random(seed)
        self.budget = Budget()
        self.messages: list[dict[str, Any]] = []
        self.images: list[bytes] = []
        self.pictures: list[dict[str, Any]] = []  # per row image: what it is (meta.images)
        self.pending: list[tuple[bytes, dict[str, Any]]] = []  # pictures of the open turn, by slot number
        self.facts: list[dict[str, Any]] = []
        self.legends: list[dict[str, Any]] = []
        self.results: set[int] = set()  # turns that give the expert's results
        self.lines: list[int] = []
        self.open: str | None = None
        self.meta: dict[str, Any] = {"kind": kind, "template": task.template, "args": subject.arg, "variant": variant}

    @property
    def turn(self) -> int:
        """The message index of the open turn (or of the next one)."""
        return len(self.messages)

    def finish_output(self, chunks: Iterator[str]) -> None:
        """Run the template; what it writes outside turns must be blank."""
        parts = []
        for chunk in chunks:
            self.budget.write(chunk)
            parts.append(chunk)
        stray = "".join(parts).strip()
        if stray:
            raise Fault(f"text outside any turn: {stray[:60]!r} (write all text inside {{% turn %}} blocks)", self.source_line(stray))

    def source_line(self, text: str) -> int | None:
        """The first line of the template's source that holds `text` (for stray text)."""
        probe = text.splitlines()[0][:40] if text else ""
        for n, line in enumerate(self.source.splitlines(), start=1):
            if probe and probe in line:
                return n
        return None

    # --- turns -----------------------------------------------------------------------------

    def turn_begin(self, role: str, line: int) -> str:
        if self.open is not None:
            raise Fault("a turn cannot contain another turn", line)
        expected = "assistant" if self.messages and self.messages[-1]["role"] == "user" else "user"
        if role != expected:
            raise Fault(f"turn {len(self.messages) + 1} is {role!r} but should be {expected!r}: turns alternate user, assistant, starting with user", line)
        self.open = role
        self.lines.append(line)
        return ""

    def turn_end(self, text: str, line: int) -> str:
        role, self.open = self.open, None
        pending, self.pending = self.pending, []
        text = text.strip()
        if sum(len(p["text"]) for m in self.messages for p in m["content"] if p["type"] == "text") + len(text) > MAX_TEXT:
            raise Fault(f"the conversation would hold more than {MAX_TEXT:,} characters of text", line)
        if "\x00" not in text:
            if pending:
                raise Fault("image() was called but its slot is not in the turn's text; write {{ image(…) }} in the text", line)
            if not text:
                raise Fault(f"{role} turn {len(self.messages) + 1} is empty", line)
            self.messages.append({"role": role, "content": [{"type": "text", "text": text}]})
            return ""
        pieces = text.split("\x00")
        tokens = self.shared.markers.tokens
        if pieces[1::2] == tokens[: len(pending)]:  # the usual case: every slot once, in order
            parts: list[dict[str, Any]] = [{"type": "text", "text": piece} if i % 2 == 0 else {"type": "image", "text": None}
                                           for i, piece in enumerate(pieces) if piece]
            for png, picture in pending:
                self._place(png, picture)
            self.messages.append({"role": role, "content": parts})
            return ""
        parts = []
        used = set()
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                if piece:
                    parts.append({"type": "text", "text": piece})
                continue
            n = self.shared.markers.slot.get(piece)
            if n is None or n >= len(pending):
                raise Fault("the turn's text holds a NUL character that is not an image slot (from the data or the template)", line)
            if n in used:
                raise Fault("an image slot was written twice; call image() once for every image in the conversation", line)
            used.add(n)
            parts.append({"type": "image", "text": None})
            self._place(*pending[n])
        if len(used) != len(pending):
            raise Fault("image() was called but its slot is not in the turn's text; write {{ image(…) }} in the text", line)
        self.messages.append({"role": role, "content": parts})
        return ""

    def _place(self, png: bytes, picture: dict[str, Any]) -> None:
        self.images.append(png)
        self.pictures.append({**picture, "turn": len(self.messages)})

    def add_image(self, png: bytes, picture: dict[str, Any]) -> str:
        """Put a picture in the open user turn; its slot marker."""
        if self.open != "user":
            raise Fault("image() belongs inside a user turn" if self.open is None else "images go in user turns; the assistant answers in text")
        n = len(self.pending)
        if n >= MAX_IMAGES:
            raise Fault(f"more than {MAX_IMAGES} images in one turn")
        self.pending.append((png, picture))
        return self.shared.markers.image[n]

    def in_turn(self, role: str, what: str) -> int:
        """The open turn's index; a Fault unless a `role` turn is open."""
        if self.open != role:
            raise Fault(f"{what} belongs inside {'a user' if role == 'user' else 'an assistant'} turn")
        return self.turn

    # --- meta ------------------------------------------------------------------------------

    def set_meta(self, values: dict[str, Any]) -> None:
        if not META_SET_BY_RENDERER.isdisjoint(values):
            key = next(k for k in values if k in META_SET_BY_RENDERER)
            raise Fault(f"meta key {key!r} is set by the renderer")
        for key, value in values.items():
            if type(value) not in SCALARS:
                values[key] = json_safe(value, key)
        self.meta.update(values)

    def picture_slot(self, index: int | None, kind: str, turn: int) -> int | None:
        """The row image showing findings picture `index` (`kind` when there is no index), the
        latest placed at or before `turn`."""
        found = None
        for slot, picture in enumerate(self.pictures):
            if picture["turn"] <= turn and picture.get("index") == index and (index is not None or picture["kind"] == kind):
                found = slot
        return found
