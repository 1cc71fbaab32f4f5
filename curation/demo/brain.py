"""A multi-sequence brain MRI phantom (T1c, T1, T2, FLAIR) with a BraTS-style tumour label map.

Why: the BRATS expert takes four co-registered sequences, and its templates speak of necrotic
core, oedema and enhancing tumour. A phantom whose tissue contrasts follow the real sequences
(T1: white matter bright, CSF dark; T2: CSF bright; FLAIR: CSF suppressed, oedema bright; T1c:
the tumour rim enhances) lets tests check that channels are kept in order and that labels line
up with what an expert would see.

Arrays are (x, y, z) in RAS with a 2 mm isotropic grid centred on the origin; values are int16
arbitrary MR units (0 … ~1400). Labels follow BraTS: 1 necrotic core, 2 oedema, 4 enhancing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

from curation.demo.identity import has_lesion, part_rng
from curation.demo.shapes import ellipsoid_distance, grid_mm, label, paint, soft, soft_ellipsoid

SEQUENCES = ("t1c", "t1", "t2", "flair")
BRAIN_SHAPE = (80, 96, 72)
BRAIN_SPACING = 2.0
BRATS_LABELS = {"necrotic core": 1, "oedema": 2, "enhancing tumour": 4}

# Signal per tissue and sequence: the contrasts that make each sequence recognisable.
TISSUE = {
    "scalp": {"t1c": 850, "t1": 850, "t2": 550, "flair": 500},
    "skull": {"t1c": 60, "t1": 60, "t2": 80, "flair": 60},
    "csf": {"t1c": 190, "t1": 180, "t2": 1300, "flair": 120},
    "grey matter": {"t1c": 540, "t1": 520, "t2": 700, "flair": 620},
    "white matter": {"t1c": 790, "t1": 780, "t2": 480, "flair": 480},
    "oedema": {"t1c": 430, "t1": 420, "t2": 1050, "flair": 1000},
    "enhancing tumour": {"t1c": 1250, "t1": 480, "t2": 800, "flair": 780},
    "necrotic core": {"t1c": 270, "t1": 250, "t2": 1150, "flair": 420},
}


def case_id(case: int) -> str:
    """`BRAIN-DEMO-001` for case 0: the folder name, file prefix and patient id of a case."""
    return f"BRAIN-DEMO-{case + 1:03d}"


@dataclass(frozen=True, slots=True)
class BrainPhantom:
    """Four sequences (int16, `SEQUENCES` order), the uint8 label map and the RAS affine."""

    images: dict[str, np.ndarray]
    seg: np.ndarray
    affine: np.ndarray
    tumour: dict[str, object] = field(default_factory=dict)


def brain_affine() -> np.ndarray:
    """2 mm isotropic RAS affine with the grid centred on (0, 0, 0)."""
    a = np.diag([BRAIN_SPACING] * 3 + [1.0])
    a[:3, 3] = [-(n - 1) / 2 * BRAIN_SPACING for n in BRAIN_SHAPE]
    return a


def brain_phantom(seed: int, case: int) -> BrainPhantom:
    """The phantom of brain case `case`; about half the cases (alternating) carry a tumour.

    >>> p = brain_phantom(0, 0)
    >>> sorted(p.images) == sorted(SEQUENCES), p.seg.dtype.name, set(np.unique(p.seg)) <= {0, 1, 2, 4}
    (True, 'uint8', True)
    """
    rng = part_rng(seed, "brain", case)
    affine = brain_affine()
    coords = grid_mm(BRAIN_SHAPE, (BRAIN_SPACING,) * 3, affine[:3, 3])
    images = {s: np.zeros(BRAIN_SHAPE, dtype=np.float32) for s in SEQUENCES}
    seg = np.zeros(BRAIN_SHAPE, dtype=np.uint8)
    scale = float(rng.uniform(0.95, 1.03))
    centre = (float(rng.uniform(-2, 2)), float(rng.uniform(-6, -2)), float(rng.uniform(-8, -4)))
    head = np.array([72.0, 90.0, 74.0]) * scale

    def shell(inset: float) -> np.ndarray:
        return soft_ellipsoid(coords, centre, head - inset, edge=1.0)

    paint(images, shell(0.0), TISSUE["scalp"])
    paint(images, shell(5.0), TISSUE["skull"])
    paint(images, shell(10.0), TISSUE["csf"])
    brain = shell(12.0)
    paint(images, brain, TISSUE["grey matter"])
    paint(images, shell(float(rng.uniform(16.0, 18.0))), TISSUE["white matter"])
    for side in (-1, 1):
        vent = soft_ellipsoid(coords, (centre[0] + side * 9.0, centre[1] + 4.0, centre[2] + 14.0),
                              (5.5 * scale, 20.0 * scale, 8.0 * scale), edge=1.0, angle=side * 0.12)
        paint(images, vent, TISSUE["csf"])

    tumour: dict[str, object] = {}
    if has_lesion(seed, "brain", case):
        tumour = _draw_tumour(rng, images, seg, coords, centre, brain)

    sigma = float(rng.uniform(10.0, 16.0))
    out = {}
    for s in SEQUENCES:
        noisy = images[s] + rng.normal(0.0, sigma, size=BRAIN_SHAPE).astype(np.float32)
        out[s] = np.clip(np.rint(noisy), 0, 32767).astype(np.int16)
    return BrainPhantom(out, seg, affine, tumour)


def _draw_tumour(rng: np.random.Generator, images: dict[str, np.ndarray], seg: np.ndarray, coords: tuple[np.ndarray, ...],
                 head_centre: tuple[float, float, float], brain: np.ndarray) -> dict[str, object]:
    """Oedema (a lumpy ellipsoid kept inside the brain) around an enhancing shell around a
    necrotic core: the layering of a glioblastoma on T1c, and BraTS's label nesting."""
    side = -1.0 if rng.random() < 0.5 else 1.0  # RAS: −x is the patient's left
    c = (head_centre[0] + side * float(rng.uniform(18, 32)), head_centre[1] + float(rng.uniform(-25, 25)),
         head_centre[2] + float(rng.uniform(2, 24)))
    radius = float(rng.uniform(9.0, 14.0))
    rim = float(rng.uniform(2.5, 4.0))
    oedema_radii = [radius + float(rng.uniform(6.0, 14.0)) for _ in range(3)]
    lumps = gaussian_filter(rng.normal(size=BRAIN_SHAPE).astype(np.float32), 3.0)
    lumps *= 3.0 / max(float(lumps.std()), 1e-6)  # ±3 mm wobble of the oedema surface
    oedema = soft(ellipsoid_distance(coords, c, oedema_radii) + lumps, 1.5) * (brain > 0.5)
    enhancing = soft_ellipsoid(coords, c, (radius,) * 3, edge=0.8)
    core = soft_ellipsoid(coords, c, (radius - rim,) * 3, edge=0.8)
    paint(images, oedema, TISSUE["oedema"])
    paint(images, enhancing, TISSUE["enhancing tumour"])
    paint(images, core, TISSUE["necrotic core"])
    label(seg, oedema, BRATS_LABELS["oedema"])
    label(seg, enhancing, BRATS_LABELS["enhancing tumour"])
    label(seg, core, BRATS_LABELS["necrotic core"])
    return {"hemisphere": "right" if side > 0 else "left", "centre_ras_mm": [round(v, 2) for v in c],
            "enhancing_radius_mm": round(radius, 2)}
