"""Keep `m3-curate index` and `convert` light: pyarrow without pandas.

pyarrow imports pandas (~0.3 s, more than the rest of converting a small series) the first time
it builds any array, only to ask whether the data is a pandas object; these commands never hand
it one. `arrow_without_pandas()` makes `import pandas` fail in this process (and the workers it
forks), so pyarrow takes pandas as absent. It is called by those two commands before their
first Arrow call, and does nothing where pandas is already imported.
"""

from __future__ import annotations

import importlib.abc
import sys
from typing import Any


class _NoPandas(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name == "pandas" or name.startswith("pandas."):
            raise ModuleNotFoundError(f"{name} is kept out of this command (curation.ingest.lean)", name=name)
        return None


def arrow_without_pandas() -> None:
    if "pandas" not in sys.modules and not any(isinstance(f, _NoPandas) for f in sys.meta_path):
        sys.meta_path.insert(0, _NoPandas())
