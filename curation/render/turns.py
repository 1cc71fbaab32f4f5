"""One rendering: the seeded RNG, the helpers a template calls, and the messages they build.

`{% turn "user" %}…{% endturn %}` (see `curation.render.templates.TurnExtension`) calls
`turn_begin(role, line)`, captures its body as text, then calls `turn_end(text, line)`, which
appends the message: roles come from the tags, in the order the template runs them, and are
never read from text. Inside a turn, `{{ image("overlay") }}` registers the picture and writes
a slot marker, NUL + a random secret of the renderer + `:image:<n>` + NUL, which no template
text or data can produce; `turn_end` cuts the text at these markers into text and image parts.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from curation.items import StudyItem
from curation.manifest import TaskSpec
from curation.findings import Findings

if TYPE_CHECKING:  # pragma: no cover
    from curation.render.renderer import Renderer, _Compiled

META_SET_BY_RENDERER = frozenset({"kind", "template", "args", "variant", "call"})
SCALARS = frozenset({str, bool, int, float, type(None)})
MAX_IMAGES = 64


class Fault(Exception):
    """A misuse detected while rendering; the renderer turns it into a `TemplateError`."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


class Skip(Exception):
    """`skip("reason")` in a template."""


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


def _json_safe(value: Any, key: str) -> Any:
    kind = type(value)
    if kind in SCALARS:
        return value
    if kind is list or kind is tuple:
        return [v if type(v) in SCALARS else _json_safe(v, key) for v in value]
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, key) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_safe(v, key) for k, v in value.items()}
    raise Fault(f"meta({key}=…) takes text, numbers, yes/no, lists and mappings, not a {type(value).__name__}")


