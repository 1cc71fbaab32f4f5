"""Measurements of a label map: the numeric core behind every segmentation expert's Findings.

Pure numpy/scipy on one array and its affine, so that the same label map always gives the same
volumes, boxes, key slices, sides and component counts, whichever expert produced it.
"""

from __future__ import annotations

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
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    centre_x = float((affine @ np.array([(labels.shape[0] - 1) / 2, (labels.shape[1] - 1) / 2, (labels.shape[2] - 1) / 2, 1.0]))[0])
    present = [int(v) for v in np.unique(labels) if v != 0]
    boxes = ndimage.find_objects(labels.astype(np.int32))
    out = []
    for label in present:
        box = boxes[label - 1]
        mask = labels[box] == label
        offset = np.array([s.start for s in box])
        voxels = int(mask.sum())
        voxels_ijk = np.argwhere(mask) + offset
        ras = voxels_ijk @ affine[:3, :3].T + affine[:3, 3]
        centroid = ras.mean(axis=0)
        comp, n = ndimage.label(mask)
        sizes = np.bincount(comp.ravel())[1:] if n else np.array([], dtype=int)
        out.append(
            Structure(
                label=label,
                name=names.get(label, f"label {label}"),
                voxels=voxels,
                volume_ml=round(voxels * voxel_ml, 2),
                bbox=[int(s.start) for s in box] + [int(s.stop) for s in box],
                key_slice=int(offset[2] + np.argmax(mask.sum(axis=(0, 1)))),
                centroid_ras=[round(float(c), 1) for c in centroid],
                side=_side(ras[:, 0], centre_x, midline_mm),
                components=int(n),
                component_volumes_ml=[round(float(s) * voxel_ml, 2) for s in sorted(sizes, reverse=True)],
            )
        )
    return out


def drop_small_parts(labels: np.ndarray, affine: np.ndarray, min_ml: float) -> np.ndarray:
    """The label map without the connected parts (per label) smaller than `min_ml`: a speck is
    not a finding, so it is neither measured, counted nor drawn. A copy; `min_ml` 0 keeps all.

    >>> m = np.zeros((6, 6, 1), np.uint8); m[0:3, 0:3] = 1; m[5, 5] = 1; m[4, 0] = 2
    >>> kept = drop_small_parts(m, np.eye(4) * [1000, 1, 1, 1], 2.0)   # 1 mL voxels
    >>> int((kept == 1).sum()), int((kept == 2).sum())
    (9, 0)
    """
    if min_ml <= 0:
        return labels
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    min_voxels = min_ml / voxel_ml if voxel_ml > 0 else 0.0
    out = np.array(labels, copy=True)
    boxes = ndimage.find_objects(out.astype(np.int32))
    for label, box in enumerate(boxes, start=1):
        if box is None:
            continue
        mask = out[box] == label
        comp, n = ndimage.label(mask)
        sizes = np.bincount(comp.ravel())
        small = np.flatnonzero(sizes < min_voxels)
        small = small[small > 0]
        if small.size:
            view = out[box]
            view[np.isin(comp, small)] = 0
    return out
