"""`m3-curate export llava SHARDS OUT`: shards as VILA/LLaVA training JSON plus image files.

Writes `OUT/<split>.json` (a JSON list, one record per row) and `OUT/images/<id>-<k>.png`:

```json
{"id": "…", "image": "images/…-0.png",
 "conversations": [{"from": "human", "value": "<image>\\nThis is a CT image. …"},
                   {"from": "gpt", "value": "…"}]}
```

`image` when the row has one image, `images` (a list, in order) when it has several, neither
when it has none; one `<image>` per image part, where the part stands in the turn. User turns
are `human`, assistant turns `gpt`; a system turn, which LLaVA's format does not have, opens
the first human turn. Shards are read a batch at a time and the JSON is streamed, so memory
stays flat however many rows there are.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import IO, Any

import pyarrow.parquet as pq

from curation.errors import CurationError
from curation.store.layout import shard_files

IMAGE_TOKEN = "<image>"
ROLES = {"user": "human", "assistant": "gpt"}


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


def llava_record(row: dict[str, Any], image_paths: list[str]) -> dict[str, Any]:
    record: dict[str, Any] = {"id": row["id"]}
    if len(image_paths) == 1:
        record["image"] = image_paths[0]
    elif image_paths:
        record["images"] = image_paths
    record["conversations"] = conversations(row["messages"])
    tokens = sum(t["value"].count(IMAGE_TOKEN) for t in record["conversations"])
    if tokens != len(image_paths):
        raise CurationError(f"row {row['id']}: {tokens} {IMAGE_TOKEN} placeholders for {len(image_paths)} images")
    return record


class _JsonList:
    """A JSON list written one element at a time, renamed into place when closed."""

    def __init__(self, path: Path):
        self.path, self.tmp = path, path.with_name(f".{path.name}.tmp")
        self.f: IO[str] = self.tmp.open("w", encoding="utf-8")
        self.f.write("[")
        self.count = 0

    def add(self, record: dict[str, Any]) -> None:
        self.f.write(("\n" if self.count == 0 else ",\n") + json.dumps(record, ensure_ascii=False))
        self.count += 1

    def close(self) -> None:
        self.f.write("\n]\n")
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.f.close()
        self.tmp.unlink(missing_ok=True)


def export_llava(shards: Path, out: Path, *, batch_rows: int = 256) -> dict[str, int]:
    """Write `OUT/<split>.json` and `OUT/images/`; returns rows per split."""
    files = shard_files(Path(shards))
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    writers: dict[str, _JsonList] = {}
    try:
        for path in files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["id", "split", "images", "messages"]):
                for row in batch.to_pylist():
                    names = []
                    for k, image in enumerate(row["images"]):
                        name = f"{row['id']}-{k}.png"
                        (images / name).write_bytes(image["bytes"])
                        names.append(f"images/{name}")
                    split = row["split"]
                    if split not in writers:
                        writers[split] = _JsonList(out / f"{split}.json")
                    writers[split].add(llava_record(row, names))
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()
    return {split: w.count for split, w in sorted(writers.items())}


def export_command(args: argparse.Namespace) -> None:
    out = Path(args.out)
    counts = export_llava(Path(args.shards), out)
    total = sum(counts.values())
    print(f"exported {total} conversations ({', '.join(f'{n} {s}' for s, n in counts.items())}) to {out}: "
          f"{', '.join(f'{s}.json' for s in counts)} and images/")
