"""The archive scan in partitions: any number of processes (or Ray tasks) read headers, and no
process ever holds the whole archive.

    walk (driver, streamed) ─► batches of files ─► read_batch (task): one record per file,
                                                   spilled to Parquet, one row group per bucket
                             ─► group_buckets (task): the records of some buckets → items and
                                                   ledger rows, spilled, sorted by file position
                             ─► merge (driver, streamed): index.parquet, ledger.parquet

A record's bucket is a hash of its grouping key (a SeriesInstanceUID, a case, an image), so every
file of a series lands in the same bucket whichever batch read it: series that span batches are
grouped correctly. The output is sorted by each file's position in the walk (an item by its first
file), and written in row groups of a fixed size, so the same archive gives the same bytes
whatever the number of processes, batches or group tasks.

`read_batch` and `group_buckets` are pure functions of their arguments (a `ScanJob` and file
lists); how they are run is the caller's: `LocalRunner` (this machine's cores) here,
`curation.build.scan` on a Ray cluster. The driver holds one batch of file names per task in
flight and a short list per batch of where its buckets are: its memory does not grow with the
number of files.
"""

from __future__ import annotations

import itertools
import logging
import os
import pickle
import shutil
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.errors import CurationError
from curation.ingest import READERS, SourceReader
from curation.ingest.base import Record
from curation.ingest.runners import LocalRunner, Runner
from curation.ingest.sorted_parquet import MERGE_ROWS, RowGroupWriter, merge_parts
from curation.ingest.walk import Entry, walk
from curation.items import INDEX_SCHEMA, LEDGER_SCHEMA
from curation.keys import Keyer

log = logging.getLogger(__name__)

BUCKETS = 64  # fixed, so that outputs never depend on how the work was cut
BATCH_FILES = 2048  # files per read task
GROUP_RECORDS = 200_000  # records per group task, at most (a bucket is never split)

RECORD_SCHEMA = pa.schema([("pos", pa.int64()), ("uri", pa.string()), ("bucket", pa.int32()), ("key", pa.string()),
                           ("status", pa.string()), ("reason", pa.string()), ("facts", pa.binary())])
ITEM_PART_SCHEMA = INDEX_SCHEMA.append(pa.field("pos", pa.int64())).append(pa.field("seq", pa.int64()))
LEDGER_PART_SCHEMA = LEDGER_SCHEMA.append(pa.field("pos", pa.int64()))

@dataclass(frozen=True, slots=True)
class ScanJob:
    """Everything a task needs, picklable: the source's spec, the key secret, the spill folder."""

    source: Any
    secret: str
    spill: str

    def reader(self) -> SourceReader:
        return READERS[self.source.kind](self.source, Keyer(self.secret))


@dataclass(slots=True)
class BatchResult:
    """Where a read task put its records: the file, and per bucket (row group, rows)."""

    batch: int
    path: str
    buckets: dict[int, tuple[int, int]]
    files: int


@dataclass(slots=True)
class GroupResult:
    task: int
    items_path: str
    ledger_path: str
    items: int
    statuses: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)

    def count(self, items: pa.Table, ledger: pa.Table) -> None:
        self.items = items.num_rows
        statuses = ledger.column("status").to_pylist()
        self.statuses.update(statuses)
        self.reasons.update(r for s, r in zip(statuses, ledger.column("reason").to_pylist()) if s != "indexed")


def bucket_of(key: str) -> int:
    """A stable hash of a grouping key (not Python's `hash`, which changes between processes).

    >>> bucket_of("1.2.3.4") == bucket_of("1.2.3.4") and 0 <= bucket_of("1.2.3.4") < BUCKETS
    True
    """
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % BUCKETS


def unsupported(kind: str, uri: str) -> str:
    suffix = Path(uri).suffix
    return f"unsupported file type for a {kind} source ({suffix or 'no extension'})"


# -- tasks (pure: run anywhere) ----------------------------------------------------------------------


def read_batch(job: ScanJob, batch: int, first_pos: int, entries: Sequence[Entry]) -> BatchResult:
    """Read the headers of one batch of walk entries; spill one record per entry, one row
    group per bucket."""
    table = records_table(job, first_pos, entries)
    path = os.path.join(job.spill, f"records-{batch:06d}.parquet")
    buckets: dict[int, tuple[int, int]] = {}
    with pq.ParquetWriter(path, RECORD_SCHEMA, compression="none") as writer:
        for n, (bucket, start, end) in enumerate(_bucket_runs(table)):
            writer.write_table(table.slice(start, end - start), row_group_size=end - start)
            buckets[bucket] = (n, end - start)
    return BatchResult(batch, path, buckets, len(entries))