class RenderState:
    """The state of one rendering: the RNG, the turns so far, the images, the meta."""

    __slots__ = ("arg", "call", "compiled", "findings", "images", "item", "lines", "markers", "messages", "meta", "open",
                 "pending", "phrasings", "renderer", "rng")

    def __init__(self, renderer: Renderer, compiled: _Compiled, task: TaskSpec, item: StudyItem,
                 findings: Findings | None, variant: int, seed: int):
        self.renderer = renderer
        self.compiled = compiled
        self.item = item
        self.findings = findings
        self.arg = task.args[variant % len(task.args)]
        self.call = "" if task.expert is None else f"<{task.expert}({self.arg})>"
        self.rng = random.Random(seed)
        self.markers: Markers = renderer._markers
        self.phrasings: dict[str, tuple[str, ...]] = renderer._phrasings
        self.messages: list[dict[str, Any]] = []
        self.images: list[bytes] = []
        self.pending: list[bytes] = []  # pictures of the open turn, by slot number
        self.lines: list[int] = []
        self.open: str | None = None
        self.meta: dict[str, Any] = {"kind": compiled.declaration.kind, "template": task.template, "args": self.arg, "variant": variant}

    def finish_output(self, chunks: Iterator[str]) -> None:
        """Run the template; what it writes outside turns must be blank."""
        stray = "".join(chunks).strip()
        if stray:
            raise Fault(f"text outside any turn: {stray[:60]!r} (write all text inside {{% turn %}} blocks)",
                        self.renderer.source_line(self.compiled.source, stray))

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
        if "\x00" not in text:
            if pending:
                raise Fault("image() was called but its slot is not in the turn's text; write {{ image(…) }} in the text", line)
            if not text:
                raise Fault(f"{role} turn {len(self.messages) + 1} is empty", line)
            self.messages.append({"role": role, "content": [{"type": "text", "text": text}]})
            return ""
        pieces = text.split("\x00")
        if pieces[1::2] == self.markers.tokens[: len(pending)]:  # the usual case: every slot once, in order
            parts: list[dict[str, Any]] = [{"type": "text", "text": piece} if i % 2 == 0 else {"type": "image", "text": None}
                                           for i, piece in enumerate(pieces) if piece]
            self.images += pending
            self.messages.append({"role": role, "content": parts})
            return ""
        parts = []
        used = set()
        for i, piece in enumerate(pieces):
            if i % 2 == 0:
                if piece:
                    parts.append({"type": "text", "text": piece})
                continue
            n = self.markers.slot.get(piece)
            if n is None or n >= len(pending):
                raise Fault("the turn's text holds a NUL character that is not an image slot (from the data or the template)", line)
            if n in used:
                raise Fault("an image slot was written twice; call image() once for every image in the conversation", line)
            used.add(n)
            parts.append({"type": "image", "text": None})
            self.images.append(pending[n])
        if len(used) != len(pending):
            raise Fault("image() was called but its slot is not in the turn's text; write {{ image(…) }} in the text", line)
        self.messages.append({"role": role, "content": parts})
        return ""

    def image(self, kind: str, which: int | str = 0) -> str:
        if self.open != "user":
            raise Fault("image() belongs inside a user turn" if self.open is None else "images go in user turns; the assistant answers in text")
        pending = self.pending
        n = len(pending)
        if n >= MAX_IMAGES:
            raise Fault(f"more than {MAX_IMAGES} images in one turn")
        pending.append(self._image_bytes(kind, which))
        return self.markers.image[n]

    def _image_bytes(self, kind: str, which: int | str) -> bytes:
        f = self.findings
        if kind == "item":
            if self.item.kind != "image2d":
                raise Fault(f"image('item') is the picture of a 2D item; this is a {self.item.kind} item: use image('key_slice')")
            for img in f.images if f is not None else ():
                if img.kind == "key_slice":
                    return img.png
            raise Fault("image('item') needs the item's picture from an expert: give the task one (the `picture` runner makes only that)")
        if kind not in ("key_slice", "overlay", "sequence"):
            raise Fault(f"image kind {kind!r}: use key_slice, overlay, sequence or item")
        if f is None:
            raise Fault(f"image({kind!r}) needs findings, and this task has no expert")
        found = self.renderer._memo(f)[1].get(kind, [])
        if isinstance(which, str):
            for img in found:
                if img.caption.lower() == which.lower():
                    return img.png
            raise Fault(f"no {kind} image captioned {which!r} in the findings of {f.expert} (captions: {[i.caption for i in found]})")
        if not isinstance(which, int) or not 0 <= which < len(found):
            raise Fault(f"no {kind} image {which!r} in the findings of {f.expert} (runner {f.runner}), which have {len(found)}")
        return found[which].png

    # --- other helpers templates call ------------------------------------------------------

    def set_meta(self, **values: Any) -> str:
        if not META_SET_BY_RENDERER.isdisjoint(values):
            key = next(k for k in values if k in META_SET_BY_RENDERER)
            raise Fault(f"meta key {key!r} is set by the renderer")
        for key, value in values.items():
            if type(value) not in SCALARS:
                values[key] = _json_safe(value, key)
        self.meta.update(values)
        return ""

    def pick(self, values: Any) -> Any:
        seq = values if isinstance(values, (list, tuple)) else list(values)
        if not seq:
            raise Fault("pick() from an empty list")
        return self.rng.choice(seq)

    def shuffled(self, values: Any) -> list[Any]:
        seq = list(values)
        self.rng.shuffle(seq)
        return seq

    def sample(self, values: Any, k: int) -> list[Any]:
        seq = list(values)
        return self.rng.sample(seq, min(int(k), len(seq)))

    def chance(self, p: float = 0.5) -> bool:
        return self.rng.random() < float(p)

    def phrase(self, key: str | list[str], **fields: Any) -> str:
        """`phrase("key", name=…)`, or `phrase([key, fallback, …], …)`: the first key that has
        phrasings (a group's own wording, else the general one)."""
        banks = self.phrasings
        if type(key) is str:
            bank = banks.get(key)
        else:
            for k in key:
                bank = banks.get(str(k))
                if bank is not None:
                    break
            else:
                bank = None
        if bank is None:
            raise Fault(f"no phrasing {key!r}: add it to a file in prompts/phrasings/")
        text = self.rng.choice(bank)
        try:
            return text.format_map(fields)
        except KeyError as e:
            raise Fault(f"phrasing {key!r} ({text!r}) needs {e.args[0]!r}: pass it as phrase({key!r}, {e.args[0]}=…)") from None

    def structure(self, name: str) -> dict[str, Any] | None:
        view = self.renderer._view(self.findings)
        if view is None:
            raise Fault("structure() needs findings, and this task has no expert")
        return view["by_name"].get(name)  # type: ignore[no-any-return]

