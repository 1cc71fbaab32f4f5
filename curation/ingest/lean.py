"""Keep `m3-curate index` and `convert` light: libraries our dependencies import but these
commands never use are kept out of the process.

- pandas (~0.3 s, more than the rest of converting a small series): pyarrow imports it the first
  time it builds any array, only to ask whether the data is a pandas object; these commands
  never hand it one.
- requests (~0.07 s with urllib3): pydicom imports it when pydicom is imported, for the one
  function that downloads pydicom's own example files; these commands download nothing.

`keep_out_unused()` makes importing them fail in this process (and the workers it forks), so
both libraries take them as absent. It is called by those two commands before their first
Arrow or pydicom call, and leaves alone any that is already imported.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any

UNUSED = ("pandas", "requests")


class _KeepOut(importlib.abc.MetaPathFinder):
    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"{name} is kept out of this command (curation.ingest.lean)", name=name)
        return None


def keep_out_unused() -> None:
    names = frozenset(n for n in UNUSED if n not in sys.modules)
    if names and not any(isinstance(f, _KeepOut) for f in sys.meta_path):
        sys.meta_path.insert(0, _KeepOut(names))
