"""`m3-curate export llava SHARDS OUT [--layout vila|llava-next]`: shards as VILA/LLaVA training
JSON plus image files.

Writes `OUT/<split>.json` (a JSON list, one record per row) and `OUT/images/<id>-<k>.png`:

```json
{"id": "…", "image": "images/…-0.png",
 "conversations": [{"from": "human", "value": "<image>\\nThis is a CT image. …"},
                   {"from": "gpt", "value": "…"}]}
```

One `<image>` per image part, where the part stands in its turn, so a result overlay stays in
the turn after the call that made it. User turns are `human`, assistant turns `gpt`; a system
turn, which LLaVA's format does not have, opens the first human turn. Two layouts, for two
families of loaders:

- `vila` (default): `image` (a string) when the row has one image, `images` (a list, in order)
  when it has several, neither when it has none: what `LazySupervisedDataset` of the VILA
  commit VILA-M3 pins reads (NVlabs/VILA 355fda9).
- `llava-next`: `image` always a list, as LLaVA-NeXT's `LazySupervisedDataset` and VILA's newer
  `LLaVANextDataset` read it (they iterate `image`; a string would be read letter by letter).

Loaders that move every image to the first turn (VILA's newer `LLaVADataset`) put the overlay
before the call that made it: use neither layout with them for expert-call data.

Every file written stays inside OUT whatever the shards hold: a row's `id` and `split` become
file names only when they are plain names (letters, digits, `_`, `-`, `.`; no `..`), and each
path is checked to resolve inside OUT. Shards are read a batch at a time and the JSON is
streamed, so memory stays flat however many rows there are. An export replaces the last one in
OUT whole and leaves other files alone (`_replace`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from curation.atomic import write_text
from curation.errors import CurationError
from curation.folder_lock import FolderLock
from curation.store.layout import Stamp, read_batches, shard_files

IMAGE_TOKEN = "<image>"
ROLES = {"user": "human", "assistant": "gpt"}
LAYOUTS = ("vila", "llava-next")
COLUMNS = ["id", "split", "images", "messages"]
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def turn_text(content: list[dict[str, Any]]) -> str:
    """A turn's parts as one string, `<image>` where each image part stands (followed by a
    newline when it opens a line, LLaVA's convention).

    >>> turn_text([{"type": "image", "text": None}, {"type": "text", "text": "What is this?"}])
    '<image>\\nWhat is this?'
    >>> turn_text([{"type": "text", "text": "T1: "}, {"type": "image", "text": None}, {"type": "text", "text": ", T2: "},
    ...            {"type": "image", "text": None}])
    'T1: <image>, T2: <image>'
    """
    out = ""
    for i, part in enumerate(content):
        if part["type"] == "image":
            at_line_start = out == "" or out.endswith("\n")
            following = content[i + 1] if i + 1 < len(content) else None
            text_next = following is not None and following["type"] == "text" and (following["text"] or "")[:1] not in ("", " ", "\n", ",", ".", ":", ";")
            out += IMAGE_TOKEN + ("\n" if at_line_start and text_next else "")
        elif part["type"] == "text":
            out += part["text"] or ""
        else:
            raise CurationError(f"message part of type {part['type']!r}: only 'image' and 'text' parts can be exported")
    return out


def conversations(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Chat messages as LLaVA `conversations`."""
    system = [turn_text(m["content"]) for m in messages if m["role"] == "system"]
    turns = []
    for m in messages:
        if m["role"] == "system":
            continue
        if m["role"] not in ROLES:
            raise CurationError(f"message role {m['role']!r}: LLaVA conversations have only user (human) and assistant (gpt) turns")
        value = turn_text(m["content"])
        if system and not turns and m["role"] == "user":
            value = "\n".join(system) + "\n" + value
        turns.append({"from": ROLES[m["role"]], "value": value})
    return turns


def llava_record(row: dict[str, Any], image_paths: list[str], layout: str = "vila") -> dict[str, Any]:
    """One row as a LLaVA record in `layout` (see the module docstring)."""
    record: dict[str, Any] = {"id": row["id"]}
    if layout == "llava-next":
        if image_paths:
            record["image"] = list(image_paths)
    elif len(image_paths) == 1:
        record["image"] = image_paths[0]
    elif image_paths:
        record["images"] = image_paths
    record["conversations"] = conversations(row["messages"])
    tokens = sum(t["value"].count(IMAGE_TOKEN) for t in record["conversations"])
    if tokens != len(image_paths):
        raise CurationError(f"row {row['id']}: {tokens} {IMAGE_TOKEN} placeholders for {len(image_paths)} images")
    return record


def safe_name(value: Any, what: str, where: str) -> str:
    """`value` if it can be a file name inside the output folder, else an error naming it.

    >>> safe_name("3fa2c1e9d0b47a11", "id", "x.parquet")
    '3fa2c1e9d0b47a11'
    >>> safe_name("../../etc/cron.d/x", "id", "x.parquet")
    Traceback (most recent call last):
    ...
    curation.errors.CurationError: x.parquet: id '../../etc/cron.d/x' cannot be a file name (letters, digits, '_', '-', '.'; not '..'): not a shard m3-curate wrote?
    """
    if not isinstance(value, str) or SAFE_NAME.fullmatch(value) is None or ".." in value:
        raise CurationError(f"{where}: {what} {value!r} cannot be a file name (letters, digits, '_', '-', '.'; not '..'): "
                            "not a shard m3-curate wrote?")
    return value


