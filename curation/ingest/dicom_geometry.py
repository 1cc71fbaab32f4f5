"""Where DICOM slices are, in pure numpy: slice normals, ordering along the normal, spacing and
gantry-tilt checks, and the voxel-to-RAS affine.

DICOM gives positions in LPS millimetres: `ImageOrientationPatient` holds the row direction
cosine (the way the column index grows) and then the column direction cosine (the way the row
index grows); `ImagePositionPatient` is the centre of a slice's first pixel. Our arrays are in
NIfTI order (column index i, row index j, slice k), so the affine's columns are the row cosine
times the column spacing, the column cosine times the row spacing, and the step from slice to
slice; `diag(-1, -1, 1, 1)` turns LPS into RAS.

Nothing here reads files, so every rule can be tested with a few numbers.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
ORIENTATION_TOLERANCE = 1e-4  # direction cosines closer than this are one orientation
DUPLICATE_TOLERANCE_MM = 1e-3  # slices closer than this along the normal are one position
UNEVEN_RELATIVE = 0.01  # spacings differing by more than 1% of the median ...
UNEVEN_ABSOLUTE_MM = 0.02  # ... and by more than two positions rounded to 0.01 mm can make up


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of the image plane: cross(row cosine, column cosine).

    >>> slice_normal([1, 0, 0, 0, 1, 0]).tolist()
    [0.0, 0.0, 1.0]
    """
    iop = np.asarray(orientation, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    return normal / np.linalg.norm(normal)


def same_orientation(a: Sequence[float], b: Sequence[float], tol: float = ORIENTATION_TOLERANCE) -> bool:
    """Whether two ImageOrientationPatient values describe one plane orientation. A tolerance,
    not rounding, so that 0.99995 and 1.00004 do not land on two sides of a rounding edge."""
    return bool(np.max(np.abs(np.asarray(a, float) - np.asarray(b, float))) <= tol)


def order_slices(positions: np.ndarray, normal: np.ndarray, tol: float = DUPLICATE_TOLERANCE_MM) -> tuple[np.ndarray, np.ndarray]:
    """Slice order along the normal, and the duplicates to drop.

    Returns (keep, duplicates): `keep` indexes `positions` in ascending distance along the
    normal; `duplicates` are the indices that share a position (within `tol`) with an earlier
    index, which is kept. InstanceNumber plays no part: scanners and anonymisers renumber.

    >>> keep, dup = order_slices(np.array([[0, 0, 5.], [0, 0, 1.], [0, 0, 5.]]), np.array([0, 0, 1.]))
    >>> keep.tolist(), dup.tolist()
    ([1, 0], [2])
    """
    along = np.asarray(positions, float) @ normal
    order = np.argsort(along, kind="stable")
    keep: list[int] = []
    duplicates: list[int] = []
    run = [int(order[0])] if len(order) else []
    for prev, cur in zip(order[:-1], order[1:]):
        if along[cur] - along[prev] <= tol:
            run.append(int(cur))
            continue
        keep.append(min(run))
        duplicates.extend(i for i in run if i != min(run))
        run = [int(cur)]
    if run:
        keep.append(min(run))
        duplicates.extend(i for i in run if i != min(run))
    return np.array(keep, dtype=int), np.array(sorted(duplicates), dtype=int)


def slice_vector(ordered_positions: np.ndarray, normal: np.ndarray, fallback_spacing: float) -> np.ndarray:
    """The step from one slice to the next, in LPS mm: (last - first) / (n - 1).

    First-to-last rather than first-to-second: for an evenly spaced series the two are equal,
    and for an unevenly spaced one it is the step that keeps the whole stack closest to where
    its slices really are (dcm2niix does the same). A single slice steps along the normal by
    `fallback_spacing` (SpacingBetweenSlices or SliceThickness).
    """
    pos = np.asarray(ordered_positions, float)
    if len(pos) < 2:
        return normal * fallback_spacing
    return (pos[-1] - pos[0]) / (len(pos) - 1)


def gantry_tilt_deg(ordered_positions: np.ndarray, normal: np.ndarray) -> float:
    """Angle between the plane normal and the line through the first and last slice positions:
    0 for an ordinary stack, the gantry tilt for a tilted CT (whose slices are sheared, so an
    affine with an orthogonal slice axis would misplace them)."""
    pos = np.asarray(ordered_positions, float)
    if len(pos) < 2:
        return 0.0
    through = pos[-1] - pos[0]
    cos = abs(float(through @ normal)) / float(np.linalg.norm(through))
    return round(float(np.degrees(np.arccos(min(1.0, cos)))), 3)


def slice_spacings(ordered_positions: np.ndarray) -> np.ndarray:
    """Distances between neighbouring slices, in mm."""
    pos = np.asarray(ordered_positions, float)
    return np.linalg.norm(np.diff(pos, axis=0), axis=1)


def is_uneven(spacings: np.ndarray) -> bool:
    """Whether slices are unevenly spaced: a missing slice, or a series that changes spacing
    part-way. One affine cannot place such slices exactly; experts should know.

    >>> is_uneven(np.array([2.5, 2.5, 5.0])), is_uneven(np.array([2.5, 2.504, 2.5]))
    (True, False)
    """
    if len(spacings) < 2:
        return False
    spread = float(spacings.max() - spacings.min())
    # statistics, not np.median: that imports numpy.ma (about 0.015 s of `convert`'s start)
    return spread > max(UNEVEN_RELATIVE * statistics.median(spacings.tolist()), UNEVEN_ABSOLUTE_MM)


def affine_ras(orientation: Sequence[float], pixel_spacing: Sequence[float], origin: Sequence[float], step: np.ndarray) -> np.ndarray:
    """Voxel (i = column, j = row, k = slice) to RAS mm.

    `pixel_spacing` is DICOM's PixelSpacing: (spacing between rows, spacing between columns).

    >>> a = affine_ras([1, 0, 0, 0, 1, 0], [0.8, 0.7], [10, 20, 30], np.array([0, 0, 2.5]))
    >>> (a @ [1, 1, 1, 1]).round(3).tolist()
    [-10.7, -20.8, 32.5, 1.0]
    """
    iop = np.asarray(orientation, float)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * float(pixel_spacing[1])
    lps[:3, 1] = iop[3:] * float(pixel_spacing[0])
    lps[:3, 2] = step
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps


def stack_summary(ordered_positions: np.ndarray, normal: np.ndarray, fallback_spacing: float) -> dict[str, object]:
    """The facts about a stack that later stages may need (StudyItem.attrs), and its slice
    spacing: gantry tilt, uneven spacing and the range of spacings."""
    spacings = slice_spacings(ordered_positions)
    if len(spacings) == 0:
        spacings = np.array([fallback_spacing])
    return {
        "gantry_tilt_deg": gantry_tilt_deg(ordered_positions, normal),
        "uneven_spacing": is_uneven(spacings),
        "slice_spacings": [round(float(spacings.min()), 4), round(float(spacings.max()), 4)],
    }
