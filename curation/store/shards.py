"""Shard writing: `shards/<split>/part-NNNNN.parquet`, each written whole or not at all.

The plan gives every conversation its shard and its position there before anything runs
(a shard holds consecutive positions of one lane), so results may arrive in any order. Per
shard the writer keeps a cursor: the next position to write. A row that arrives ahead of the
cursor waits; when the cursor's conversation is accounted for (made, or set aside), the rows
from the cursor on are appended in position order, `ROW_GROUP` rows per Parquet row group, to
a temporary file that is renamed when the shard's last position is done. So:

- a half-written shard is never visible under its final name;
- the same rows give the same bytes, whatever the arrival order (row groups are cut at fixed
  counts of rows);
- memory holds only rows that arrived ahead of a cursor (items still in flight before them)
  plus less than one row group per open shard — not the shard, not the archive
  (`peak_rows` records the most held at once);
- at the end, part files the plan does not have (an earlier build of another plan) go.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from curation.rows import ROW_SCHEMA
from curation.store.hf import schema_with_hf_metadata

PART = "part-{:05d}.parquet"
ROW_GROUP = 128


def shard_path(root: Path, split: str, shard: int) -> Path:
    return root / split / PART.format(shard)


@dataclass
class _Open:
    """One shard being written."""

    path: Path
    start: int  # first position
    count: int  # planned conversations
    cursor: int  # next position to write
    waiting: dict[int, pa.Table] = field(default_factory=dict)  # position → its row, ahead of the cursor
    done: set[int] = field(default_factory=set)  # positions accounted for, ahead of the cursor
    ready: list[pa.Table] = field(default_factory=list)  # rows in order, not yet in a row group
    writer: pq.ParquetWriter | None = None
    rows: int = 0

    @property
    def tmp(self) -> Path:
        return self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")

    def ready_rows(self) -> int:
        return sum(t.num_rows for t in self.ready)

    def write(self, final: bool) -> None:
        """Append full row groups (and, when `final`, the rest)."""
        if not self.ready:
            return
        table = pa.concat_tables(self.ready)
        cut = table.num_rows if final else table.num_rows - table.num_rows % ROW_GROUP
        if cut == 0:
            return
        if self.writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(self.tmp, schema_with_hf_metadata(ROW_SCHEMA), compression="zstd")
        self.writer.write_table(table.slice(0, cut).drop_columns(["_shard", "_pos"]).cast(ROW_SCHEMA), row_group_size=ROW_GROUP)
        self.rows += cut
        self.ready = [table.slice(cut)] if cut < table.num_rows else []


@dataclass
class ShardWriter:
    """Writes placed rows (`stages.PLACED_SCHEMA`) into their shards.

    `planned`: (split, shard) → (first position, conversations planned).
    """

    root: Path
    planned: dict[tuple[str, int], tuple[int, int]]
    written: dict[tuple[str, int], int] = field(default_factory=dict)  # shard → rows written
    peak_rows: int = 0
    _open: dict[tuple[str, int], _Open] = field(default_factory=dict)
    _held: int = 0

    def _shard(self, key: tuple[str, int]) -> _Open:
        if key not in self._open:
            if key in self.written:
                raise RuntimeError(f"shard {key} is already written; a conversation was reported twice")
            start, count = self.planned[key]
            self._open[key] = _Open(path=shard_path(self.root, *key), start=start, count=count, cursor=start)
        return self._open[key]

    def add(self, split: str, rows: pa.Table) -> None:
        """Rows of one item (any number, any shards of `split`); call `resolve` for the item next."""
        for i in range(rows.num_rows):
            row = rows.slice(i, 1)
            self._shard((split, row["_shard"][0].as_py())).waiting[row["_pos"][0].as_py()] = row
            self._held += 1
        self.peak_rows = max(self.peak_rows, self._held)

    def resolve(self, split: str, units: list[tuple[int, int]]) -> None:
        """(shard, position) of every planned conversation of an item, made or set aside."""
        touched = set()
        for shard, pos in units:
            key = (split, shard)
            self._shard(key).done.add(pos)
            touched.add(key)
        for key in sorted(touched):
            self._advance(key)

    def _advance(self, key: tuple[str, int]) -> None:
        s = self._open[key]
        while s.cursor in s.done:
            s.done.remove(s.cursor)
            row = s.waiting.pop(s.cursor, None)
            if row is not None:
                s.ready.append(row)
            s.cursor += 1
        if s.cursor == s.start + s.count:
            before = s.ready_rows()
            s.write(final=True)
            self._held -= before
            if s.writer is not None:
                s.writer.close()
                os.replace(s.tmp, s.path)
            self.written[key] = s.rows  # 0: every conversation set aside, no file
            del self._open[key]
        elif s.ready_rows() >= ROW_GROUP:
            before = s.ready_rows()
            s.write(final=False)
            self._held -= before - s.ready_rows()

    def finish(self) -> list[Path]:
        """Check every shard was written and remove part files the plan does not have.
        Returns the shard files."""
        missing = sorted(k for k in self.planned if k not in self.written)
        if missing:
            for s in self._open.values():
                if s.writer is not None:
                    s.writer.close()
                    s.tmp.unlink(missing_ok=True)
            raise RuntimeError(f"shards never completed: {missing[:5]} (conversations lost between the stages and the writer)")
        keep = {shard_path(self.root, s, n) for (s, n), rows in self.written.items() if rows}
        if self.root.is_dir():
            for path in sorted(self.root.glob("*/*")):
                if path.is_file() and path not in keep and (path.name.startswith("part-") or path.name.endswith(".tmp")):
                    path.unlink()
        return sorted(keep)
