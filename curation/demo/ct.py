"""An abdominal CT phantom in Hounsfield units with a VISTA3D-labelled ground truth.

Why a phantom and not real scans: tests and the demo build need a CT whose every voxel's truth
is known (which organ, how many tumours), that runs in seconds, and that carries no real
patient. The intensities follow real CT closely enough that thresholds, windowing and
organ-level heuristics behave as on patients: air −1000, fat −100, soft tissue ~40, liver ~60,
contrast-enhanced kidney cortex ~160, aorta ~200, bone +250/+700, lung bases ~−850.

Geometry is DICOM's patient frame (LPS: +x to the patient's left, +y posterior, +z superior).
Arrays are indexed (i, j, k) = (column, row, slice) of the axial DICOM images, so voxel (i, j, k)
sits at LPS `origin + (i·ps, j·ps, k·dz)`. The RAS affine NIfTI uses is
`diag(−1, −1, 1, 1) @ lps_affine`; the patient's right is therefore at small i, negative LPS x
and *positive* RAS x (RAS means +x points to the patient's Right).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import distance_transform_edt

from curation.imaging import flip_axis
from curation.demo.identity import has_lesion, part_rng
from curation.demo.shapes import Coords, grid_mm, label, paint, soft, soft_ellipsoid

# VISTA3D label ids (reference/vista3d/metadata.json) of every structure the phantom draws.
CT_LABELS: dict[str, int] = {
    "liver": 1,
    "spleen": 3,
    "right kidney": 5,
    "aorta": 6,
    "left kidney": 14,
    "hepatic tumor": 26,
    "left lung lower lobe": 29,
    "right lung lower lobe": 32,
    "vertebrae L3": 35,
    "vertebrae L2": 36,
    "vertebrae L1": 37,
    "vertebrae T12": 38,
    "vertebrae T11": 39,
}
# Vertebral slabs from the top (superior) of the volume down.
VERTEBRAE = ("vertebrae T11", "vertebrae T12", "vertebrae L1", "vertebrae L2", "vertebrae L3")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MATRIX = 128
SLICE_SPACING = 5.0
SCANNER_MATRIX, SCANNER_SLICES = 512, 500


@dataclass(frozen=True, slots=True)
class CtPhantom:
    """One patient's phantom: voxels, labels and where they are.

    `hu` is int16 HU clipped to the 12-bit range the DICOM files store ([−1024, 3071]), so a
    correct reader reproduces it exactly. `origin` is the LPS position of voxel (0, 0, 0).
    """

    hu: np.ndarray
    labels: np.ndarray
    pixel_spacing: float
    slice_spacing: float
    origin: tuple[float, float, float]
    tumours: list[dict[str, object]] = field(default_factory=list)

    @property
    def lps_affine(self) -> np.ndarray:
        a = np.diag([self.pixel_spacing, self.pixel_spacing, self.slice_spacing, 1.0])
        a[:3, 3] = self.origin
        return a

    @property
    def affine(self) -> np.ndarray:
        """RAS affine of the (column, row, slice) arrays, as written to the label NIfTI."""
        return LPS_TO_RAS @ self.lps_affine

    def converted(self, array: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`array` (hu or labels) and its affine in the layout a DICOM→NIfTI converter gives
        (dcm2niix's, and ours): rows stored bottom-up."""
        return flip_axis(array, self.affine, axis=1)

    @property
    def voxel_ml(self) -> float:
        return self.pixel_spacing**2 * self.slice_spacing / 1000.0

    def at_scanner_size(self, matrix: int = SCANNER_MATRIX, slices: int = SCANNER_SLICES) -> CtPhantom:
        """The same patient on a scanner's grid (512 × 512, 500 slices over the same extent):
        for benchmarks that need real-sized series. Nearest-neighbour, so labels stay labels
        and HU stay the phantom's values; the ground truth is the resampled label map."""
        nx, ny, nz = self.hu.shape
        ix = np.arange(matrix) * nx // matrix
        iz = np.rint(np.linspace(0, nz - 1, slices)).astype(np.int64)
        pick = np.ix_(ix, ix * ny // nx, iz)
        ps = round(self.pixel_spacing * nx / matrix, 6)
        dz = round(self.slice_spacing * (nz - 1) / (slices - 1), 6)
        tumours = [{**t, "voxels": None} for t in self.tumours]  # counts are the small grid's; see the label map
        return CtPhantom(self.hu[pick], self.labels[pick], ps, dz, self.origin, tumours)


def ct_phantom(seed: int, case: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(hu int16 (x, y, z), labels uint8 (x, y, z), RAS affine 4×4)` of CT patient `case`, in
    the layout `m3-curate convert` (and dcm2niix) gives its DICOM series.

    >>> hu, labels, affine = ct_phantom(0, 0)
    >>> hu.dtype.name, labels.dtype.name, hu.shape[:2], hu.shape == labels.shape
    ('int16', 'uint8', (128, 128), True)
    >>> int(hu[0, 0, 0]) < -900 and 1 in labels   # air in the corner, a liver somewhere
    True
    """
    p = build_ct(seed, case)
    hu, affine = p.converted(p.hu)
    labels, _ = p.converted(p.labels)
    return np.ascontiguousarray(hu), np.ascontiguousarray(labels), affine


def build_ct(seed: int, case: int) -> CtPhantom:
    """The phantom with its geometry and tumour list (what the DICOM writer needs). Every
    random draw happens in a fixed order (geometry, body, lungs, liver, spleen, kidneys, spine
    and aorta, tumours, noise), so a seed gives the same bytes."""
    rng = part_rng(seed, "ct", case)
    ps = round(float(rng.uniform(2.8, 3.2)), 3)
    nz = int(rng.integers(40, 49))
    shape = (MATRIX, MATRIX, nz)
    half = (MATRIX - 1) / 2 * ps
    origin = (
        round(-half + float(rng.uniform(-6, 6)), 3),
        round(-half + float(rng.uniform(-10, 10)), 3),
        round(float(rng.uniform(-450, -250)), 3),
    )
    x, y, z = grid_mm(shape, (ps, ps, SLICE_SPACING), origin)
    z = z - origin[2]  # height above the lowest slice, mm
    height = (nz - 1) * SLICE_SPACING
    body_centre = (float(rng.uniform(-5, 5)), float(rng.uniform(-8, 8)))
    x, y = x - body_centre[0], y - body_centre[1]

    hu = np.full(shape, -1000.0, dtype=np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    img = {"hu": hu}
    j = _jitter(rng)
    inner, (A, B) = _draw_body(img, (x, y), j)
    liver_hu = _draw_organs(rng, img, labels, (x, y, z), j, inner, (A, B), height)

    # Spine: vertebral bodies (cortical shell, cancellous core) with a spinous process,
    # cut into five slabs by intervertebral discs; the aorta lies left-anterior of it.
    spine_y, ry_body = 0.55 * B, j(18.0, 0.08)
    rx_body = j(22.0, 0.08)
    aorta_r = j(11.5, 0.1)
    aorta = soft_ellipsoid((x, y), (j(16.0, 0.2), spine_y - ry_body - aorta_r - 3.0), (aorta_r, aorta_r), edge=1.0)
    paint(img, aorta, {"hu": j(200, 0.1)})
    label(labels, np.broadcast_to(aorta, shape), CT_LABELS["aorta"])
    _draw_spine(img, labels, (x, y, z), spine_y, (rx_body, ry_body), height, shape)

    tumours: list[dict[str, object]] = []
    if has_lesion(seed, "ct", case):
        tumours = _draw_tumours(rng, img, labels, (x, y, z), liver_hu, ps, count=int(rng.integers(1, 4)))

    hu += rng.normal(0.0, float(rng.uniform(10, 15)), size=shape).astype(np.float32)
    hu_int = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return CtPhantom(hu_int, labels, ps, SLICE_SPACING, origin, tumours)


def _draw_body(img: dict[str, np.ndarray], xy: tuple[np.ndarray, np.ndarray], j: Callable[[float, float], float]
               ) -> tuple[np.ndarray, tuple[float, float]]:
    """A fat shell around soft tissue, as elliptic cylinders (no z term): the inner cylinder's
    weights and its semi-axes (A, B), which place the organs."""
    a, b = j(160.0, 0.06), j(118.0, 0.06)
    fat = j(18.0, 0.25)
    A, B = a - fat, b - fat  # inner (muscle/organ) semi-axes
    paint(img, soft_ellipsoid(xy, (0, 0), (a, b), edge=1.5), {"hu": j(-100, 0.08)})
    inner = soft_ellipsoid(xy, (0, 0), (A, B), edge=1.5)
    paint(img, inner, {"hu": j(40, 0.1)})
    return inner, (A, B)


def _draw_organs(rng: np.random.Generator, img: dict[str, np.ndarray], labels: np.ndarray,
                 xyz: tuple[np.ndarray, np.ndarray, np.ndarray], j: Callable[[float, float], float], inner: np.ndarray,
                 axes: tuple[float, float], height: float) -> float:
    """Lung bases, liver, spleen and kidneys, painted and labelled; returns the liver's HU (its
    tumours are drawn against it)."""
    x, y, z = xyz
    A, B = axes
    inside = inner > 0.5
    # Lung bases: ellipsoids centred above the volume, so only their domes reach in.
    for side, name in ((-1, "right lung lower lobe"), (1, "left lung lower lobe")):
        m = soft_ellipsoid(xyz, (side * 0.45 * A, 0.10 * B, 1.10 * height),
                           (0.42 * A, 0.70 * B, j(0.36, 0.05) * height), edge=1.5)
        m *= inner
        paint(img, m, {"hu": j(-850, 0.03)})
        label(labels, m, CT_LABELS[name], within=inside)

    # Liver on the patient's right (negative LPS x), spleen on the left, posterior.
    liver = soft_ellipsoid(xyz, (-j(0.42, 0.05) * A, -0.05 * B, j(0.62, 0.04) * height),
                           (j(0.48, 0.05) * A, j(0.72, 0.05) * B, 0.36 * height),
                           edge=1.5, angle=float(rng.uniform(-0.15, 0.15)))
    liver_hu = j(60, 0.08)
    paint(img, liver, {"hu": liver_hu})
    label(labels, liver, CT_LABELS["liver"])
    spleen = soft_ellipsoid(xyz, (j(0.60, 0.05) * A, 0.28 * B, j(0.68, 0.04) * height),
                            (0.18 * A, 0.32 * B, 0.20 * height), edge=1.5, angle=float(rng.uniform(-0.5, -0.2)))
    paint(img, spleen, {"hu": j(50, 0.08)})
    label(labels, spleen, CT_LABELS["spleen"])

    # Kidneys: enhancing cortex around a low-density medulla/pelvis; the right one lies lower.
    for side, name, zc in ((-1, "right kidney", 0.33), (1, "left kidney", 0.42)):
        centre = (side * j(0.45, 0.05) * A, 0.45 * B, j(zc, 0.05) * height)
        radii = (0.17 * A, 0.20 * B, 0.22 * height)
        tilt = side * float(rng.uniform(0.2, 0.5))
        kidney = soft_ellipsoid(xyz, centre, radii, edge=1.2, angle=tilt)
        paint(img, kidney, {"hu": j(160, 0.1)})
        paint(img, soft_ellipsoid(xyz, centre, [r * 0.55 for r in radii], edge=1.2, angle=tilt), {"hu": j(30, 0.2)})
        label(labels, kidney, CT_LABELS[name])
    return liver_hu


def _jitter(rng: np.random.Generator) -> Callable[[float, float], float]:
    """`j(value, fraction)`: `value` times a uniform factor in [1 − fraction, 1 + fraction]."""

    def j(value: float, fraction: float) -> float:
        return float(value * rng.uniform(1 - fraction, 1 + fraction))

    return j


def _draw_spine(img: dict[str, np.ndarray], labels: np.ndarray, coords: Coords, spine_y: float,
                radii: tuple[float, float], height: float, shape: tuple[int, int, int]) -> None:
    x, y, z = coords
    body = soft_ellipsoid((x, y), (0.0, spine_y), radii, edge=0.8)
    core = soft_ellipsoid((x, y), (0.0, spine_y), (radii[0] - 3.5, radii[1] - 3.5), edge=0.8)
    process = soft_ellipsoid((x, y), (0.0, spine_y + radii[1] + 16.0), (6.0, 14.0), edge=0.8)
    bone = np.maximum(body, process)
    # Discs: 6 mm gaps at the four slab boundaries (soft tissue, no vertebra label).
    slab = height / len(VERTEBRAE)
    level = np.clip(((height - z) // slab).astype(np.int64), 0, len(VERTEBRAE) - 1)  # 0 = top slab
    gap = np.zeros_like(z, dtype=np.float32)
    for n in range(1, len(VERTEBRAE)):
        gap = np.maximum(gap, soft(np.abs(z - (height - n * slab)) - 3.0, 0.8))
    vertebra = bone * (1 - gap)
    paint(img, bone * gap, {"hu": 90.0})
    paint(img, vertebra, {"hu": 700.0})
    paint(img, core * (1 - gap), {"hu": 250.0})
    hard = np.broadcast_to(vertebra > 0.5, shape)
    ids = np.array([CT_LABELS[v] for v in VERTEBRAE], dtype=np.uint8)
    labels[hard] = np.broadcast_to(ids[level], shape)[hard]


def _draw_tumours(rng: np.random.Generator, img: dict[str, np.ndarray], labels: np.ndarray, coords: Coords,
                  liver_hu: float, ps: float, count: int) -> list[dict[str, object]]:
    """Hypodense (liver − ~40 HU) spheroids wholly inside the liver label and apart from each
    other, so that the ground-truth tumour count equals the number of connected components of
    label 26. Centres are drawn among liver voxels deep enough (by distance transform) to hold
    the tumour with a 4 mm margin."""
    x, y, z = coords
    depth = distance_transform_edt(labels == CT_LABELS["liver"], sampling=(ps, ps, SLICE_SPACING))
    tumours: list[dict[str, object]] = []
    centres: list[tuple[np.ndarray, float]] = []
    for _ in range(100):
        if len(tumours) == count:
            break
        radius = float(rng.uniform(7.0, 14.0))
        radii = [radius * float(rng.uniform(0.85, 1.15)) for _ in range(2)] + [radius * float(rng.uniform(0.9, 1.3))]
        reach = max(radii)
        candidates = np.argwhere(depth > reach + 4.0)
        if len(candidates) == 0:
            continue
        i, j, k = candidates[rng.integers(len(candidates))]
        centre = np.array([x[i, 0, 0], y[0, j, 0], z[0, 0, k]], dtype=np.float64)
        if any(np.linalg.norm(centre - c) < reach + r + 6.0 for c, r in centres):
            continue
        centres.append((centre, reach))
        m = soft_ellipsoid((x, y, z), centre, radii, edge=1.2)
        paint(img, m, {"hu": liver_hu - float(rng.uniform(35, 45))})
        label(labels, m, CT_LABELS["hepatic tumor"])
        tumours.append({"radii_mm": [round(r, 2) for r in radii], "voxels": int((m > 0.5).sum())})
    return tumours
