"""Reading and writing a model folder (a base model, `finetune --out`, a checkpoint) with an
error that names it.

A folder copied in part (a transfer cut short, a disk that filled) fails inside transformers,
safetensors or torch, each with its own traceback (`SafetensorError: incomplete metadata`,
`PytorchStreamReader failed reading zip archive`). The command stops with one line naming the
folder and what to do instead (`loading`). A write the file system refuses (a full disk, a
quota, a read-only folder) fails there too, in errors that do not say so: one line naming the
folder and the reason, as for every other command (`saving`).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from curation.atomic import STORAGE_ERRNOS, errno_of, storage_error, write_refused
from curation.errors import CurationError, brief


@contextmanager
def loading(folder: str | Path, advice: str) -> Iterator[None]:
    """Turn a failure to read the files of `folder` into a `CurationError` ending in `advice`.
    Running out of memory while loading is not the folder's fault, and keeps its own error."""
    import torch
    from safetensors import SafetensorError

    try:
        yield
    except torch.OutOfMemoryError:
        raise
    except (OSError, ValueError, EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError) as e:
        raise CurationError(f"{folder}: does not load ({type(e).__name__}: {brief(e)}): {advice}") from None


@contextmanager
def saving(folder: str | Path) -> Iterator[None]:
    """Turn a write the file system refuses inside transformers, safetensors or torch into the
    `CurationError` every writer gives for it (`atomic.storage_error`), naming `folder`. safetensors gives the OS error's number in
    its message (`(os error 28)`); torch's zip writer gives none (`unexpected pos 704 vs 598`),
    so a small write of our own asks the folder whether it takes writes. Any other failure keeps
    its own error."""
    try:
        yield
    except Exception as e:
        code = errno_of(e)
        if code not in STORAGE_ERRNOS:
            code = _refused_here(Path(folder))
        if code is None:
            raise
        raise storage_error(Path(folder), OSError(code, os.strerror(code))) from None


def _refused_here(folder: Path, size: int = 1 << 20) -> int | None:
    """The errno with which `folder` (or the nearest folder above it that exists) refuses a
    write of `size` bytes, or None when it takes it."""
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    refused = write_refused(folder, size)
    return refused.errno if refused is not None and refused.errno in STORAGE_ERRNOS else None
