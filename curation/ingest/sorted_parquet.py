"""Parquet files written in position order, in row groups of a fixed size, from parts written
elsewhere: the last step of the scan (`curation.ingest.scan`), on the driver.

Each part is sorted by an integer position that no two parts share (a file's place in the walk);
`merge_parts` reads one row group of each at a time and hands `RowGroupWriter` the rows in order,
and the writer cuts row groups of exactly `ROW_GROUP_ROWS`: the bytes written depend on the rows
alone, never on how many parts there were, and the driver holds a few thousand rows at a time.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROW_GROUP_ROWS = 16_384  # rows per row group of index.parquet and ledger.parquet: what the driver holds at most
MERGE_ROWS = 4_096  # rows per row group of the parts, and per read of the merge


class RowGroupWriter:
    """A Parquet file written in row groups of exactly `ROW_GROUP_ROWS` rows (the last one
    shorter), whatever the sizes of the tables handed to it: the bytes depend on the rows
    alone. Written beside `path` and renamed on a clean close."""

    def __init__(self, path: Path, schema: pa.Schema):
        self.path, self.schema = path, schema
        self.tmp = path.with_name(f".{path.name}.tmp")
        self.writer = pq.ParquetWriter(self.tmp, schema)
        self.pending: list[pa.Table] = []
        self.held = 0

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.pending.append(table.select(self.schema.names).cast(self.schema))
        self.held += table.num_rows
        while self.held >= ROW_GROUP_ROWS:
            self._flush(ROW_GROUP_ROWS)

    def _flush(self, rows: int) -> None:
        table = pa.concat_tables(self.pending).combine_chunks() if len(self.pending) > 1 else self.pending[0]
        self.writer.write_table(table.slice(0, rows), row_group_size=rows)
        rest = table.slice(rows)
        self.pending, self.held = ([rest] if rest.num_rows else []), rest.num_rows

    def __enter__(self) -> RowGroupWriter:
        return self

    def __exit__(self, kind: Any, *_: Any) -> None:
        if kind is None and self.held:
            self._flush(self.held)
        self.writer.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def merge_parts(paths: Sequence[str], order: tuple[str, ...], out: RowGroupWriter, batch_rows: int = MERGE_ROWS) -> None:
    """Merge Parquet files each sorted by `order` (whose first column is an integer position
    no two files share) into `out`, in order, holding one batch per file at a time."""
    streams = [pq.ParquetFile(p, pre_buffer=False).iter_batches(batch_size=batch_rows, use_threads=False) for p in paths]
    buffers: list[pa.Table] = [pa.table({}) for _ in streams]
    done = [False] * len(streams)
    key = order[0]
    while True:
        for i, stream in enumerate(streams):
            while not done[i] and buffers[i].num_rows == 0:
                batch = next(stream, None)
                if batch is None:
                    done[i] = True
                else:
                    buffers[i] = pa.Table.from_batches([batch])
        if not any(b.num_rows for b in buffers):
            pa.default_memory_pool().release_unused()  # give back what the merge held: the driver stays small
            return
        # rows up to the smallest last position of the files not yet read to the end are final
        open_ends = [b.column(key)[-1].as_py() for b, d in zip(buffers, done) if not d]
        watermark = min(open_ends) if open_ends else None
        taken = []
        for i, b in enumerate(buffers):
            if not b.num_rows:
                continue
            cut = b.num_rows if watermark is None else int(np.searchsorted(b.column(key).to_numpy(), watermark, side="right"))
            if cut:
                taken.append(b.slice(0, cut))
                buffers[i] = b.slice(cut)
        out.add(pa.concat_tables(taken).sort_by([(c, "ascending") for c in order]))
