"""Train the demo bundles: small MONAI models that know the synthetic phantoms of `curation.demo`.

    python -m expert_runners.demo_training OUT [--seed 1] [--cases 24] [--only ct_organs,brats_demo,cxr_demo] [--jobs 2]

writes three ordinary bundle folders under OUT (`configs/metadata.json`, `configs/inference.json`,
`models/model.pt`):

- `ct_organs` (`ct.py`): CT organs and liver tumours in VISTA3D label ids, for `runner: vista3d`;
- `brats_demo` (`brats.py`): a BRATS-like 4-sequence SegResNet with sigmoid TC/WT/ET, for `runner: brats`;
- `cxr_demo` (`cxr.py`): an 18-label chest X-ray classifier (a small MONAI DenseNet, also saved as a
  `torch.export` program, `models/model.pt2`), for `runner: cxr_ensemble`.

Training data are phantoms generated in memory with the archive's own functions (`ct_phantom`,
`brain_phantom`, `cxr_phantom`) for `--seed` (default 1), cases 0…N−1. The demo archive
(`data/demo`, and the bench's evaluation archive) is seed 0, which training refuses, so every
evaluation case is held out. The committed bundles in `expert_runners/demo_bundles/` were made with
`python -m expert_runners.demo_training expert_runners/demo_bundles` (the defaults; about 9 minutes
on 2 cores: ct_organs and brats_demo train side by side, one process and one torch thread each).

Deterministic for a seed: torch is seeded, deterministic kernels are asked for, and every sampling
step uses its own seeded numpy generator; bit-identical weights also need the same torch build and
thread count.
"""

import time
from pathlib import Path

from expert_runners.demo_training.common import DEFAULT_SEED, EVALUATION_SEED

BUNDLES = ("ct_organs", "brats_demo", "cxr_demo")
DEFAULT_CASES = 24

__all__ = ["BUNDLES", "DEFAULT_CASES", "DEFAULT_SEED", "EVALUATION_SEED", "train_bundle"]


def train_bundle(name: str, out: Path, seed: int, cases: int) -> tuple[str, Path, float]:
    """Train bundle `name` into `out / name` with one torch thread, so that the arithmetic (and
    the weights) do not depend on the machine's core count or on how many bundles train at once.
    Lives here, not in `__main__`, so that spawned worker processes can import it."""
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()
    if name == "ct_organs":
        from expert_runners.demo_training.ct import train
    elif name == "brats_demo":
        from expert_runners.demo_training.brats import train
    else:
        from expert_runners.demo_training.cxr import train
    root = train(out / name, seed=seed, cases=cases)
    return name, root, time.perf_counter() - started
