"""Where a build's outputs live: one folder to share as it is, one to keep.

    OUT/
      dataset/                          shareable: no source path, no folder name, no header value
        README.md                       the dataset card (Hugging Face YAML front matter + summary)
        dataset_card.json               the same accounts, for machines
        data/<split>/part-NNNNN.parquet the rows
      internal/                         never share: it names the archive's files
        README.md                       says so
        index.parquet, ledger.parquet   items and every discovered file with its fate
        cache/                          expert findings (`output.cache` moves it)
        preview_cache/                  findings `m3-curate preview` computed itself
        build.lock                      held by the build writing this folder
        plan/, spill/                   while a build runs: the items' input blocks for Ray, and
                                        rows waiting for their shard
      .dataset.new/, .dataset.old/      while a build runs: the dataset being written, and the
                                        one it replaces for the instant of the swap

Every command finds these paths here, so the build, `render`, `preview`, `export`, `finetune`
and `eval` agree on them (`output.cache`, when the manifest sets it, wins over `--out`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field, replace
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from curation.atomic import write_text
from curation.errors import CurationError, brief

log = logging.getLogger(__name__)

SHARD_GLOB = "part-*.parquet"
INTERNAL_NOTE = """# Internal: do not share

This folder belongs to the m3-curate build beside it and names the archive's own files:
`index.parquet` and `ledger.parquet` hold source paths (folder names can carry patient
names or IDs), and `cache/` holds expert findings keyed by file content. Share `../dataset/`
only.
"""


@dataclass(frozen=True, slots=True)
class Layout:
    """The paths of one build's output folder `out`; `cache_dir` is the manifest's `output.cache`."""

    out: Path
    cache_dir: Path | None = None
    dataset_name: str = "dataset"

    @classmethod
    def of(cls, spec: Any, out: str | Path | None = None) -> Layout:
        """The layout a manifest's build uses: `--out` when given, else `output.dir`."""
        folder = Path(out).resolve() if out else Path(spec.output.dir)
        return cls(out=folder, cache_dir=Path(spec.output.cache) if spec.output.cache else None)

    @property
    def dataset(self) -> Path:
        return self.out / self.dataset_name

    def staged(self) -> Layout:
        """The same layout with the dataset in its staging folder, where a build writes it
        before it replaces `dataset/` whole (`curation.store.output.publish`)."""
        return replace(self, dataset_name=".dataset.new")

    @property
    def retired(self) -> Path:
        """Where the replaced dataset waits for the instant of the swap."""
        return self.out / ".dataset.old"

    @property
    def data(self) -> Path:
        return self.dataset / "data"

    @property
    def card(self) -> Path:
        return self.dataset / "dataset_card.json"

    @property
    def readme(self) -> Path:
        return self.dataset / "README.md"

    @property
    def internal(self) -> Path:
        return self.out / "internal"

    @property
    def index(self) -> Path:
        return self.internal / "index.parquet"

    @property
    def ledger(self) -> Path:
        return self.internal / "ledger.parquet"

    @property
    def cache(self) -> Path:
        return self.cache_dir or self.internal / "cache"

    @property
    def preview_cache(self) -> Path:
        return self.internal / "preview_cache"

    @property
    def lock(self) -> Path:
        return self.internal / "build.lock"

    @property
    def spill(self) -> Path:
        return self.internal / "spill"

    @property
    def plan_inputs(self) -> Path:
        return self.internal / "plan"

    def mark_internal(self) -> None:
        """Write the note that tells a reader of `internal/` not to share it."""
        self.internal.mkdir(parents=True, exist_ok=True)
        note = self.internal / "README.md"
        if not note.is_file() or note.read_text() != INTERNAL_NOTE:
            write_text(note, INTERNAL_NOTE)


def shards_root(path: str | Path) -> Path:
    """The folder that holds `<split>/part-*.parquet`, given a build's output folder, its
    `dataset/` folder or that folder itself."""
    path = Path(path)
    for candidate in (path / "dataset" / "data", path / "data", path):
        if candidate.is_dir() and any(candidate.glob(f"*/{SHARD_GLOB}")):
            return candidate
    if not path.is_dir():
        raise CurationError(f"{path}: no such folder (give a build's output folder, its dataset/ folder or dataset/data/)")
    raise CurationError(f"{path}: no shards (<split>/{SHARD_GLOB}) here or in dataset/data/; give a build's output folder")


