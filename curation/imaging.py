"""Pure numpy image helpers: windows, normalisation, slices, overlays, PNG.

These turn volumes into the 2D pictures a VLM sees. They are pure functions of arrays so that
they are cheap to test and identical wherever they run (driver, Ray worker, preview).

Slices are cut from (x, y, z) arrays in RAS order and shown in radiological convention: the
patient's right on the image's left, anterior at the top.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# (centre, width) in HU. Soft tissue is VILA-M3's choice for CT slices.
CT_WINDOWS: dict[str, tuple[float, float]] = {
    "soft_tissue": (50.0, 400.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
}

# Fixed colour table: overlay colours are drawn and named in this order, so text that says
# "red: liver" always matches the picture.
COLOURS: list[tuple[str, tuple[int, int, int]]] = [
    ("red", (230, 25, 25)),
    ("blue", (40, 90, 240)),
    ("yellow", (250, 220, 30)),
    ("magenta", (230, 40, 230)),
    ("green", (40, 200, 60)),
    ("cyan", (40, 220, 230)),
    ("orange", (250, 140, 20)),
    ("purple", (140, 60, 200)),
    ("pink", (250, 150, 190)),
    ("brown", (150, 90, 40)),
    ("lime", (170, 240, 50)),
    ("teal", (20, 140, 140)),
]


def window(array: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Map [centre - width/2, centre + width/2] linearly to 0…255 (uint8), clipping outside.

    >>> window(np.array([-150.0, 50.0, 250.0]), 50, 400).tolist()
    [0, 128, 255]
    """
    low = centre - width / 2
    scaled = (np.asarray(array, dtype=np.float32) - low) / width * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def ct_window(array: np.ndarray, preset: str = "soft_tissue") -> np.ndarray:
    if preset not in CT_WINDOWS:
        raise ValueError(f"unknown CT window {preset!r}; choose one of {sorted(CT_WINDOWS)}")
    return window(array, *CT_WINDOWS[preset])


def percentile_normalise(array: np.ndarray, low: float = 1.0, high: float = 99.0) -> np.ndarray:
    """MRI has no absolute scale: stretch the foreground's [low, high] percentiles to 0…255."""
    values = np.asarray(array, dtype=np.float32)
    foreground = values[values > 0]
    if foreground.size == 0:
        return np.zeros(values.shape, np.uint8)
    lo, hi = np.percentile(foreground, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip(np.rint((values - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def key_slice(mask: np.ndarray) -> int:
    """The axial (z) index where the mask has the largest area; the middle slice if empty."""
    areas = np.asarray(mask).reshape(-1, mask.shape[2]).sum(axis=0)
    return int(np.argmax(areas)) if areas.any() else mask.shape[2] // 2


def reorient(array: np.ndarray, affine: np.ndarray, codes: str = "LPS") -> tuple[np.ndarray, np.ndarray]:
    """The same voxels with axes turned (by flips and transposes only) to point along `codes`;
    extra trailing axes (channels) are kept."""
    from nibabel import orientations as nib_orient  # here: importing nibabel costs ~0.3 s, and most users of this module never reorient

    current = nib_orient.io_orientation(affine)
    transform = nib_orient.ornt_transform(current, nib_orient.axcodes2ornt(tuple(codes)))
    spatial = nib_orient.apply_orientation(np.asarray(array), transform)
    new_affine = affine @ nib_orient.inv_ornt_aff(transform, np.asarray(array).shape[:3])
    return spatial, new_affine


def flip_axis(array: np.ndarray, affine: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """The same voxels stored in reverse along `axis`, with the affine that keeps every voxel
    at its place in the world.

    >>> a, aff = flip_axis(np.arange(3)[None, :, None], np.eye(4), 1)
    >>> a.ravel().tolist(), float((aff @ [0, 0, 0, 1])[1])
    ([2, 1, 0], 2.0)
    """
    flipped = np.flip(array, axis=axis)
    new_affine = np.array(affine, dtype=np.float64)
    new_affine[:3, 3] += new_affine[:3, axis] * (array.shape[axis] - 1)
    new_affine[:3, axis] *= -1
    return flipped, new_affine


def axial(volume: np.ndarray, affine: np.ndarray, z: int) -> np.ndarray:
    """Axial slice z (of the volume turned to LPS) as a (rows, cols) picture in radiological
    display: anterior at the top, the patient's right on the image's left."""
    lps, _ = reorient(volume, affine, "LPS")
    return lps[:, :, z].T


def overlay(gray: np.ndarray, labels: np.ndarray, colours: dict[int, str], alpha: float = 0.5) -> np.ndarray:
    """Blend named colours over a uint8 picture where `labels` (same shape) has those labels."""
    table = dict(COLOURS)
    rgb = np.repeat(gray[..., None], 3, axis=-1).astype(np.float32)
    for label, name in colours.items():
        where = labels == label
        rgb[where] = (1 - alpha) * rgb[where] + alpha * np.array(table[name], np.float32)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def assign_colours(labels: list[int]) -> dict[int, str]:
    """Colours in table order for labels in the given order (cycling past the table's end)."""
    return {label: COLOURS[i % len(COLOURS)][0] for i, label in enumerate(labels)}


def encode_png(picture: np.ndarray, max_side: int = 512) -> bytes:
    """PNG bytes, shrunk so the long side is at most `max_side` (never enlarged). Deterministic:
    the same array gives the same bytes."""
    img = Image.fromarray(picture)
    long_side = max(img.size)
    if long_side > max_side:
        scale = max_side / long_side
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
