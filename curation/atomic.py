"""Write-then-rename: a reader sees a whole file under its final name, or none.

Every output of the project is written through here (shards, cache entries, the dataset card,
the index and ledger), so one rule holds everywhere:

- the data goes to a temporary file named `.<name>.<pid>-<random>.tmp`, beside the final
  name or in a `tmp_dir` on the same file system, and is renamed onto the final name only when
  it is complete (`os.replace` is atomic on POSIX file systems);
- a failure removes the temporary file, and a write that fails for lack of room (disk full,
  quota, a file-size limit) or permission is a `CurationError` naming the path: one line, not
  a traceback from deep inside pyarrow;
- temporary files orphaned by a killed process are recognisable by name and removed by
  `sweep` on the next run.

>>> import tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> write_text(folder / "a.txt", "whole")
>>> (folder / "a.txt").read_text(), [p.name for p in folder.iterdir()]
('whole', ['a.txt'])
"""

from __future__ import annotations

import errno
import json
import os
import re
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from curation.errors import CurationError

TMP_SUFFIX = ".tmp"
# errno values that mean "this storage cannot take the write" (no room, a size limit, no
# permission, a path that cannot be a file, a failing device): the user can act on them, so
# they are one line naming the path, not a traceback (here and in `curation.cli`)
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM,
                  errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG, errno.EIO}


def errno_of(error: BaseException) -> int | None:
    """The OS error number behind `error`, also where a library wrapped it in a message of its
    own and kept no `errno`: pydicom's `OSError("With tag (7FE0,0010) got exception: [Errno 27]
    File too large")`, safetensors' `SafetensorError("… (os error 28)")`."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno
    found = re.search(r"\[Errno (\d+)\]|\(os error (\d+)\)", str(error))
    return int(found.group(1) or found.group(2)) if found else None


def tmp_name(path: Path) -> str:
    """The temporary name for `path`: hidden, unique per writer, recognisable by `sweep`."""
    return f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"


def write_refused(folder: str | Path, size: int = 0) -> OSError | None:
    """Why no file (of `size` bytes) can be written in the existing `folder`, or None: tried
    for real (a temporary file, removed), since permission bits say nothing to root and nothing
    about read-only or full file systems (where an empty file may still be made: `size`). The
    preflight, a cluster's nodes (`curation.build.shared`) and a failed model save
    (`curation.finetune.model_folder`) ask it."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".m3-curate-probe-") as f:
            if size:
                f.write(bytes(size))
                f.flush()
                os.fsync(f.fileno())
    except OSError as e:
        return e
    return None


def storage_error(path: Path, error: OSError) -> CurationError:
    """One line that names the path and what to do."""
    what = os.strerror(error.errno) if error.errno else str(error)
    hint = {errno.ENOSPC: "free space there or point the output elsewhere",
            errno.EDQUOT: "the disk quota is used up: free space or point the output elsewhere",
            errno.EFBIG: "the file exceeds the size limit of this process or file system",
            errno.EROFS: "the file system is read-only",
            errno.EACCES: "check the folder's permissions", errno.EPERM: "check the folder's permissions"}.get(error.errno or 0, "")
    return CurationError(f"cannot write {path}: {what}" + (f" ({hint})" if hint else ""))


@contextmanager
def replacing(path: Path, *, tmp_dir: Path | None = None, parents: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; when the block ends normally it replaces `path`.
    On any failure the temporary file is removed; a storage error (`STORAGE_ERRNOS`) becomes a
    `CurationError` naming `path`. `parents=False`: the folders must exist already, and a
    missing one raises FileNotFoundError (a writer that must not bring back a folder its owner
    removed)."""
    path = Path(path)
    folder = tmp_dir or path.parent
    tmp = folder / tmp_name(path)
    try:
        if parents:
            folder.mkdir(parents=True, exist_ok=True)
            path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        if e.errno in STORAGE_ERRNOS:
            raise storage_error(path, e) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def _remove(tmp: Path) -> None:
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass


def write_bytes(path: Path, data: bytes, *, tmp_dir: Path | None = None, parents: bool = True) -> None:
    with replacing(path, tmp_dir=tmp_dir, parents=parents) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str, *, tmp_dir: Path | None = None, parents: bool = True) -> None:
    write_bytes(path, text.encode("utf-8"), tmp_dir=tmp_dir, parents=parents)


def write_json(path: Path, data: Any, *, indent: int | None = None, tmp_dir: Path | None = None, parents: bool = True) -> None:
    """JSON with dict order kept (a legend is in drawing order)."""
    text = json.dumps(data, indent=indent)
    write_text(path, text + "\n" if indent is not None else text, tmp_dir=tmp_dir, parents=parents)


def write_parquet(table: Any, path: Path, **options: Any) -> None:
    """A pyarrow table as one Parquet file (`options` go to `pyarrow.parquet.write_table`)."""
    import pyarrow.parquet as pq

    with replacing(path) as tmp:
        pq.write_table(table, tmp, **options)


def is_tmp(name: str) -> bool:
    """Whether a file name is one of ours (`tmp_name`).

    >>> is_tmp(".part-00000.parquet.123-0a1b2c3d.tmp"), is_tmp("part-00000.parquet")
    (True, False)
    """
    return name.startswith(".") and name.endswith(TMP_SUFFIX)


def sweep(folder: Path, *, older_than: float = 0.0, recursive: bool = False) -> int:
    """Remove temporary files left in `folder` by killed writers; returns how many. Files
    younger than `older_than` seconds are kept (another process may be writing them)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    now, removed = time.time(), 0
    for path in folder.rglob("*") if recursive else folder.iterdir():
        try:
            if is_tmp(path.name) and path.is_file() and now - path.stat().st_mtime >= older_than:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            continue
    return removed
