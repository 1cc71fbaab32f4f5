"""Measurements of a label map: the numeric core behind every segmentation expert's Findings.

Pure numpy/scipy on one array and its affine, so that the same label map always gives the same
volumes, boxes, key slices, sides and component counts, whichever expert produced it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from scipy import ndimage

from curation.findings import Structure


def _side(ras_x: np.ndarray, centre_ras_x: float, tolerance_mm: float) -> str:
    """`right`, `left`, `midline` or `both` (a paired structure such as the lungs) from the
    RAS x of a structure's voxels; RAS x grows towards the patient's right."""
    right = float(np.mean(ras_x > centre_ras_x + tolerance_mm))
    left = float(np.mean(ras_x < centre_ras_x - tolerance_mm))
    if right >= 0.2 and left >= 0.2:
        return "both"
    if right > 0.5:
        return "right"
    if left > 0.5:
        return "left"
    return "midline"


def measure_structures(labels: np.ndarray, affine: np.ndarray, names: dict[int, str], *, midline_mm: float = 10.0) -> list[Structure]:
    """Per-label measurements of a 3D label map (x, y, z) on a grid with the given RAS affine.

    Labels absent from the map are absent from the result; labels not in `names` are named
    `label <id>`. Side is judged against the centre of the volume's x extent.
    """
    return measure_label_map(labels, affine, names, midline_mm=midline_mm)[1]


def measure_label_map(labels: np.ndarray, affine: np.ndarray, names: dict[int, str], *, min_ml: float = 0.0,
                      midline_mm: float = 10.0) -> tuple[np.ndarray, list[Structure]]:
    """The label map without the connected parts (per label) smaller than `min_ml`, and the
    measurements of what is left (`measure_structures`). A speck is not a finding, so it is
    neither measured, counted nor drawn. The map is a copy where a part is dropped; `min_ml` 0
    keeps all. Each structure's parts are labelled once, for the drop and the count alike.

    >>> m = np.zeros((6, 6, 1), np.uint8); m[0:3, 0:3] = 1; m[5, 5] = 1; m[4, 0] = 2
    >>> kept, (s,) = measure_label_map(m, np.eye(4) * [1000, 1, 1, 1], {1: "liver"}, min_ml=2.0)  # 1 mL voxels
    >>> int((kept == 1).sum()), int((kept == 2).sum()), s.voxels, s.components, s.bbox
    (9, 0, 9, 1, [0, 0, 0, 3, 3, 1])
    """
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    min_voxels = min_ml / voxel_ml if min_ml > 0 and voxel_ml > 0 else 0.0
    centre_x = float((affine @ np.array([(labels.shape[0] - 1) / 2, (labels.shape[1] - 1) / 2, (labels.shape[2] - 1) / 2, 1.0]))[0])
    out, structures = labels, []
    for label, box, parts, sizes in _parts(labels):
        small = np.flatnonzero(sizes < min_voxels)
        small = small[small > 0]
        mask = parts > 0
        if small.size:
            dropped = np.isin(parts, small)
            out = np.array(labels, copy=True) if out is labels else out
            out[box][dropped] = 0
            mask &= ~dropped
            if not mask.any():
                continue
        kept_sizes = np.delete(sizes, np.concatenate([[0], small]))
        structures.append(_structure(label, names.get(label, f"label {label}"), mask, np.array([s.start for s in box]), kept_sizes,
                                     affine, voxel_ml, centre_x, midline_mm))
    return out, structures


def _parts(labels: np.ndarray) -> Iterator[tuple[int, tuple[slice, ...], np.ndarray, np.ndarray]]:
    """Each label present, in order: its bounding box, its connected parts labelled within the
    box (0 elsewhere), and each part's size in voxels (index 0: everything else)."""
    for label, box in enumerate(ndimage.find_objects(labels.astype(np.int32)), start=1):
        if box is not None:
            parts, n = ndimage.label(labels[box] == label)
            yield label, box, parts, np.bincount(parts.ravel(), minlength=n + 1)


def _structure(label: int, name: str, mask: np.ndarray, offset: np.ndarray, part_sizes: np.ndarray, affine: np.ndarray,
               voxel_ml: float, centre_x: float, midline_mm: float) -> Structure:
    """One structure's measurements from its mask within a box starting at voxel `offset`, and
    the sizes of its parts."""
    ijk = np.argwhere(mask)
    voxels_ijk = ijk + offset
    ras = voxels_ijk @ affine[:3, :3].T + affine[:3, 3]
    voxels = len(ijk)
    return Structure(
        label=label,
        name=name,
        voxels=voxels,
        volume_ml=round(voxels * voxel_ml, 2),
        bbox=[int(v) for v in voxels_ijk.min(axis=0)] + [int(v) + 1 for v in voxels_ijk.max(axis=0)],
        key_slice=int(offset[2] + np.argmax(mask.sum(axis=(0, 1)))),
        centroid_ras=[round(float(c), 1) for c in ras.mean(axis=0)],
        side=_side(ras[:, 0], centre_x, midline_mm),
        components=len(part_sizes),
        component_volumes_ml=[round(float(s) * voxel_ml, 2) for s in sorted(part_sizes, reverse=True)],
    )
