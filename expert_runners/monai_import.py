"""MONAI's package import, without the optional packages it loads for parts no runner uses.

Any `from monai.x import y` first runs MONAI's `__init__`, which imports every submodule, and
two of them import an optional package at module level when it is installed:
`monai.networks.nets.transchex` imports transformers' BERT (transformers is one of our core
packages, for the fine-tune) and `monai.data.ultrasound_confidence_map` imports scipy.signal.
Measured on the 2-CPU machine: `import monai, monai.bundle` 6.7 s and 6.1 CPU-s, of which
these two are 2.6 s; every process that reads a bundle config or sets up an expert paid it
(the build's driver, each expert host, the serial loop, preview).

While MONAI's package imports, those two packages read as not installed; MONAI then binds
its own placeholders for the parts that need them (see `LEFT_OUT`), which raise MONAI's
`OptionalImportError` when used. The packages themselves stay importable afterwards.
"""

from __future__ import annotations

import sys
from types import ModuleType

# package → the MONAI parts that read it as missing in a process whose MONAI came from here
LEFT_OUT: dict[str, str] = {
    "transformers": "monai.networks.nets.Transchex",
    "scipy.signal": "monai.data.UltrasoundConfidenceMap, monai.transforms.SignalRemoveFrequency",
}


def import_monai() -> ModuleType:
    """MONAI, imported once per process; call it before the first `from monai… import`.
    A process that already imported MONAI (or the left-out packages) keeps what it has."""
    if "monai" in sys.modules:
        return sys.modules["monai"]
    hidden = [name for name in LEFT_OUT if name not in sys.modules]
    for name in hidden:
        sys.modules[name] = None  # type: ignore[assignment]  # import system: "not installed"
    try:
        import monai
    finally:
        for name in hidden:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
    return monai
