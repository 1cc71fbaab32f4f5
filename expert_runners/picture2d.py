"""The picture of a 2D item (an X-ray, a photograph of one) as the VLM sees it.

2D items arrive as (x, y) = (column, row) arrays: 8-bit pictures as uint8, DICOM pixel values as
float. Pictures are shown as stored; anything else is stretched between its 0.5th and 99.5th
percentiles, so a 12-bit radiograph with a few saturated pixels still uses the full grey range.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from curation.findings import Findings, Image
from curation.imaging import ct_window, encode_png, percentile_normalise, reorient
from expert_runners.base import ExpertInput, ExpertRunner, phase


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


class PictureRunner(ExpertRunner):
    """`picture`: the item's own picture and nothing else (no weights, no call). A template
    that shows an item without asking any expert (a VQA record's image) names it as its expert,
    so that pictures reach the renderer already made, as every other expert's do.

    2D items are shown as stored (`picture_2d`); volumes as their middle axial slice (CT in the
    soft-tissue window, anything else percentile-normalised; a sequence group's first one).
    """

    runner: ClassVar[str] = "picture"
    thread_safe: ClassVar[bool] = True  # no state kept between calls (an expert host runs it in threads)
    modalities: ClassVar[tuple[str, ...]] = ()
    PROVIDES: ClassVar[frozenset[str] | None] = frozenset({"key_slice"})

    def predict(self, inp: ExpertInput, arg: str, timing: dict[str, float]) -> Findings:
        with phase(timing, "postprocess"):
            array = np.asarray(inp.volume.array)
            if inp.item.kind == "image2d":
                picture, z, caption = picture_2d(array), None, "the image"
            else:
                volume = array if array.ndim == 3 else array[..., 0]
                gray = ct_window(volume) if inp.item.modality == "CT" else percentile_normalise(volume)
                lps, _ = reorient(gray, np.asarray(inp.volume.affine), "LPS")  # whatever axis the series was stored along
                z = lps.shape[2] // 2  # the middle axial slice
                picture, caption = np.ascontiguousarray(lps[:, :, z].T), f"axial slice {z}"
            png = encode_png(picture, self.image_max_side)
        return Findings(expert=self.name, runner=self.runner, arg=arg, modality=inp.item.modality,
                        images=[Image(kind="key_slice", png=png, slice=z, caption=caption)])
