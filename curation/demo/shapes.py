"""Soft-edged primitive shapes for the phantoms, in physical millimetres.

Every phantom (CT, brain MRI, chest X-ray) is built by painting smooth ellipsoids onto a grid.
A hard 0/1 mask would give staircase edges that no scanner produces and that make thresholds
and segmenters behave unlike on real data; a logistic edge a millimetre or two wide looks like
partial-volume blur. The label map is the same mask cut at 0.5, so labels and intensities agree
voxel for voxel.

Everything here is pure numpy and works for 2D and 3D grids alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.special import expit

Coords = tuple[np.ndarray, ...]
Vector = Sequence[float] | np.ndarray


def grid_mm(shape: Sequence[int], spacing: Vector, origin: Vector) -> Coords:
    """Open (broadcastable) coordinate arrays in mm, one per axis: `origin + index * spacing`.

    Open grids keep memory at one full-size array per operation instead of one per axis.

    >>> x, y = grid_mm((3, 2), (2.0, 1.0), (10.0, 0.0))
    >>> x.ravel().tolist(), y.ravel().tolist(), (x + y).shape
    ([10.0, 12.0, 14.0], [0.0, 1.0], (3, 2))
    """
    axes = []
    for n, (size, step, start) in enumerate(zip(shape, spacing, origin)):
        view = [1] * len(shape)
        view[n] = size
        axes.append((start + step * np.arange(size, dtype=np.float32)).reshape(view))
    return tuple(axes)


def ellipsoid_distance(coords: Coords, centre: Vector, radii: Vector, angle: float = 0.0) -> np.ndarray:
    """Approximate signed distance (mm, negative inside) to an axis-aligned ellipsoid, optionally
    rotated by `angle` radians in the plane of the first two axes.

    The exact distance to an ellipsoid has no closed form; scaling the normalised radius by the
    smallest semi-axis is exact for spheres and close enough at the boundary, which is all the
    soft edge needs.
    """
    rel = [c - float(m) for c, m in zip(coords, centre)]
    if angle and len(rel) >= 2:
        cos, sin = np.cos(angle), np.sin(angle)
        rel[0], rel[1] = cos * rel[0] + sin * rel[1], -sin * rel[0] + cos * rel[1]
    r2 = sum((r / float(a)) ** 2 for r, a in zip(rel, radii))
    return (np.sqrt(r2) - 1.0) * float(min(radii))


def soft(distance: np.ndarray, edge: float = 1.0) -> np.ndarray:
    """Signed distance → occupancy in [0, 1] with a logistic edge `edge` mm wide (float32)."""
    return expit(-distance / edge).astype(np.float32)


def soft_ellipsoid(
    coords: Coords, centre: Vector, radii: Vector, *, edge: float = 1.0, angle: float = 0.0
) -> np.ndarray:
    """Occupancy of a soft-edged ellipsoid (ellipse on a 2D grid) on the grid `coords`.

    >>> x, y = grid_mm((5, 5), (1.0, 1.0), (-2.0, -2.0))
    >>> m = soft_ellipsoid((x, y), (0, 0), (1.5, 1.5), edge=0.1)
    >>> int((m > 0.5).sum())
    9
    """
    return soft(ellipsoid_distance(coords, centre, radii, angle), edge)


def paint(images: Mapping[str, np.ndarray], mask: np.ndarray, values: Mapping[str, float]) -> None:
    """Blend `values[name]` into each image in place where `mask` (occupancy 0..1) is set.

    Painting in anatomical order (body, then organs, then lesions) gives each voxel the value
    of the last structure that covers it, with partial-volume mixing at the edges.
    """
    for name, value in values.items():
        image = images[name]
        image += mask * (np.float32(value) - image)


def label(labels: np.ndarray, mask: np.ndarray, value: int, *, within: np.ndarray | None = None) -> None:
    """Set `labels` to `value` where the soft `mask` is above one half (and `within`, if given)."""
    hard = mask > 0.5
    if within is not None:
        hard &= within
    labels[hard] = value
