"""An output folder's life: one build at a time, and a dataset replaced whole.

- `OutputLock`: a build (or `render`) holds an exclusive lock on `internal/build.lock` for as
  long as it writes; a second one stops at once with a line that names the holder. The lock
  is the operating system's (`flock`), so it dies with its process: a killed build never
  leaves a lock that blocks the next one (the file's text only names who held it last).
  (`curation.folder_lock`, which `finetune`, `export` and `convert` hold on their folders.)
- `publish`: a build writes its dataset into `.dataset.new/` and, once it is complete, swaps
  it for `dataset/` with two renames; `dataset/` is never a mix of old and new shards, and
  for the instant between the renames there is none. `recover` finishes or undoes a swap a
  crash interrupted, and clears a half-written staging folder, before the next build starts.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from curation.folder_lock import FolderLock
from curation.store.layout import Layout


class OutputLock(FolderLock):
    """`with OutputLock(layout, "build"):` — the exclusive right to write `layout.out`, held on
    `internal/build.lock`."""

    def __init__(self, layout: Layout, command: str):
        super().__init__(layout.out, command, "--out", lock_file=layout.lock)


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