@dataclass(frozen=True)
class Shards:
    """The shard files a command reads, in name order, and those it sets aside: a file whose
    Parquet footer does not open (a copy cut short, a file that is not Parquet), or whose
    columns are not the rows the command reads (a dataset from another tool), is named in a
    warning and in the command's record (`set_aside`: path → why), and the rest are read.
    `stamps` say which file each path was when the command looked (`stamp`), so that a reader
    finds a dataset replaced under it (`read_batches`)."""

    files: list[Path]
    set_aside: dict[str, str]
    stamps: dict[Path, Stamp] = field(default_factory=dict)


Stamp = tuple[int, int, int]  # (inode, size, mtime in ns)


def stamp(path: Path) -> Stamp:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


def _stamp_now(path: Path) -> Stamp | None:
    try:
        return stamp(path)
    except FileNotFoundError:
        return None


def shard_files(path: str | Path, split: str | None = None, *, columns: Sequence[str] = (), warn: bool = True) -> Shards:
    """Shard files (all splits, or one) that open and hold `columns` as the build writes them:
    an error naming the folder when there are none, or when none of them can be read.
    `warn=False` for a second look at the same folder (a training worker after its driver)."""
    root = shards_root(path)
    folder = root if split is None else root / split
    files = sorted(folder.glob(f"*/{SHARD_GLOB}" if split is None else SHARD_GLOB))
    if not files:
        have = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob(SHARD_GLOB)))
        raise CurationError(f"{folder}: no shards for split {split!r} (splits with shards here: {', '.join(have) or 'none'})")
    found = {str(f): why for f in files if (why := unreadable(f, columns))}
    if len(found) == len(files):
        why, advice = next(iter(found.values()))
        raise CurationError(f"{folder}: no shard can be read: {why}; {advice}")
    for f, (why, advice) in found.items() if warn else ():
        log.warning("%s: set aside, %s; the other shards are read (%s)", f, why, advice)
    kept = [f for f in files if str(f) not in found]
    return Shards(kept, {f: why for f, (why, _) in found.items()}, {f: stamp(f) for f in kept})


DAMAGED = "copy the dataset again, or build it again: the build writes the same bytes"
NOT_OURS = "a dataset from another tool, or written before this version's columns: build it again"


def unreadable(shard: Path, columns: Sequence[str] = ()) -> tuple[str, str] | None:
    """Why `shard` cannot be read for `columns` and what to do, or None when it can (one small
    read: the footer)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.rows import column_problems

    try:
        schema = pq.read_schema(shard)
    except (OSError, pa.ArrowException) as e:
        return f"not a readable Parquet file ({brief(e)})", DAMAGED
    if problems := column_problems(schema, columns):
        return f"not the rows this command reads ({'; '.join(problems)})", NOT_OURS
    return None


def read_batches(shard: Path, stamp_seen: Stamp | None = None, **iter_batches: Any) -> Iterator[Any]:
    """`pq.ParquetFile(shard).iter_batches(**iter_batches)`, where a shard whose footer opened
    but whose rows do not read (bytes changed inside the file, found only as they are read)
    stops the command naming it, not with pyarrow's traceback. The build writes a CRC32 with
    every page and they are checked here: without them, a third of single bit flips in a shard
    read back as other text or pixels, without an error (`bench/README.md`, "Shards on disk").
    With `stamp_seen` (`Shards.stamps`), a shard that is no longer the file the command found at
    its start stops it too: a build into the same folder swapped in a new dataset, and a run
    that goes on would read a mix of the two (a fine-tune comes back to every shard each epoch)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if stamp_seen is not None and _stamp_now(shard) != stamp_seen:
        raise CurationError(f"{shard}: replaced since this command started (a build into the same folder?): it reads one "
                            "dataset, not a mix of two; run it again on the new one, or give builds their own --out")
    try:
        yield from pq.ParquetFile(shard, page_checksum_verification=True).iter_batches(**iter_batches)
    except (OSError, pa.ArrowException) as e:
        raise CurationError(f"{shard}: its rows do not read ({brief(e)}): the file is damaged; "
                            f"{DAMAGED}") from None


def iter_rows(files: Sequence[Path], *, columns: Sequence[str] | None = None, limit: int | None = None, batch_rows: int = 64,
              stamps: dict[Path, Stamp] | None = None) -> Iterator[dict[str, Any]]:
    """Rows of `files` in order, as dicts, a record batch at a time (`stamps`: see `read_batches`)."""
    n = 0
    for f in files:
        for batch in read_batches(f, (stamps or {}).get(f), batch_size=batch_rows, columns=list(columns) if columns else None):
            for row in batch.to_pylist():
                if limit is not None and n >= limit:
                    return
                n += 1
                yield row
