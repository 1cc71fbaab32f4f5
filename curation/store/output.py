"""An output folder's life: one build at a time, and a dataset replaced whole.

- `OutputLock`: a build (or `render`) holds an exclusive lock on `internal/build.lock` for as
  long as it writes; a second one stops at once with a line that names the holder. The lock
  is the operating system's (`flock`), so it dies with its process: a killed build never
  leaves a lock that blocks the next one (the file's text only names who held it last).
  `finetune`, `export` and `convert` hold one on their output folder the same way
  (`OutputLock.of_folder`): two runs writing checkpoints, or two exports swapping, into one
  folder would leave it a mix of both.
- `publish`: a build writes its dataset into `.dataset.new/` and, once it is complete, swaps
  it for `dataset/` with two renames; `dataset/` is never a mix of old and new shards, and
  for the instant between the renames there is none. `recover` finishes or undoes a swap a
  crash interrupted, and clears a half-written staging folder, before the next build starts.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Any

from curation.errors import CurationError
from curation.store.layout import Layout


FOLDER_LOCK = ".m3-curate.lock"


class OutputLock:
    """`with OutputLock(layout, "build"):` — the exclusive right to write `layout.out`."""

    def __init__(self, layout: Layout, command: str, flag: str = "--out"):
        self.path, self.folder, self.command, self.flag = layout.lock, layout.out, command, flag
        self._file: IO[str] | None = None

    @classmethod
    def of_folder(cls, folder: str | os.PathLike[str], command: str, flag: str) -> OutputLock:
        """The lock of a folder a command writes other than a build's (`FOLDER/.m3-curate.lock`)."""
        lock = cls(Layout(Path(folder)), command, flag)
        lock.path = lock.folder / FOLDER_LOCK
        return lock

    def __enter__(self) -> OutputLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise CurationError(f"{self.folder} is being written by {holder}; wait for it to finish, "
                                f"or give this one another {self.flag}") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"command": self.command, "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def _describe(text: str) -> str:
    try:
        d = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(d["since"])))
        return f"another `m3-curate {d['command']}` (pid {d['pid']} on {d['host']}, since {since})"
    except (ValueError, KeyError, TypeError):
        return "another build"


def recover(layout: Layout) -> None:
    """Before a build writes: finish a swap that a crash interrupted (the staged dataset is
    complete: it has its card), or put the old dataset back; then clear the staging folder.
    Call with the lock held."""
    staged, retired = layout.staged(), layout.retired
    if retired.exists() and not layout.dataset.exists():
        if staged.card.is_file():
            os.replace(staged.dataset, layout.dataset)
        else:
            os.replace(retired, layout.dataset)
    for leftover in (staged.dataset, retired, layout.spill, layout.plan_inputs):
        shutil.rmtree(leftover, ignore_errors=True)


def publish(layout: Layout) -> None:
    """Swap the staged dataset (complete, card written last) in for `layout.dataset`."""
    staged = layout.staged()
    shutil.rmtree(layout.retired, ignore_errors=True)
    if layout.dataset.exists():
        os.replace(layout.dataset, layout.retired)
    os.replace(staged.dataset, layout.dataset)
    shutil.rmtree(layout.retired, ignore_errors=True)


def complete_card(layout: Layout) -> dict[str, Any] | None:
    """The card of the finished build in `layout.dataset`, or None."""
    try:
        return dict(json.loads(layout.card.read_text()))
    except (FileNotFoundError, ValueError):
        return None
