"""Shard writing: `<split>/part-NNNNN.parquet`, each written whole, in position order, or not
at all.

The plan gives every conversation its shard and its position before anything runs, so rows
may arrive in any order; a shard is written when the last of its planned conversations is
accounted for (made, or set aside). Until then its rows wait — in memory up to a budget of
bytes for all shards together (`memory`), beyond it in spill files (Arrow IPC, one per spill,
in `spill`), largest waiting sets first. So:

- memory holds at most `memory` bytes of waiting rows plus the shard being written (read
  back from its spill files through a memory map): bounded by configuration, not by the
  archive, however far a fast lane runs ahead of a slow one;
- a half-written shard is never visible under its final name (`curation.atomic`);
- the same rows give the same bytes, whatever the arrival order: rows are sorted by position
  and cut into row groups of `ROW_GROUP` rows;
- at the end, part files the plan does not have (an earlier build of another plan) go.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation.atomic import replacing, storage_error
from curation.rows import ROW_SCHEMA
from curation.store.hf import schema_with_hf_metadata

PART = "part-{:05d}.parquet"
ROW_GROUP = 128
SPILL_BYTES = 256 << 20  # rows waiting in memory, all shards together, before the largest sets spill
PLACE = ("_shard", "_pos")  # the columns that say where a row goes; dropped when written


def shard_path(root: Path, split: str, shard: int) -> Path:
    return root / split / PART.format(shard)


@dataclass
class _Waiting:
    """A shard's rows that wait for the rest of it: in memory (`tables`) and spilled."""

    left: int  # planned conversations not yet accounted for
    tables: list[pa.Table] = field(default_factory=list)
    nbytes: int = 0
    rows: int = 0
    spills: list[Path] = field(default_factory=list)


@dataclass
class ShardWriter:
    """Writes placed rows (`stages.PLACED_SCHEMA`: the shard row plus `_shard`, `_pos`) into
    their shards under `root`.

    `planned`: (split, shard) → (first position, conversations planned); `spill`: a folder
    for rows that wait beyond `memory` bytes (default: `root/.spill`).
    """

    root: Path
    planned: dict[tuple[str, int], tuple[int, int]]
    spill: Path | None = None
    memory: int = SPILL_BYTES
    written: dict[tuple[str, int], int] = field(default_factory=dict)  # shard → rows written
    peak_rows: int = 0  # rows held in memory at most
    spilled_rows: int = 0
    _waiting: dict[tuple[str, int], _Waiting] = field(default_factory=dict)
    _held_bytes: int = 0
    _held_rows: int = 0

    def _shard(self, key: tuple[str, int]) -> _Waiting:
        found = self._waiting.get(key)
        if found is None:
            if key in self.written:
                raise RuntimeError(f"shard {key} is already written; a conversation was reported twice")
            found = self._waiting[key] = _Waiting(left=self.planned[key][1])
        return found

    def add(self, split: str, rows: pa.Table) -> None:
        """Rows of one item (any number, any shards of `split`); call `resolve` for the item next."""
        if not rows.num_rows:
            return
        shards = rows.column("_shard").to_pylist()
        groups: dict[int, list[int]] = {}
        for i, shard in enumerate(shards):
            groups.setdefault(shard, []).append(i)
        for shard, indices in groups.items():
            part = rows if len(groups) == 1 else rows.take(indices)
            size = part.get_total_buffer_size()
            w = self._shard((split, shard))
            w.tables.append(part)
            w.nbytes += size
            w.rows += part.num_rows
            self._held_bytes += size
            self._held_rows += part.num_rows
        self.peak_rows = max(self.peak_rows, self._held_rows)
        if self._held_bytes > self.memory:
            self._spill_largest()

    def resolve(self, split: str, places: list[tuple[int, int]]) -> None:
        """(shard, position) of every planned conversation of an item, made or set aside."""
        touched = set()
        for shard, _ in places:
            key = (split, shard)
            w = self._shard(key)
            w.left -= 1
            if w.left < 0:
                raise RuntimeError(f"shard {key}: more conversations accounted for than planned (one reported twice)")
            touched.add(key)
        for key in sorted(touched):
            if self._waiting[key].left == 0:
                self._write(key)

    def _spill_largest(self) -> None:
        """Move waiting rows to disk, largest sets first, until half the budget is free."""
        folder = self.spill or self.root / ".spill"
        for key, w in sorted(self._waiting.items(), key=lambda kv: -kv[1].nbytes):
            if self._held_bytes <= self.memory // 2:
                break
            if not w.tables:
                continue
            path = folder / f"{key[0]}-{key[1]:05d}-{len(w.spills):04d}.arrow"
            table = pa.concat_tables(w.tables)
            with replacing(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as out:
                out.write_table(table)
            w.spills.append(path)
            self.spilled_rows += table.num_rows
            self._held_bytes -= w.nbytes
            self._held_rows -= table.num_rows
            w.tables, w.nbytes = [], 0

    def _write(self, key: tuple[str, int]) -> None:
        """The shard's rows, sorted by position, written in row groups and renamed into place."""
        w = self._waiting.pop(key)
        self._held_bytes -= w.nbytes
        self._held_rows -= sum(t.num_rows for t in w.tables)
        self.written[key] = w.rows  # 0: every conversation set aside, no file
        if w.rows:
            mapped = [pa.memory_map(str(p)) for p in w.spills]
            try:
                parts = [pa.ipc.open_file(m).read_all() for m in mapped] + w.tables
                _write_sorted(pa.concat_tables(parts), shard_path(self.root, *key))
            finally:
                for m in mapped:
                    m.close()
        for p in w.spills:
            p.unlink(missing_ok=True)

    def finish(self) -> list[Path]:
        """Check every shard was written and remove part files the plan does not have.
        Returns the shard files."""
        missing = sorted(k for k in self.planned if k not in self.written)
        if missing:
            self.abort()
            raise RuntimeError(f"shards never completed: {missing[:5]} (conversations lost between the stages and the writer)")
        keep = {shard_path(self.root, s, n) for (s, n), rows in self.written.items() if rows}
        if self.root.is_dir():
            for path in sorted(self.root.glob("*/*")):
                if path.is_file() and path not in keep and path.name.startswith("part-"):
                    path.unlink()
        return sorted(keep)

    def abort(self) -> None:
        """Drop every waiting row and spill file (the build failed)."""
        for w in self._waiting.values():
            for p in w.spills:
                p.unlink(missing_ok=True)
        self._waiting.clear()
        self._held_bytes = self._held_rows = 0


def _write_sorted(table: pa.Table, path: Path) -> None:
    table = table.combine_chunks()  # one chunk per column: `take` over thousands of small chunks is slow
    order = pc.sort_indices(table["_pos"])
    try:
        with replacing(path) as tmp:
            # a CRC32 with every page, which `layout.read_batches` checks
            with pq.ParquetWriter(tmp, schema_with_hf_metadata(ROW_SCHEMA), compression="zstd", write_page_checksum=True) as writer:
                for start in range(0, table.num_rows, ROW_GROUP):
                    group = table.take(order.slice(start, ROW_GROUP)).drop_columns(list(PLACE)).cast(ROW_SCHEMA)
                    writer.write_table(group, row_group_size=ROW_GROUP)
    except OSError as e:  # a storage failure whatever its errno: pyarrow's may carry none (an error on close)
        raise storage_error(path, e) from None
