"""The driver's share of a build, per row: what one process must do for every conversation
however many GPU nodes run the experts — take the item's result from Ray Data (unpickle the
work record, decode the rows), hand the rows to the shard writer, count them in the tally —
and how fast the writer writes shards (sort by position, Parquet with zstd).

    python bench/driver.py SHARDS [--rows N] [--rows-per-shard R]

SHARDS is a build's output folder: its rows are replayed (with fresh positions, `--rows` of
them, repeating the build's rows as needed) through the same code the build's driver runs.
Prints rows/s and MB/s for collecting and for writing; these bound a build's rows/s from
above whatever the cluster (bench/README.md's projection uses them).
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO)]

from curation.build.plan import ItemPlan, PlannedConversation  # noqa: E402
from curation.build.stages import PLACED_SCHEMA, WorkItem, table_bytes, table_from_bytes  # noqa: E402
from curation.items import StudyItem  # noqa: E402
from curation.store.card import Tally  # noqa: E402
from curation.store.layout import shard_files  # noqa: E402
from curation.store.report import ConversationOutcome, ItemReport  # noqa: E402
from curation.store.shards import ShardWriter  # noqa: E402


def replayed(source: Path, rows: int, per_item: int, per_shard: int) -> list[tuple[bytes, bytes]]:
    """(pickled work record, rows as Arrow IPC) per item, as render tasks send them."""
    table = pa.concat_tables([pa.parquet.read_table(f) for f in shard_files(source).files])
    out, pos = [], 0
    while pos < rows:
        take = table.slice(pos % table.num_rows, per_item)
        n = take.num_rows
        shards = [(pos + v) // per_shard for v in range(n)]
        placed = take.append_column("_shard", pa.array(shards, pa.int64())).append_column("_pos", pa.array(range(pos, pos + n), pa.int64()))
        item = StudyItem(item_id=f"i{pos}", patient_key="p", study_key="s", source="x", kind="image2d", modality="CR",
                         shape=[1, 1], spacing=[1.0, 1.0], n_files=1, uris=["x.png"])
        planned = [PlannedConversation(task=0, variant=v, arg="", shard=shards[v], pos=pos + v) for v in range(n)]
        report = ItemReport(outcomes=[ConversationOutcome(0, v, "used") for v in range(n)])
        work = WorkItem(plan=ItemPlan(item=item, split="train", lane=0, conversations=planned), report=report)
        out.append((pickle.dumps(work, protocol=5), table_bytes(placed.cast(PLACED_SCHEMA))))
        pos += n
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shards", type=Path)
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--rows-per-shard", type=int, default=2000)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = replayed(args.shards, args.rows, per_item=3, per_shard=args.rows_per_shard)
    rows = sum(table_from_bytes(r).num_rows for _, r in results)
    nbytes = sum(len(r) for _, r in results)
    planned = {("train", k): (k * args.rows_per_shard, min(args.rows_per_shard, rows - k * args.rows_per_shard))
               for k in range(-(-rows // args.rows_per_shard))}
    with tempfile.TemporaryDirectory() as tmp:
        writer, tally = ShardWriter(Path(tmp) / "data", planned, spill=Path(tmp) / "spill", memory=1 << 40), Tally()
        started = time.perf_counter()
        for work_bytes, row_bytes in results:
            work, table = pickle.loads(work_bytes), table_from_bytes(row_bytes)
            # positions were assigned in arrival order: hold every shard until the end (no write here)
            writer.add("train", table)
            tally.record(work.plan.entry(), work.report, table)
        collect = time.perf_counter() - started
        started = time.perf_counter()
        for work_bytes, _ in results:
            work = pickle.loads(work_bytes)
            writer.resolve("train", work.plan.places())
        files = writer.finish()
        write = time.perf_counter() - started
        written = sum(f.stat().st_size for f in files)
    figures = {"rows": rows, "row_kib": nbytes / rows / 1024, "collect_rows_per_s": rows / collect, "collect_mb_per_s": nbytes / collect / 1e6,
               "write_rows_per_s": rows / write, "write_mb_per_s": written / write / 1e6, "shards": len(files)}
    print(f"driver: {rows} rows of {figures['row_kib']:.1f} KiB: collect {figures['collect_rows_per_s']:.0f} rows/s "
          f"({figures['collect_mb_per_s']:.0f} MB/s); shard writing {figures['write_rows_per_s']:.0f} rows/s "
          f"({figures['write_mb_per_s']:.0f} MB/s of Parquet, {len(files)} shards)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
