"""`m3-curate audit OUT`: the grounding check the build runs on every conversation, run again on
shards already written — from each row's own bytes, `meta` and `findings` — plus the one check
that needs all rows: rows that show the same image with the same question (and the same model
card and inline results, or none) must agree on whether and which expert they call, or the
call is decided by something other than what is asked.

Beyond the build's check, audit looks at the pixels: every colour a legend names must be drawn on
the overlay it describes (decoded from the row's PNG), so a legend is checked against what is
on screen, not only against what the findings say.

It prints one table per task (rows, grounded, ungrounded by reason) and, when the build's
dataset card is there, what the build set aside for grounding, by task and reason. Exit status
1 when any row is ungrounded: usable in CI.

    m3-curate audit out/demo
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from curation.findings import png_digest
from curation.imaging import COLOURS
from curation.render import grounding
from curation.rows import grounding_category
from curation.store.layout import iter_rows, shard_files, shards_root

CALL_CLASH = "call not decided by the question"
COLUMNS = ["id", "task", "images", "messages", "findings", "meta"]


@dataclass
class TaskAudit:
    rows: int = 0
    grounded: int = 0
    ungrounded: Counter[str] = field(default_factory=Counter)  # category → rows
    set_aside: Counter[str] = field(default_factory=Counter)  # category → conversations the build set aside


@dataclass
class Audit:
    tasks: dict[str, TaskAudit] = field(default_factory=lambda: defaultdict(TaskAudit))
    examples: dict[str, str] = field(default_factory=dict)  # category → one row's problem, for the reader
    unread: dict[str, str] = field(default_factory=dict)  # shards that did not open, so went unchecked: path → why

    @property
    def ungrounded(self) -> int:
        return sum(t.rows - t.grounded for t in self.tasks.values())


def _row_problems(row: dict[str, Any]) -> tuple[list[grounding.Problem], dict[str, Any]]:
    meta = json.loads(row["meta"]) if row.get("meta") else {}
    findings = json.loads(row["findings"]) if row.get("findings") else None
    digests = [png_digest(image["bytes"]) for image in row["images"]]
    if not meta:
        return [grounding.Problem("images do not match their slots", "the row has no meta")], meta
    return grounding.problems(row["messages"], digests, meta, findings) + _legend_pixels(row, meta), meta


def decode_rgb(png: bytes) -> np.ndarray:
    """A picture's pixels as float32 RGB (height × width × 3)."""
    with Image.open(io.BytesIO(png)) as picture:
        return np.asarray(picture.convert("RGB"), dtype=np.float32)


def drawn_colours(png: bytes, colours: Iterable[str], alpha: float = 0.5) -> set[str]:
    """Which of `colours` a PNG holds a pixel of, blended over grey as `curation.imaging.overlay`
    draws it (pixel = (1 - alpha) · grey + alpha · colour, for some grey: the grey each channel
    gives back agrees within 3 and lies in [-2, 257]). The picture is decoded once for all of
    them, and the channels are compared as planes (a reduction over the last axis of three is
    dozens of times slower)."""
    planes, palette = np.ascontiguousarray(np.moveaxis(decode_rgb(png), -1, 0)), dict(COLOURS)
    found = set()
    for colour in colours:
        r, g, b = ((plane - offset) / (1 - alpha) for plane, offset in zip(planes, alpha * np.array(palette[colour], np.float32)))
        high, low = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
        if ((high - low <= 3.0) & (low >= -2.0) & (high <= 257.0)).any():
            found.add(colour)
    return found


def _legend_pixels(row: dict[str, Any], meta: dict[str, Any]) -> list[grounding.Problem]:
    """Every colour a legend names is drawn on the picture it names: each picture decoded once,
    for every colour the row's legends name on it."""
    named: list[tuple[dict[str, Any], int, str, Any]] = []  # (legend, image, colour, names)
    for entry in meta.get("legends") or []:
        image = entry.get("image")
        if not isinstance(image, int) or not 0 <= image < len(row["images"]):
            continue  # the check above reports it
        named += [(entry, image, colour, names) for colour, names in entry.get("entries", []) if colour in grounding.COLOUR_NAMES]
    wanted: dict[int, set[str]] = {}
    for _, image, colour, _ in named:
        wanted.setdefault(image, set()).add(colour)
    drawn = {image: drawn_colours(row["images"][image]["bytes"], colours) for image, colours in wanted.items()}
    return [grounding.Problem("legend not on picture", f"image {image} has no {colour} pixel, yet turn {entry.get('turn')} says "
                                                       f"{colour}: {names}", entry.get("turn"))
            for entry, image, colour, names in named if colour not in drawn[image]]


