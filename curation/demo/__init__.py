"""A deterministic synthetic imaging archive with ground truth, for demos and tests.

`write_demo_archive(out, cases=4, seed=0)` writes CT DICOM studies (with localizers, screen
saves and one truncated file), four-sequence brain MRI NIfTI cases and chest X-ray PNGs with a
labels table, plus `ground_truth.json`. The phantoms are also available in memory
(`ct_phantom`, `brain_phantom`, `cxr_phantom`) so tests can compare a reader's output with the
exact arrays that were written.
"""

from curation.demo.archive import write_demo_archive
from curation.demo.brain import BRATS_LABELS, SEQUENCES, brain_phantom, case_id
from curation.demo.ct import CT_LABELS, build_ct, ct_phantom
from curation.demo.cxr import CXR_LABELS, FINDINGS, cardiothoracic_ratio, cxr_phantom

__all__ = [
    "BRATS_LABELS",
    "CT_LABELS",
    "CXR_LABELS",
    "FINDINGS",
    "SEQUENCES",
    "brain_phantom",
    "build_ct",
    "cardiothoracic_ratio",
    "case_id",
    "ct_phantom",
    "cxr_phantom",
    "write_demo_archive",
]