def records_table(job: ScanJob, first_pos: int, entries: Sequence[Entry]) -> pa.Table:
    """One record per entry (a skip of the walk, the reader's record, or "unsupported"), sorted
    by bucket then position."""
    reader = job.reader()
    records = {r.uri: r for r in reader.read([e.uri for e in entries if e.skip is None])}
    rows: dict[str, list[Any]] = {name: [] for name in RECORD_SCHEMA.names}
    for offset, e in enumerate(entries):
        if e.skip is not None:
            r = Record(e.uri, e.uri, "skipped", e.skip)
        else:
            r = records.get(e.uri) or Record(e.uri, e.uri, "skipped", unsupported(job.source.kind, e.uri))
        for name, value in (("pos", first_pos + offset), ("uri", r.uri), ("bucket", bucket_of(r.key)), ("key", r.key),
                            ("status", r.status), ("reason", r.reason),
                            ("facts", None if r.facts is None else pickle.dumps(r.facts, protocol=pickle.HIGHEST_PROTOCOL))):
            rows[name].append(value)
    return pa.Table.from_pydict(rows, schema=RECORD_SCHEMA).sort_by([("bucket", "ascending"), ("pos", "ascending")])


def _bucket_runs(table: pa.Table) -> Iterator[tuple[int, int, int]]:
    """(bucket, start, end) of each run of one bucket in a table sorted by bucket."""
    column = table.column("bucket").to_numpy()
    starts = np.flatnonzero(np.r_[True, column[1:] != column[:-1]]) if len(column) else np.array([], int)
    for start, end in zip(starts, [*starts[1:], len(column)]):
        yield int(column[start]), int(start), int(end)


def group_buckets(job: ScanJob, task: int, buckets: Sequence[tuple[int, Sequence[tuple[str, int]]]]) -> GroupResult:
    """Group the records of whole buckets (each given as the (file, row group) parts that hold
    it) into items and ledger rows, and spill them sorted by file position."""
    wanted: dict[str, list[int]] = {}
    for _, parts in buckets:
        for path, rg in parts:
            wanted.setdefault(path, []).append(rg)
    records = pa.concat_tables([pq.ParquetFile(path).read_row_groups(sorted(rgs)) for path, rgs in sorted(wanted.items())])
    items, ledger = group_table(job, records.sort_by([("bucket", "ascending"), ("pos", "ascending")]))
    result = GroupResult(task, os.path.join(job.spill, f"items-{task:06d}.parquet"), os.path.join(job.spill, f"ledger-{task:06d}.parquet"), 0)
    # row groups of a merge batch: the merge then holds a batch of each part, never a whole part
    pq.write_table(items, result.items_path, compression="none", row_group_size=MERGE_ROWS)
    pq.write_table(ledger, result.ledger_path, compression="none", row_group_size=MERGE_ROWS)
    result.count(items, ledger)
    return result


def group_table(job: ScanJob, records: pa.Table) -> tuple[pa.Table, pa.Table]:
    """Items and ledger rows of whole buckets of records (sorted by bucket, then position), each
    sorted by file position."""
    reader = job.reader()
    items: list[dict[str, Any]] = []
    ledger: list[dict[str, Any]] = []
    for _, start, end in _bucket_runs(records):
        _group_one(reader, records.slice(start, end - start), items, ledger)
    seen = Counter(i["item_id"] for i in items)
    clash = [k for k, n in seen.items() if n > 1]
    if clash:
        raise RuntimeError(f"item_id collision in source {job.source.name!r}: {clash[:3]}")
    items.sort(key=lambda r: (r["pos"], r["seq"]))
    ledger.sort(key=lambda r: r["pos"])
    return pa.Table.from_pylist(items, schema=ITEM_PART_SCHEMA), pa.Table.from_pylist(ledger, schema=LEDGER_PART_SCHEMA)


def _group_one(reader: SourceReader, table: pa.Table, items: list[dict[str, Any]], ledger: list[dict[str, Any]]) -> None:
    columns = table.to_pydict()
    records = [Record(u, k, s, r or "", None if f is None else pickle.loads(f))
               for u, k, s, r, f in zip(columns["uri"], columns["key"], columns["status"], columns["reason"], columns["facts"])]
    pos_of = dict(zip(columns["uri"], columns["pos"]))
    scan = reader.group(records)
    ledgered = Counter(e.uri for e in scan.ledger)
    if ledgered.keys() != pos_of.keys() or max(ledgered.values(), default=1) > 1:
        odd = sorted(set(ledgered) ^ set(pos_of))[:3] or [u for u, n in ledgered.items() if n > 1][:3]
        raise RuntimeError(f"reader {type(reader).__name__} did not ledger every record exactly once: {odd}")
    for seq, item in enumerate(scan.items):
        items.append({**item.to_row(), "pos": min(pos_of[u] for u in item.uris), "seq": seq})
    for e in scan.ledger:
        ledger.append({"uri": e.uri, "source": e.source, "status": e.status, "reason": e.reason, "item_id": e.item_id, "pos": pos_of[e.uri]})


# -- the driver ----------------------------------------------------------------------------------------


@dataclass(slots=True)
class ScanSummary:
    """Counts of a finished scan (what `m3-curate index` prints)."""

    items: int = 0
    files: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def text(self) -> str:
        took = f" in {self.seconds:.2f} s ({self.files / self.seconds:,.0f} files/s)" if self.seconds > 0 else ""
        lines = [f"{self.items} items from {self.files} files ({', '.join(f'{v} {k}' for k, v in sorted(self.statuses.items()))}){took}"]
        lines += [f"  {n:>5} × {reason}" for reason, n in self.reasons.most_common()]
        return "\n".join(lines)