def _prompt_key(row: dict[str, Any], meta: dict[str, Any]) -> tuple[Any, ...]:
    """What the model sees when it decides to call: the first image, the question, whether the
    model card opens the turn and whether the expert's results are already given."""
    first = png_digest(row["images"][0]["bytes"]) if row["images"] else None
    prompt = meta.get("prompt") or {}
    return first, meta.get("question"), bool(prompt.get("card")), bool(prompt.get("results"))


def audit(out: str | Path) -> Audit:
    """Check every row of a build's shards (see the module docstring)."""
    result = Audit()
    bad: dict[int, set[str]] = defaultdict(set)  # row number → categories
    rows: list[tuple[str, str]] = []  # (task, id) by row number
    calls: dict[tuple[Any, ...], dict[tuple[str, ...], list[int]]] = defaultdict(lambda: defaultdict(list))
    shards = shard_files(out, columns=COLUMNS)
    result.unread = shards.set_aside
    for row in iter_rows(shards.files, columns=COLUMNS, stamps=shards.stamps):
        n = len(rows)
        rows.append((row["task"], row["id"]))
        found, meta = _row_problems(row)
        for p in found:
            bad[n].add(p.category)
            result.examples.setdefault(p.category, f"{row['task']} row {row['id']}: {p.detail}")
        if meta.get("question") is not None:
            made = tuple(c for c in meta.get("calls") or [] if c)
            calls[_prompt_key(row, meta)][made].append(n)
    for groups in calls.values():
        if len(groups) > 1:
            for made, numbers in groups.items():
                for n in numbers:
                    bad[n].add(CALL_CLASH)
                    task, rid = rows[n]
                    result.examples.setdefault(CALL_CLASH, f"{task} row {rid} calls {list(made) or 'nothing'}; rows with "
                                                           f"the same image and question call {[list(m) for m in groups if m != made]}")
    for n, (task, _) in enumerate(rows):
        t = result.tasks[task]
        t.rows += 1
        if n in bad:
            t.ungrounded.update(bad[n])
        else:
            t.grounded += 1
    _set_aside_from_card(Path(out), result)
    return result


def _set_aside_from_card(out: Path, result: Audit) -> None:
    """What the build set aside for grounding, from its dataset card (when there is one)."""
    root = shards_root(out)
    card = root.parent / "dataset_card.json"
    if not card.is_file():
        return
    set_aside = json.loads(card.read_text()).get("counts", {}).get("set_aside", {})
    for reason, n in set_aside.items():
        category = grounding_category(reason)
        if category is None:
            continue
        task = reason.split("template ", 1)[1].split(",", 1)[0].split(":", 1)[0] if "template " in reason else "(unknown)"
        result.tasks[task].set_aside[category] += n


def table(result: Audit) -> str:
    """The per-task table `m3-curate audit` prints."""
    lines = [f"{'task':34s} {'rows':>6s} {'grounded':>9s}  ungrounded (by reason) / set aside by the build (by reason)"]
    for task in sorted(result.tasks):
        t = result.tasks[task]
        wrong = ", ".join(f"{n} {c}" for c, n in t.ungrounded.most_common()) or "-"
        aside = ", ".join(f"{n} {c}" for c, n in t.set_aside.most_common())
        lines.append(f"{task:34s} {t.rows:6d} {t.grounded:9d}  {wrong}" + (f" / set aside: {aside}" if aside else ""))
    total = sum(t.rows for t in result.tasks.values())
    lines.append(f"{'all':34s} {total:6d} {total - result.ungrounded:9d}  {result.ungrounded} ungrounded")
    for category, example in sorted(result.examples.items()):
        lines.append(f"  e.g. {category}: {example}")
    for path, why in result.unread.items():
        lines.append(f"not checked: {path}: {why}")
    return "\n".join(lines)


def audit_command(args: argparse.Namespace) -> None:
    result = audit(args.out)
    print(table(result))
    if result.ungrounded or result.unread:
        sys.exit(1)
