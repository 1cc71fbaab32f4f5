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

Every command finds these paths here, so the build, `render`, `preview`, `export`, `finetune`
and `eval` agree on them (`output.cache`, when the manifest sets it, wins over `--out`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curation.errors import CurationError

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

    @classmethod
    def of(cls, spec: Any, out: str | Path | None = None) -> Layout:
        """The layout a manifest's build uses: `--out` when given, else `output.dir`."""
        folder = Path(out).resolve() if out else Path(spec.output.dir)
        return cls(out=folder, cache_dir=Path(spec.output.cache) if spec.output.cache else None)

    @property
    def dataset(self) -> Path:
        return self.out / "dataset"

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

    def mark_internal(self) -> None:
        """Write the note that tells a reader of `internal/` not to share it."""
        self.internal.mkdir(parents=True, exist_ok=True)
        note = self.internal / "README.md"
        if not note.is_file() or note.read_text() != INTERNAL_NOTE:
            note.write_text(INTERNAL_NOTE)


def write_atomic(path: Path, text: str) -> None:
    """Write beside the final name, then rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


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


def shard_files(path: str | Path, split: str | None = None) -> list[Path]:
    """Shard files in name order (all splits, or one): an error naming the folder when there are none."""
    root = shards_root(path)
    if split is None:
        return sorted(root.glob(f"*/{SHARD_GLOB}"))
    files = sorted((root / split).glob(SHARD_GLOB))
    if not files:
        have = sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob(SHARD_GLOB)))
        raise CurationError(f"{root / split}: no shards for split {split!r} (splits with shards here: {', '.join(have) or 'none'})")
    return files