def scan_archive(sources: Sequence[Any], secret: str, index_path: Path, ledger_path: Path, runner: Runner | None = None,
                 spill: Path | None = None) -> ScanSummary:
    """Scan every source into `index_path` and `ledger_path` (written beside, then renamed).
    `runner` defaults to a `LocalRunner` over this machine's cores; `spill` (a folder every
    task can reach; default beside `index_path`) holds the partitions and is removed after."""
    started = time.perf_counter()
    index_path.parent.mkdir(parents=True, exist_ok=True)
    ledger_path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".scan-", dir=spill or index_path.parent))
    own_runner = runner is None
    runner = runner or LocalRunner()
    summary = ScanSummary()
    try:
        with RowGroupWriter(index_path, INDEX_SCHEMA) as items_out, RowGroupWriter(ledger_path, LEDGER_SCHEMA) as ledger_out:
            for source in sources:
                job = ScanJob(source, secret, str(folder / source.name))
                _scan_source(job, runner, items_out, ledger_out, summary)
    finally:
        if own_runner:
            runner.close()  # type: ignore[attr-defined]
        shutil.rmtree(folder, ignore_errors=True)
    summary.seconds = time.perf_counter() - started
    return summary


def _scan_source(job: ScanJob, runner: Runner, items_out: RowGroupWriter, ledger_out: RowGroupWriter, summary: ScanSummary) -> None:
    source = job.source
    root = Path(source.root)
    if not root.is_dir():
        raise CurationError(f"source {source.name!r}: root folder not found: {root}")
    job.reader().prepare()
    started = time.perf_counter()
    entries = walk(root, source.follow_links)
    first = list(itertools.islice(entries, BATCH_FILES + 1))
    if not first:
        raise CurationError(f"source {source.name!r}: no files under {root}")
    if len(first) <= BATCH_FILES:  # one batch: read and group it here, nothing to spill
        items, ledger = group_table(job, records_table(job, 0, first))
        results = [GroupResult(0, "", "", 0)]
        results[0].count(items, ledger)
        items_out.add(items)
        ledger_out.add(ledger)
        files = len(first)
    else:
        files, results = _scan_in_parts(job, runner, itertools.chain(first, entries), items_out, ledger_out)
    summary.files += files
    for r in results:
        summary.items += r.items
        summary.statuses.update(r.statuses)
        summary.reasons.update(r.reasons)
    log.info("source %s: %d files → %d items in %.1f s", source.name, files, sum(r.items for r in results), time.perf_counter() - started)


def _scan_in_parts(job: ScanJob, runner: Runner, entries: Iterator[Entry], items_out: RowGroupWriter,
                   ledger_out: RowGroupWriter) -> tuple[int, list[GroupResult]]:
    """Read tasks over batches of the walk, group tasks over buckets, a merge by position."""
    os.makedirs(job.spill)
    where: dict[int, list[tuple[str, int]]] = {}
    sizes: Counter[int] = Counter()
    files = 0
    for result in runner.map(read_batch, _batches(job, entries)):
        files += result.files
        for bucket, (rg, n) in result.buckets.items():
            where.setdefault(bucket, []).append((result.path, rg))
            sizes[bucket] += n
    tasks = _group_tasks(where, sizes, getattr(runner, "workers", 1))
    results = sorted(runner.map(group_buckets, ((job, n, t) for n, t in enumerate(tasks))), key=lambda r: r.task)
    merge_parts([r.items_path for r in results], ("pos", "seq"), items_out)
    merge_parts([r.ledger_path for r in results], ("pos",), ledger_out)
    return files, results


def _batches(job: ScanJob, entries: Iterator[Entry]) -> Iterator[tuple[ScanJob, int, int, list[Entry]]]:
    batch: list[Entry] = []
    n = pos = 0
    for e in entries:
        batch.append(e)
        if len(batch) == BATCH_FILES:
            yield job, n, pos, batch
            n, pos, batch = n + 1, pos + len(batch), []
    if batch:
        yield job, n, pos, batch


def _group_tasks(where: dict[int, list[tuple[str, int]]], sizes: Counter[int], workers: int = 1) -> list[list[tuple[int, list[tuple[str, int]]]]]:
    """Buckets in order, cut into tasks of at most `GROUP_RECORDS` records (a bucket whole),
    and into at least two per worker where there are buckets enough, so all workers group."""
    limit = max(1, min(GROUP_RECORDS, -(-sum(sizes.values()) // (2 * max(1, workers)))))
    tasks: list[list[tuple[int, list[tuple[str, int]]]]] = [[]]
    held = 0
    for bucket in sorted(where):
        if tasks[-1] and held + sizes[bucket] > limit:
            tasks.append([])
            held = 0
        tasks[-1].append((bucket, where[bucket]))
        held += sizes[bucket]
    return tasks
