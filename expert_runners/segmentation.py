"""From a label map to Findings: the one path every segmentation expert (VISTA3D, BRATS, any
MONAI bundle, the weight-free CT expert, ground-truth labels) shares, so that the same label
map always gives the same numbers, colours and pictures whoever produced it.

Arrays are turned to LPS first, so slice indices in the Findings (`key_slice`, `bbox`, image
`slice`) are those of the pictures: axial, anterior up, the patient's right on the left.

Pictures are chosen so that a question can be shown what it asks about: the main slice, then
every structure's own largest cross-section (the expert's and the reference's), each as a
plain slice and as an overlay, and each records which structures are on it (`Image.labels`,
`Image.truth`), so a legend can name exactly the colours on screen.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from curation.findings import Findings, Image, Structure, Truth
from curation.imaging import assign_colours, ct_window, encode_png, key_slice, overlay, percentile_normalise, reorient
from expert_runners.measure import measure_label_map


def display_volume(volume: np.ndarray, window: str | None) -> np.ndarray:
    """uint8 volume for pictures: a CT window preset by name, or percentile normalisation (MRI)."""
    return ct_window(volume, window) if window else percentile_normalise(volume)


def on_slice(labels_lps: np.ndarray, z: int, structures: list[Structure]) -> list[str]:
    """The names of `structures` with at least one voxel on axial slice z, in their order."""
    present = set(np.unique(labels_lps[:, :, z]).tolist())
    return [s.name for s in structures if s.label in present]


def main_slice(labels_lps: np.ndarray, truth_lps: np.ndarray | None) -> int:
    """The slice shown by default: the reference's largest labelled area when it has one, else
    the expert's (the middle slice when both are empty)."""
    if truth_lps is not None and truth_lps.any():
        return key_slice(truth_lps > 0)
    return key_slice(labels_lps > 0)


def segmentation_findings(
    *,
    expert: str,
    runner: str,
    arg: str,
    modality: str,
    image: np.ndarray,
    label_map: np.ndarray,
    affine: np.ndarray,
    names: dict[int, str],
    window: str | None = "soft_tissue",
    colours: dict[int, str] | None = None,
    image_max_side: int = 512,
    min_size_ml: float = 0.0,
    truth_map: np.ndarray | None = None,
    derived: Callable[[np.ndarray, np.ndarray], list[Structure]] | None = None,
) -> Findings:
    """Measure every label present (parts under `min_size_ml` dropped), colour it, and draw the
    pictures described in the module docstring.

    `image` and `label_map` (and `truth_map`, the reference on the same grid with the same
    label ids, when there is one) are (x, y, z) on the grid of `affine`. `colours` fixes a
    label's colour (BRATS names its sub-regions by colour); other labels take the fixed table
    in order. `derived` measures regions made of labels (BRATS's tumour core) on a map without
    its small parts (LPS, and its affine); they follow the labels' structures, uncoloured and
    without pictures of their own.
    """
    image_lps, affine_lps = reorient(image, affine, "LPS")
    labels_lps, structures = measure_label_map(reorient(label_map, affine, "LPS")[0], affine_lps, names, min_ml=min_size_ml)
    palette = colours or assign_colours([s.label for s in structures])
    for s in structures:
        s.colour = palette.get(s.label)
    truth_lps, truth = None, None
    if truth_map is not None:
        truth_lps, truth_structures = measure_label_map(reorient(truth_map, affine, "LPS")[0], affine_lps, names, min_ml=min_size_ml)
        truth = Truth(structures=truth_structures)
    images = slice_pictures(expert, display_volume(image_lps, window), labels_lps, structures, truth_lps, truth, image_max_side)
    if derived is not None:
        structures = structures + derived(labels_lps, affine_lps)
        if truth is not None:
            truth.structures += derived(truth_lps, affine_lps)  # type: ignore[arg-type]
    return Findings(
        expert=expert,
        runner=runner,
        arg=arg,
        modality=modality,
        structures=structures,
        legend=legend(structures),
        images=images,
        truth=truth,
    )


def slice_pictures(expert: str, gray: np.ndarray, labels_lps: np.ndarray, structures: list[Structure], truth_lps: np.ndarray | None,
                   truth: Truth | None, max_side: int) -> list[Image]:
    """The main slice, then every structure's own largest cross-section (the expert's and the
    reference's), each plain and as an overlay, each with the structures on it."""
    main = main_slice(labels_lps, truth_lps)
    others = {s.key_slice for s in structures} | {s.key_slice for s in (truth.structures if truth else [])}
    drawn = {s.label: s.colour for s in structures if s.colour}
    coloured = {s.name for s in structures if s.colour}
    images = []
    for z in [main, *sorted(others - {main})]:
        plain = np.ascontiguousarray(gray[:, :, z].T)
        shown = on_slice(labels_lps, z, structures)
        known = None if truth is None else on_slice(truth_lps, z, truth.structures)  # type: ignore[arg-type]
        over = overlay(plain, np.ascontiguousarray(labels_lps[:, :, z].T), drawn)
        images += [
            Image(kind="key_slice", png=encode_png(plain, max_side), slice=z, caption=f"axial slice {z}", labels=shown, truth=known),
            Image(kind="overlay", png=encode_png(over, max_side), slice=z, caption=f"{expert} result on axial slice {z}",
                  labels=[n for n in shown if n in coloured], truth=known),
        ]
    return images


def legend(structures: list[Structure]) -> dict[str, str]:
    """Colour name → structure name(s), in drawing order; one colour may name several."""
    out: dict[str, str] = {}
    for s in structures:
        if s.colour:
            out[s.colour] = f"{out[s.colour]}, {s.name}" if s.colour in out else s.name
    return out


def sequence_pictures(array: np.ndarray, affine: np.ndarray, z: int, max_side: int, names: tuple[str, ...] | list[str],
                      like: Image | None = None) -> list[Image]:
    """Axial slice z of each channel of an (x, y, z, c) group, percentile-normalised, captioned
    with the channel's name (BRATS templates ask for `image("sequence", "T1c")`); `like`, a
    picture of the same slice, gives the structures on it."""
    lps, affine_lps = reorient(array, affine, "LPS")
    images = []
    for i, name in enumerate(names):
        gray = percentile_normalise(lps[..., i])
        images.append(Image(kind="sequence", png=encode_png(np.ascontiguousarray(gray[:, :, z].T), max_side), slice=z, caption=name,
                            labels=list(like.labels) if like else [], truth=None if like is None or like.truth is None else list(like.truth)))
    return images
