"""`m3-curate convert`: every indexed item as NIfTI, exactly as the experts will see it.

It goes through the same readers (`SourceReader.load`) that the build uses, so a wrong
orientation or a missing rescale shows up here, in a file a person can open.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from curation.errors import CurationError, ItemError
from curation.folder_lock import FolderLock
from curation.ingest.index import Index, build_index, write_index
from curation.ingest import SourceReader, readers_for
from curation.ingest.nifti_write import write_nifti
from curation.ingest.reasons import describe
from curation.items import LedgerEntry, StudyItem
from curation.manifest import BuildSpec

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Converted:
    written: list[Path] = field(default_factory=list)
    failed: list[LedgerEntry] = field(default_factory=list)


def _convert_one(reader: SourceReader, item: StudyItem, out: Path, suffix: str) -> Path:
    volume = reader.load(item)
    array = volume.array[:, :, None] if volume.array.ndim == 2 else volume.array
    return write_nifti(out / f"{item.item_id}{suffix}", array, volume.affine)


def convert(spec: BuildSpec, out: Path, *, compress: bool = True, workers: int = 2, index: Index | None = None) -> Converted:
    """Index (unless given), then load and write each item; an item that fails to load is set
    aside in `out/ledger.parquet` with its reason and the others go on."""
    index = index or build_index(spec)
    with FolderLock(out, "convert", "--out"):
        return _convert_all(spec, index, out, ".nii.gz" if compress else ".nii", workers)


def _convert_all(spec: BuildSpec, index: Index, out: Path, suffix: str, workers: int) -> Converted:
    previous = _previous_items(out)
    readers = readers_for(spec)
    result = Converted()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(_convert_one, readers[i.source], i, out, suffix): i for i in index.items}
        for n, (future, item) in enumerate(futures.items(), start=1):
            try:
                result.written.append(future.result())
            except ItemError as e:
                log.warning("item set aside: %s", e)
                result.failed.append(LedgerEntry(e.where, item.source, "quarantined", f"conversion failed: {e.reason}", item.item_id))
            except CurationError:  # --out cannot be written (a full disk): not the item's fault, and no later item would fare better
                pool.shutdown(cancel_futures=True)
                raise
            except Exception as e:  # a per-item boundary: a writer's or a decoder's failure sets this item aside
                log.warning("item set aside: %s: %s", item.uris[0], describe(e))
                result.failed.append(LedgerEntry(item.uris[0], item.source, "quarantined", f"conversion failed: {describe(e, out)}", item.item_id))
            if n % 10 == 0 or n == len(futures):
                log.info("converted %d/%d items (%.1f s)", n, len(futures), time.perf_counter() - started)
    _record(index, result, out)
    _remove_stale(out, previous, set(result.written))
    return result


def _previous_items(out: Path) -> list[str]:
    """The items the last convert into `out` wrote (its `index.parquet`), none if it holds no
    readable one."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(out / "index.parquet").read(columns=["item_id"]).column("item_id").to_pylist()
    except (OSError, pa.ArrowException, KeyError):
        return []


def _remove_stale(out: Path, previous: list[str], written: set[Path]) -> None:
    """The last convert's files that this one did not write again: an item no longer indexed
    (another manifest, another archive), one that failed this time, or the other suffix
    (`--uncompressed` after compressed). Left there, they would read as items of this index.
    Files it did not write are left alone."""
    stale = [p for item in previous for p in (out / f"{item}.nii.gz", out / f"{item}.nii") if p not in written and p.exists()]
    for path in stale:
        path.unlink()
    if stale:
        log.info("removed %d NIfTI files of the last convert into %s that this one did not write", len(stale), out)


def _record(index: Index, result: Converted, out: Path) -> None:
    """Items that failed are dropped from the written index; their files stay in the ledger,
    now quarantined with the reason."""
    reasons = {e.item_id: e.reason for e in result.failed}
    items = [i for i in index.items if i.item_id not in reasons]
    ledger = [
        replace(e, status="quarantined", reason=reasons[e.item_id]) if e.item_id in reasons else e
        for e in index.ledger
    ]
    write_index(Index(items=items, ledger=ledger), out / "index.parquet", out / "ledger.parquet")
