"""Reading a model folder (a base model, `finetune --out`, a checkpoint) with an error that
names it.

A folder copied in part (a transfer cut short, a disk that filled) fails inside transformers,
safetensors or torch, each with its own traceback (`SafetensorError: incomplete metadata`,
`PytorchStreamReader failed reading zip archive`). The command stops with one line naming the
folder and what to do instead.
"""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
