"""`brats`: brain-tumour sub-regions from four MRI sequences with the BRATS MONAI bundle.

As the bundle's `inference.json` does: its `network_def` (SegResNet, blocks_down 1,2,2,4,
init_filters 16, 4 → 3 channels) with `models/model.pt`; its preprocessing (channel-wise
NormalizeIntensity over non-zero voxels; any spacing/orientation steps a BRATS-like bundle adds
are applied and inverted too); a sliding window of the bundle's ROI (240×240×160) clipped to
the volume; sigmoid, back to the item's grid, > threshold (0.5) → channels TC, WT, ET; labels
as the bundle's postprocessing: 4 where ET, else 1 where TC, else 2 where WT.

Findings (see `findings.py`): structures 1 "necrotic tumor core" (red), 2 "peritumoral edema"
(green), 4 "enhancing tumor" (yellow) — VILA-M3's "yellow and red: tumor core, only yellow:
enhancing tumor, all colors: whole tumor" — plus two derived structures, never drawn and
absent from the legend: label `TUMOR_CORE` (101) "tumor core" = 1 ∪ 4 and label `WHOLE_TUMOR`
(102) "whole tumor" = 1 ∪ 2 ∪ 4. Images: the key slice and the overlay on the display sequence
(FLAIR by default, percentile-normalised), then one `sequence` image per input sequence at the
same slice, captioned T1c, T1, T2, FLAIR, in that order (VILA-M3's first turn shows all four).

Manifest:

```yaml
experts:
  - name: BRATS
    runner: brats
    bundle: models/brats_mri_segmentation
    options:                       # all optional; plus patch_size, sw_batch_size, overlap, amp
      display_channel: FLAIR       # T1c, T1, T2 or FLAIR: the sequence under the overlay
      sequence_images: true        # one key-slice picture per sequence
      threshold: 0.5               # on the sigmoid of each of TC, WT, ET
      channels: {T1c: t1ce}        # the item's channel name for a sequence, if not a usual one
```

The item's channels are matched case-insensitively against usual names (T1c: t1c, t1ce,
t1gd, t1-ce, t1post; T1: t1, t1n, t1w; T2: t2, t2w; FLAIR: flair, t2f, t2-flair, t2flair).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import Field

from curation.errors import CurationError, ItemError
from curation.findings import Findings, Structure
from curation.manifest import ExpertSpec
from expert_runners.base import ExpertInput, phase
from expert_runners.bundle import TransformStep, read_bundle
from expert_runners.labels import truth_map
from expert_runners.measure import measure_structures
from expert_runners.segmentation import segmentation_findings, sequence_pictures
from expert_runners.volumetric import BundleRunner, InferenceOptions, invert, parse_options

if TYPE_CHECKING:  # pragma: no cover
    import torch

SEQUENCES = ("T1c", "T1", "T2", "FLAIR")  # the bundle's input channel order
ALIASES: dict[str, tuple[str, ...]] = {
    "T1c": ("t1c", "t1ce", "t1gd", "t1-ce", "t1_ce", "t1post", "t1-post", "ce-t1", "t1c+"),
    "T1": ("t1", "t1n", "t1w", "t1-native"),
    "T2": ("t2", "t2w"),
    "FLAIR": ("flair", "t2f", "t2-flair", "t2flair", "t2_flair"),
}
NAMES: dict[int, str] = {1: "necrotic tumor core", 2: "peritumoral edema", 4: "enhancing tumor"}
COLOURS: dict[int, str] = {4: "yellow", 1: "red", 2: "green"}
TUMOR_CORE, WHOLE_TUMOR = 101, 102
DERIVED: dict[int, tuple[str, tuple[int, ...]]] = {TUMOR_CORE: ("tumor core", (1, 4)), WHOLE_TUMOR: ("whole tumor", (1, 2, 4))}
DOWNSAMPLE = 8  # SegResNet with four levels halves the grid three times


class BratsOptions(InferenceOptions):
    display_channel: str = "FLAIR"
    sequence_images: bool = True
    threshold: float = Field(0.5, gt=0, lt=1)
    channels: dict[str, str] = {}


def brats_labels(tc: np.ndarray, wt: np.ndarray, et: np.ndarray) -> np.ndarray:
    """The bundle's label map from its three binary channels: ET → 4, else TC → 1, else WT → 2.

    >>> brats_labels(np.array([1, 1, 0, 0]), np.array([1, 1, 1, 0]), np.array([1, 0, 0, 0])).tolist()
    [4, 1, 2, 0]
    """
    return np.where(et > 0, 4, np.where(tc > 0, 1, np.where(wt > 0, 2, 0))).astype(np.uint8)


def channel_order(have: list[str], overrides: dict[str, str]) -> tuple[list[int], list[str]]:
    """Indices of T1c, T1, T2, FLAIR among the item's channel names, and the sequences missing.

    >>> channel_order(["flair", "t1ce", "t1", "t2"], {})
    ([1, 2, 3, 0], [])
    >>> channel_order(["t1", "t2", "flair"], {})[1]
    ['T1c']
    """
    lower = [c.lower() for c in have]
    order, missing = [], []
    for seq in SEQUENCES:
        wanted = (overrides[seq].lower(),) if seq in overrides else ALIASES[seq]
        found = next((lower.index(w) for w in wanted if w in lower), None)
        if found is None:
            missing.append(seq)
        else:
            order.append(found)
    return order, missing


class BratsRunner(BundleRunner):
    runner: ClassVar[str] = "brats"
    thread_safe: ClassVar[bool] = True  # no state kept between calls (an expert host runs it in threads)
    modalities: ClassVar[tuple[str, ...]] = ("MR",)
    kinds: ClassVar[tuple[str, ...]] = ("nifti_group",)
    PROVIDES: ClassVar[frozenset[str] | None] = frozenset({"structures", "key_slice", "overlay", "sequence"})
    DOWNSAMPLE: ClassVar[int] = DOWNSAMPLE

    def __init__(self, spec: ExpertSpec, *, image_max_side: int = 512):
        super().__init__(spec, image_max_side=image_max_side)
        if spec.bundle is None:
            raise CurationError(f"expert {spec.name!r} (runner brats): set `bundle:` to a local BRATS bundle folder")
        self.options: BratsOptions = parse_options(spec, BratsOptions)
        where = f"expert {spec.name!r}"
        if self.options.display_channel not in SEQUENCES:
            raise CurationError(f"{where}: options.display_channel {self.options.display_channel!r} is not one of {list(SEQUENCES)}")
        unknown = sorted(set(self.options.channels) - set(SEQUENCES))
        if unknown:
            raise CurationError(f"{where}: options.channels has {unknown}; its keys are the sequences {list(SEQUENCES)}")
        self.bundle = read_bundle(spec.bundle)
        if self.bundle.input_channels != 4:
            raise CurationError(f"{self.bundle.metadata_file}: BRATS takes 4 input channels (T1c, T1, T2, FLAIR), this bundle says {self.bundle.input_channels}")
        if not self.bundle.preprocessing:
            # the published bundle's only intensity step; a bundle that states none gets it too
            self.bundle.preprocessing = [TransformStep("NormalizeIntensityd", {"nonzero": True, "channel_wise": True})]
        self.net: torch.nn.Module | None = None

    def predict(self, inp: ExpertInput, arg: str, timing: dict[str, float]) -> Findings:
        volume, item, opts = inp.volume, inp.item, self.options
        names = list(volume.channels or item.channels)
        if volume.array.ndim != 4 or volume.array.shape[-1] != len(names):
            raise ItemError(item.item_id, f"{self.name} needs a 4-sequence group (x, y, z, 4) with named channels, got shape {volume.array.shape} and channels {names}")
        order, missing = channel_order(names, opts.channels)
        if missing:
            raise ItemError(
                item.item_id,
                f"{self.name} needs sequences T1c, T1, T2, FLAIR; missing {', '.join(missing)} (item has {', '.join(names) or 'no channel names'}); "
                "name them in the source's `channels:` or map them with the expert's `options.channels`",
            )
        array = volume.array[..., order]
        label_map = self.segment(array, volume.affine, timing)
        with phase(timing, "postprocess"):
            return brats_findings(
                expert=self.name,
                arg=arg.strip(),
                modality=item.modality,
                array=array,
                affine=volume.affine,
                label_map=label_map,
                display_channel=opts.display_channel,
                sequence_images=opts.sequence_images,
                image_max_side=self.image_max_side,
                min_size_ml=self.min_size_ml,
                truth_map=truth_map(inp, array.shape[:3]),
            )

    def provides(self) -> frozenset[str] | None:
        found = super().provides()
        return None if found is None else (found if self.options.sequence_images else found - {"sequence"})

    def vocabulary(self, arg: str) -> list[str] | None:
        return sorted([*NAMES.values(), *(name for name, _ in DERIVED.values())])

    def segment(self, array: np.ndarray, affine: np.ndarray, timing: dict[str, float] | None = None) -> np.ndarray:
        """The BRATS label map (0/1/2/4, uint8) on the grid of `array` (x, y, z, 4: T1c, T1,
        T2, FLAIR)."""
        return self.segment_array(array, affine, timing)

    def postprocess(self, logits: torch.Tensor, pre: Any, data: dict[str, Any], **_: Any) -> np.ndarray:
        """As the bundle: sigmoid, back to the input grid (linear), threshold, 4/1/2."""
        import torch

        probs = invert(pre, data, torch.sigmoid(logits[0]), nearest=False).numpy()
        on = probs > self.options.threshold
        return brats_labels(on[0], on[1], on[2])


def brats_findings(
    *,
    expert: str,
    arg: str,
    modality: str,
    array: np.ndarray,
    affine: np.ndarray,
    label_map: np.ndarray,
    display_channel: str = "FLAIR",
    sequence_images: bool = True,
    image_max_side: int = 512,
    min_size_ml: float = 0.0,
    truth_map: np.ndarray | None = None,
) -> Findings:
    """Findings of a BRATS label map (1/2/4) over the sequences `array` (x, y, z, 4) in
    T1c, T1, T2, FLAIR order: sub-regions in their fixed colours, the derived tumour core and
    whole tumour, the overlay on `display_channel`, and (optionally) one picture per sequence
    at the main slice. `truth_map`, the reference on the same grid (BraTS ids), is measured the
    same way. Parts under `min_size_ml` are dropped first, so the derived regions agree with
    their parts."""
    findings = segmentation_findings(
        expert=expert,
        runner=BratsRunner.runner,
        arg=arg,
        modality=modality,
        image=array[..., SEQUENCES.index(display_channel)],
        label_map=label_map,
        affine=affine,
        names=NAMES,
        window=None,
        colours=COLOURS,
        image_max_side=image_max_side,
        min_size_ml=min_size_ml,
        truth_map=truth_map,
        derived=derived_structures,
    )
    for img in findings.images:
        img.labels = with_derived(img.labels)
        img.truth = None if img.truth is None else with_derived(img.truth)
    if sequence_images:
        main = findings.images[0]
        z = main.slice if main.slice is not None else array.shape[2] // 2
        findings.images.extend(sequence_pictures(array, affine, z, image_max_side, SEQUENCES, like=main))
    return findings


def with_derived(names: list[str]) -> list[str]:
    """The sub-regions on a slice, followed by the derived regions they make up there.

    >>> with_derived(["peritumoral edema"]), with_derived(["necrotic tumor core"])
    (['peritumoral edema', 'whole tumor'], ['necrotic tumor core', 'tumor core', 'whole tumor'])
    """
    out = list(names)
    for name, parts in DERIVED.values():
        if any(NAMES[p] in names for p in parts):
            out.append(name)
    return out


def derived_structures(labels_lps: np.ndarray, affine_lps: np.ndarray) -> list[Structure]:
    """Tumour core (101) and whole tumour (102) measured like any structure, uncoloured, on the
    LPS label map `segmentation_findings` measured (its small parts already dropped)."""
    out = []
    for label, (name, parts) in DERIVED.items():
        mask = np.isin(labels_lps, parts)
        if mask.any():
            out.extend(measure_structures(np.where(mask, label, 0).astype(np.int32), affine_lps, {label: name}))
    return out
