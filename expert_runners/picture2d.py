"""The picture of a 2D item (an X-ray, a photograph of one) as the VLM sees it.

2D items arrive as (x, y) = (column, row) arrays: 8-bit pictures as uint8, DICOM pixel values as
float. Pictures are shown as stored; anything else is stretched between its 0.5th and 99.5th
percentiles, so a 12-bit radiograph with a few saturated pixels still uses the full grey range.
"""

from __future__ import annotations

import numpy as np


def grayscale(array: np.ndarray) -> np.ndarray:
    """(x, y) or (x, y, c) → (x, y): colour channels are averaged (uint8 stays uint8)."""
    a = np.asarray(array)
    if a.ndim == 3:
        mean = a.mean(axis=-1)
        return np.rint(mean).astype(np.uint8) if a.dtype == np.uint8 else mean.astype(np.float32)
    if a.ndim != 2:
        raise ValueError(f"a 2D image must be (x, y) or (x, y, channels), got shape {a.shape}")
    return a


def picture_2d(array: np.ndarray) -> np.ndarray:
    """uint8 (rows, columns) for display.

    >>> picture_2d(np.array([[0, 10], [20, 30]], dtype=np.uint8)).tolist()   # (x, y) → (row, col)
    [[0, 20], [10, 30]]
    >>> picture_2d(np.array([[0.0, 1000.0]])).tolist()
    [[0], [255]]
    """
    a = grayscale(array)
    if a.dtype != np.uint8:
        values = a.astype(np.float32)
        lo, hi = np.percentile(values, [0.5, 99.5])
        if hi <= lo:
            hi = lo + 1.0
        a = np.clip(np.rint((values - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(a.T)
