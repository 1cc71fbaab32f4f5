"""From a label map to Findings: the one path every segmentation expert (VISTA3D, BRATS, any
MONAI bundle, the weight-free CT expert, ground-truth labels) shares, so that the same label
map always gives the same numbers, colours and pictures whoever produced it.

Arrays are turned to LPS first, so slice indices in the Findings (`key_slice`, `bbox`, image
`slice`) are those of the pictures: axial, anterior up, the patient's right on the left.
"""

from __future__ import annotations

import numpy as np

from curation.imaging import assign_colours, axial, ct_window, encode_png, key_slice, overlay, percentile_normalise, reorient
from curation.findings import Findings, Image, Structure
from expert_runners.measure import measure_structures


def display_volume(volume: np.ndarray, window: str | None) -> np.ndarray:
    """uint8 volume for pictures: a CT window preset by name, or percentile normalisation (MRI)."""
    return ct_window(volume, window) if window else percentile_normalise(volume)


def segmentation_findings(
    *,
    expert: str,
    runner: str,
    args: str,
    modality: str,
    image: np.ndarray,
    label_map: np.ndarray,
    affine: np.ndarray,
    names: dict[int, str],
    window: str | None = "soft_tissue",
    colours: dict[int, str] | None = None,
    image_max_side: int = 512,
) -> Findings:
    """Measure every label present, colour it, and draw the key slice with and without overlay.

    `image` and `label_map` are (x, y, z) on the grid of `affine`. `colours` fixes a label's
    colour (BRATS names its sub-regions by colour); other labels take the fixed table in order.
    """
    image_lps, affine_lps = reorient(image, affine, "LPS")
    labels_lps, _ = reorient(label_map, affine, "LPS")
    structures = measure_structures(labels_lps, affine_lps, names)
    palette = colours or assign_colours([s.label for s in structures])
    for s in structures:
        s.colour = palette.get(s.label)
    z = key_slice(labels_lps > 0)
    gray = display_volume(image_lps, window)
    plain = axial(gray, affine_lps, z)
    labelled = axial(labels_lps, affine_lps, z)
    drawn = {s.label: s.colour for s in structures if s.colour}
    images = [
        Image(kind="key_slice", png=encode_png(plain, image_max_side), slice=z, caption=f"axial slice {z}"),
        Image(kind="overlay", png=encode_png(overlay(plain, labelled, drawn), image_max_side), slice=z, caption=f"{expert} result on axial slice {z}"),
    ]
    return Findings(
        expert=expert,
        runner=runner,
        args=args,
        modality=modality,
        structures=structures,
        legend=legend(structures),
        images=images,
    )


def legend(structures: list[Structure]) -> dict[str, str]:
    """Colour name → structure name(s), in drawing order; one colour may name several."""
    out: dict[str, str] = {}
    for s in structures:
        if s.colour:
            out[s.colour] = f"{out[s.colour]}, {s.name}" if s.colour in out else s.name
    return out



def sequence_pictures(array: np.ndarray, affine: np.ndarray, z: int, max_side: int, names: tuple[str, ...] | list[str]) -> list[Image]:
    """Axial slice z of each channel of an (x, y, z, c) group, percentile-normalised, captioned
    with the channel's name (BRATS templates ask for `image("sequence", "T1c")`)."""
    images = []
    for i, name in enumerate(names):
        gray = percentile_normalise(array[..., i])
        images.append(Image(kind="sequence", png=encode_png(axial(gray, affine, z), max_side), slice=z, caption=name))
    return images
