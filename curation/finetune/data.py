"""Shards in, rows out: a streaming reader over Parquet row groups (`chat.py` turns rows into
model batches).

Reading never loads a split into memory: `ShardStream` walks Parquet row groups (the unit of
work; only their metadata is read up front), shuffles their order per epoch with the seed,
splits them across training processes, reads each with `iter_batches` (only the columns
training needs) and passes rows through a bounded shuffle buffer. The mixture is taken as
written: the build already repeated rows by task weight, so every row counts once per epoch.

`row_to_chat` gives a row's `messages` with its PNGs in the image parts, the form processors'
chat templates read.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from PIL import Image

from curation.errors import CurationError
from curation.store.layout import Stamp, read_batches

TRAIN_COLUMNS = ["id", "task", "messages", "images"]


def count_rows(files: Sequence[Path]) -> int:
    """Rows in `files`, from the Parquet footers alone."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


@dataclass(frozen=True, slots=True)
class _Unit:
    file: Path
    row_group: int
    rows: int
    stamp: Stamp | None  # the file it was when the run began (`layout.read_batches`)


class ShardStream(torch.utils.data.IterableDataset):
    """Endless, deterministic stream of collated batches over one split's shards.

    Epoch `e` visits every row group once, in an order drawn from `(seed, e)`; rows pass
    through a shuffle buffer of `shuffle_buffer` rows. With `world_size` processes, each takes
    every `world_size`-th row group (or, with fewer row groups than processes, every
    `world_size`-th row). `skip_batches` replays the stream without collating up to where a
    checkpoint stopped, so a resumed run sees the same batches as an uninterrupted one. Under a
    `DataLoader` with workers, worker `w` collates batches `skip_batches + w`,
    `skip_batches + w + num_workers`, … so their round-robin order is the single-process one.
    """

    def __init__(
        self,
        files: Sequence[Path],
        *,
        collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 256,
        rank: int = 0,
        world_size: int = 1,
        skip_batches: int = 0,
        columns: Sequence[str] = TRAIN_COLUMNS,
        stamps: dict[Path, Stamp] | None = None,
    ):
        if batch_size < 1:
            raise CurationError(f"--batch-size {batch_size}: must be at least 1")
        self.units = [
            _Unit(Path(f), g, meta.row_group(g).num_rows, (stamps or {}).get(Path(f)))
            for f in files
            for meta in [pq.ParquetFile(f).metadata]
            for g in range(meta.num_row_groups)
        ]
        if not any(u.rows for u in self.units):
            raise CurationError(f"{Path(files[0]).parent if files else 'shards'}: the shards hold no rows")
        self.collate, self.batch_size, self.seed = collate, batch_size, seed
        self.shuffle_buffer, self.rank, self.world_size = max(1, shuffle_buffer), rank, world_size
        self.skip_batches, self.columns = skip_batches, list(columns)

    def epoch_units(self, epoch: int) -> list[_Unit]:
        """The row groups this process reads in `epoch`, in order (all of them when there
        are fewer row groups than processes: then rows are split instead)."""
        order = list(self.units)
        random.Random(f"{self.seed}:{epoch}:units").shuffle(order)
        return order if len(order) < self.world_size else order[self.rank :: self.world_size]

    def rows(self) -> Iterator[dict[str, Any]]:
        """This process's rows, epoch after epoch, without end."""
        epoch = 0
        by_row = len(self.units) < self.world_size
        while True:
            mine = self.epoch_units(epoch)
            rng = random.Random(f"{self.seed}:{epoch}:rows:{self.rank}")
            buffer: list[dict[str, Any]] = []
            k = 0
            for unit in mine:
                for batch in read_batches(unit.file, unit.stamp, batch_size=64, row_groups=[unit.row_group], columns=self.columns):
                    for row in batch.to_pylist():
                        k += 1
                        if by_row and (k - 1) % self.world_size != self.rank:
                            continue
                        if len(buffer) < self.shuffle_buffer:
                            buffer.append(row)
                            continue
                        j = rng.randrange(len(buffer))
                        buffer[j], row = row, buffer[j]
                        yield row
            rng.shuffle(buffer)
            yield from buffer
            epoch += 1

    def raw_batches(self) -> Iterator[list[dict[str, Any]]]:
        rows = self.rows()
        while True:
            yield [next(rows) for _ in range(self.batch_size)]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        for n, batch in enumerate(self.raw_batches()):
            if n >= self.skip_batches and (n - self.skip_batches) % workers == worker:
                yield self.collate(batch)


def row_to_chat(row: dict[str, Any]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """The row's `messages` with its PNGs placed in the image parts (the form processors'
    `apply_chat_template` reads), and the images in order."""
    images = [Image.open(io.BytesIO(im["bytes"])).convert("RGB") for im in row.get("images") or []]
    messages, k = [], 0
    for message in row["messages"]:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                if k >= len(images):
                    break
                parts.append({"type": "image", "image": images[k]})
                k += 1
            else:
                parts.append({"type": part["type"], "text": part.get("text") or ""})
        messages.append({"role": message["role"], "content": parts})
    if k != len(images) or sum(p["type"] == "image" for m in row["messages"] for p in m["content"]) != len(images):
        raise CurationError(f"row {row.get('id')}: {len(images)} images but a different number of image parts in messages")
    return messages, images