def inside(out: Path, name: str) -> Path:
    """`out / name`, refused unless it resolves inside `out` (links included)."""
    path = out / name
    if not path.resolve().is_relative_to(out.resolve()):
        raise CurationError(f"{path}: would be written outside {out}; refused")
    return path


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """An OS error inside names `path`: a full disk raises from `write`, whose error names no
    file, and the command line reports the file it names."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise


class _JsonList:
    """A JSON list written one element at a time, renamed into place when closed."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp")
        self.f: IO[str] = self.tmp.open("w", encoding="utf-8")
        self.f.write("[")
        self.count = 0

    def add(self, record: dict[str, Any]) -> None:
        with _naming(self.tmp):
            self.f.write(("\n" if self.count == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
        self.count += 1

    def close(self) -> None:
        with _naming(self.tmp):
            self.f.write("\n]\n")
            self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.f.close()
        except OSError:  # the failure being handled (a full disk) can fail the close too
            pass
        self.tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class Exported:
    rows: dict[str, int]  # by split
    set_aside: dict[str, str]  # shards that could not be read: path → why (`shard_files`)


def export_llava(shards: Path, out: Path, *, layout: str = "vila", batch_rows: int = 256) -> Exported:
    """Write `OUT/<split>.json` and `OUT/images/`, replacing the export OUT held before as a
    whole (`_replace`)."""
    if layout not in LAYOUTS:
        raise CurationError(f"--layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    found = shard_files(Path(shards), columns=COLUMNS)
    with FolderLock(out, "export", "OUT"):
        previous = _previous(out)
        _check_ours(out, ["images", *sorted({f"{p.parent.name}.json" for p in found.files})], previous)
        stage = inside(out, STAGE)
        shutil.rmtree(stage, ignore_errors=True)
        try:
            rows = _write(found.files, found.stamps, stage, layout, batch_rows)
            _replace(out, stage, ["images", *(f"{split}.json" for split in rows)], previous)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    return Exported(rows, found.set_aside)


STAGE, MARK = ".export.new", ".m3-curate-export"  # the export being written; what the last one wrote here


def _write(files: list[Path], stamps: dict[Path, Stamp], stage: Path, layout: str, batch_rows: int) -> dict[str, int]:
    """Every row of `files` into `stage`: records by split, images in `images/`. Rows by split."""
    images = stage / "images"
    images.mkdir(parents=True)
    writers: dict[str, _JsonList] = {}
    seen: set[str] = set()
    try:
        for path in files:
            for batch in read_batches(path, stamps.get(path), batch_size=batch_rows, columns=COLUMNS):
                for row in batch.to_pylist():
                    row_id = safe_name(row["id"], "id", str(path))
                    split = safe_name(row["split"], "split", f"{path}: row {row_id}")
                    if row_id in seen:
                        raise CurationError(f"{path}: id {row_id!r} appears twice; its images would overwrite each other")
                    seen.add(row_id)
                    names = []
                    for k, image in enumerate(row["images"]):
                        name = f"{row_id}-{k}.png"
                        target = inside(images, name)
                        with _naming(target):
                            target.write_bytes(image["bytes"])
                        names.append(f"images/{name}")
                    if split not in writers:
                        writers[split] = _JsonList(inside(stage, f"{split}.json"))
                    writers[split].add(llava_record(row, names, layout))
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()
    return {split: w.count for split, w in sorted(writers.items())}


def _previous(out: Path) -> list[str]:
    """What the last export into `out` wrote there (`MARK`), so the next one replaces exactly
    that: a `test.json` of another dataset left beside this one's `train.json` would be read as
    this dataset's test split."""
    try:
        names = json.loads((out / MARK).read_text())["written"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    return [n for n in names if isinstance(n, str) and SAFE_NAME.fullmatch(n) and ".." not in n]


def _check_ours(out: Path, names: list[str], previous: list[str]) -> None:
    taken = [n for n in names if (out / n).is_symlink() or (out / n).exists() and n not in previous]
    if taken:
        raise CurationError(f"OUT {out}: {', '.join(taken)} there {'is' if len(taken) == 1 else 'are'} not from an m3-curate export, "
                            "which would replace or mix with it: choose another folder, or move it away")


def _replace(out: Path, stage: Path, names: list[str], previous: list[str]) -> None:
    """The new export in place of the last one: its files moved aside, the new ones moved in
    (renames within OUT), then the old ones removed. Other files in OUT are left alone. The mark
    names both while they are swapped, so an export stopped halfway is still taken as ours by
    the next one."""
    _check_ours(out, names, previous)  # splits found only in the rows
    write_text(out / MARK, json.dumps({"written": sorted(set(previous) | set(names))}) + "\n")
    old = inside(out, ".export.old")
    shutil.rmtree(old, ignore_errors=True)
    old.mkdir()
    for name in previous:
        if (out / name).exists():
            os.replace(out / name, old / name)
    for name in names:
        os.replace(stage / name, out / name)
    write_text(out / MARK, json.dumps({"written": names}) + "\n")
    shutil.rmtree(old, ignore_errors=True)


def export_command(args: argparse.Namespace) -> None:
    out = Path(args.out)
    layout = getattr(args, "layout", "vila")
    exported = export_llava(Path(args.shards), out, layout=layout)
    counts = exported.rows
    total = sum(counts.values())
    print(f"exported {total} conversations ({', '.join(f'{n} {s}' for s, n in counts.items())}) to {out} in the {layout} layout: "
          f"{', '.join(f'{s}.json' for s in counts)} and images/"
          + (f"; {len(exported.set_aside)} shards set aside, named above, that could not be read" if exported.set_aside else ""))
