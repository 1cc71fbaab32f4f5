"""Discovery: every source's files → StudyItems (index.parquet) and one ledger row per file
(ledger.parquet).

The ledger is the accounting behind the guarantee that nothing is lost silently: a file that no
reader claims is still recorded, as unsupported.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from curation.atomic import write_parquet
from curation.errors import CurationError
from curation.ingest import SourceReader, readers_for
from curation.items import LedgerEntry, StudyItem, items_table, ledger_table
from curation.manifest import BuildSpec

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Index:
    items: list[StudyItem]
    ledger: list[LedgerEntry]

    def summary(self) -> str:
        by_status = Counter(e.status for e in self.ledger)
        reasons = Counter(e.reason for e in self.ledger if e.status != "indexed")
        lines = [f"{len(self.items)} items from {len(self.ledger)} files ({', '.join(f'{v} {k}' for k, v in sorted(by_status.items()))})"]
        lines += [f"  {n:>5} × {reason}" for reason, n in reasons.most_common()]
        return "\n".join(lines)


def list_files(root: Path) -> list[str]:
    """Every file under root as sorted relative POSIX paths (hidden files included: they are
    discovered like any other and ledgered)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        rel = Path(dirpath).relative_to(root)
        out.extend((rel / f).as_posix() for f in filenames)
    return sorted(out)


def scan_source(reader: SourceReader) -> tuple[list[StudyItem], list[LedgerEntry]]:
    spec = reader.spec
    if not reader.root.is_dir():
        raise CurationError(f"source {spec.name!r}: root folder not found: {reader.root}")
    files = list_files(reader.root)
    if not files:
        raise CurationError(f"source {spec.name!r}: no files under {reader.root}")
    started = time.perf_counter()
    scan = reader.scan(files)
    claimed = Counter(e.uri for e in scan.ledger)
    twice = [u for u, n in claimed.items() if n > 1]
    if twice:
        raise RuntimeError(f"reader {type(reader).__name__} ledgered {twice[:3]} more than once")
    ledger = list(scan.ledger)
    for uri in files:
        if uri not in claimed:
            reason = f"unsupported file type for a {spec.kind} source ({Path(uri).suffix or 'no extension'})"
            ledger.append(reader.entry(uri, "skipped", reason))
    log.info("source %s: %d files → %d items in %.1f s", spec.name, len(files), len(scan.items), time.perf_counter() - started)
    return scan.items, ledger


def build_index(spec: BuildSpec) -> Index:
    items: list[StudyItem] = []
    ledger: list[LedgerEntry] = []
    for reader in readers_for(spec).values():
        found, entries = scan_source(reader)
        items += found
        ledger += entries
    ids = Counter(i.item_id for i in items)
    clash = [k for k, n in ids.items() if n > 1]
    if clash:
        raise RuntimeError(f"item_id collision: {clash[:3]}")
    return Index(items=items, ledger=ledger)


def write_table(table: pa.Table, path: Path) -> None:
    """Write beside the final name, then rename: a reader never sees half a file."""
    write_parquet(table, path)


def write_index(index: Index, index_path: Path, ledger_path: Path) -> tuple[Path, Path]:
    write_table(items_table(index.items), index_path)
    write_table(ledger_table(index.ledger), ledger_path)
    return index_path, ledger_path
