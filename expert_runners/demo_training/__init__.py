"""Train the demo bundles: small MONAI models that know the synthetic phantoms of `curation.demo`.

    python -m expert_runners.demo_training OUT [--seed 1] [--cases 24] [--only ct_organs,brats_demo,cxr_demo]

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
`python -m expert_runners.demo_training expert_runners/demo_bundles` (the defaults).

Deterministic for a seed: torch is seeded, deterministic kernels are asked for, and every sampling
step uses its own seeded numpy generator; bit-identical weights also need the same torch build and
thread count.
"""

from expert_runners.demo_training.common import DEFAULT_SEED, EVALUATION_SEED

BUNDLES = ("ct_organs", "brats_demo", "cxr_demo")
DEFAULT_CASES = 24

__all__ = ["BUNDLES", "DEFAULT_CASES", "DEFAULT_SEED", "EVALUATION_SEED"]
