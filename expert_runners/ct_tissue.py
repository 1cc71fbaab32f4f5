"""`ct_tissue`: a classical CT expert that needs no weights.

Hounsfield units mean the same thing on every calibrated scanner, so body, lungs, bone, fat and
soft tissue can be told apart by thresholds and connected components alone. This expert runs
anywhere, on any archive, in about a second per volume, and gives the pipeline real findings
(lung volume, fat volume, …) when no network is at hand.

The numeric core is a set of pure numpy/scipy functions (`body_mask`, `lung_mask`,
`bone_mask`, `tissue_labels`); `CtTissueRunner` only reads options, calls them and hands the
label map to `segmentation_findings`.

Label map (`TISSUE_NAMES`): 1 lung, 2 bone, 3 fat, 4 soft tissue. The body contains all of
them and is reported as its own structure, label 5 `body`, without an overlay colour (a voxel
has one label in the map, so the body cannot be drawn under the others). Body voxels that fit
no class (gas outside the lungs, partial-volume edges, −400…−191 HU, 151…`bone_hu` HU, dense
voxels not connected to bone) count towards the body only.

Manifest:

```yaml
experts:
  - name: CT_TISSUE
    runner: ct_tissue
    options:            # all optional; defaults shown
      body_hu: -500         # body = largest component above this, holes filled per axial slice
      lung_hu: -400         # lung = air below this inside the body ...
      lung_components: 2    # ... its largest components (two lungs, or one if joined by airways)
      lung_min_ml: 20.0     # a component smaller than this is not lung (bowel gas, noise)
      lung_min_fraction: 0.1  # nor one smaller than this fraction of the largest
      bone_hu: 200          # bone = above this, in components that reach ...
      bone_seed_hu: 400     # ... above this (cortex): contrast-filled vessels are left out
      fat_hu: [-190, -30]   # inclusive
      soft_tissue_hu: [-29, 150]
      window: soft_tissue   # picture window: soft_tissue, lung or bone
```

The argument selects structures: `<CT_TISSUE()>` or `<CT_TISSUE(everything)>` for all,
`<CT_TISSUE(lung, fat)>` for some (names from `TISSUE_NAMES` or `body`).

Known limits: lungs are told from bowel gas by size only, so in a scan that holds only small
lung bases and a large gas-filled stomach the stomach may be taken for a lung; dense contrast
(arterial-phase aorta above `bone_seed_hu`, excreted contrast) and calcifications count as
bone; the CT table is left out only when it does not touch the body.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
from nibabel import orientations as nib_orient
from scipy import ndimage

from curation.errors import CurationError
from curation.expert_args import arg_parts
from curation.imaging import CT_WINDOWS, reorient
from curation.manifest import ExpertSpec
from expert_runners.base import ExpertInput, ExpertRunner, phase
from curation.findings import Findings
from expert_runners.measure import measure_structures
from expert_runners.segmentation import segmentation_findings

LUNG, BONE, FAT, SOFT_TISSUE, BODY = 1, 2, 3, 4, 5
TISSUE_NAMES: dict[int, str] = {LUNG: "lung", BONE: "bone", FAT: "fat", SOFT_TISSUE: "soft tissue"}
BODY_NAME = "body"


@dataclass(frozen=True, slots=True)
class TissueThresholds:
    """The expert's settings (HU unless stated); `from_options` reads them from a manifest."""

    body_hu: float = -500.0
    lung_hu: float = -400.0
    lung_components: int = 2
    lung_min_ml: float = 20.0
    lung_min_fraction: float = 0.1
    bone_hu: float = 200.0
    bone_seed_hu: float = 400.0
    fat_hu: tuple[float, float] = (-190.0, -30.0)
    soft_tissue_hu: tuple[float, float] = (-29.0, 150.0)

    @classmethod
    def from_options(cls, options: dict[str, Any], where: str) -> "TissueThresholds":
        """Validate `options` (minus non-threshold keys the caller removed) into thresholds.

        >>> TissueThresholds.from_options({"lung_hu": -500}, "x").lung_hu
        -500.0
        """
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in options.items():
            if key not in known:
                raise CurationError(f"{where}: unknown option {key!r}; valid options are {sorted(known) + ['window']}")
            default = known[key].default
            try:
                if isinstance(default, tuple):
                    low, high = (float(v) for v in value)
                    if low > high:
                        raise ValueError("low above high")
                    values[key] = (low, high)
                elif isinstance(default, int):
                    values[key] = int(value)
                    if values[key] < 1:
                        raise ValueError("must be at least 1")
                else:
                    values[key] = float(value)
            except (TypeError, ValueError) as e:
                kind = "a [low, high] pair of numbers" if isinstance(default, tuple) else type(default).__name__
                raise CurationError(f"{where}: option {key!r} must be {kind}, got {value!r} ({e})") from e
        return cls(**values)


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis that runs along the patient's head–foot (RAS z) direction."""
    ornt = nib_orient.io_orientation(affine)
    return int(np.flatnonzero(ornt[:, 0] == 2)[0])


def largest_components(mask: np.ndarray, count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(label image, component sizes largest first as (label, voxels) rows) of `mask`,
    face-connected; only the `count` largest rows are returned."""
    labelled, n = ndimage.label(mask)
    if n == 0:
        return labelled, np.zeros((0, 2), dtype=np.int64)
    sizes = np.bincount(labelled.ravel())[1:]
    order = np.argsort(-sizes, kind="stable")[:count]
    return labelled, np.stack([order + 1, sizes[order]], axis=1)


def body_mask(hu: np.ndarray, *, threshold: float = -500.0, axis: int = 2) -> np.ndarray:
    """The largest connected region above `threshold`, with holes (lungs, bowel gas) filled in
    each slice across `axis` (the axial axis: lungs are enclosed in-plane, not in 3D where they
    may leave through the volume's top).

    >>> hu = np.full((9, 9, 3), -1000.0); hu[2:7, 2:7] = 40; hu[4, 4] = -900
    >>> int(body_mask(hu).sum())
    75
    """
    labelled, top = largest_components(hu > threshold)
    if len(top) == 0:
        return np.zeros(hu.shape, dtype=bool)
    body = labelled == top[0, 0]
    slices = np.moveaxis(body, axis, 0)  # a view: filling writes into `body`
    for k in range(slices.shape[0]):
        if slices[k].any():
            slices[k] = ndimage.binary_fill_holes(slices[k])
    return body


def lung_mask(
    hu: np.ndarray,
    body: np.ndarray,
    *,
    voxel_ml: float,
    threshold: float = -400.0,
    components: int = 2,
    min_ml: float = 20.0,
    min_fraction: float = 0.1,
) -> np.ndarray:
    """Air below `threshold` inside the body, kept only in its `components` largest connected
    parts that hold at least `min_ml` and `min_fraction` of the largest: the lungs, not the
    bowel gas."""
    labelled, top = largest_components((hu < threshold) & body, components)
    keep = [int(label) for label, size in top if size * voxel_ml >= min_ml and size >= min_fraction * top[0, 1]]
    return np.isin(labelled, keep) if keep else np.zeros(hu.shape, dtype=bool)


def bone_mask(hu: np.ndarray, body: np.ndarray, *, threshold: float = 200.0, seed: float = 400.0) -> np.ndarray:
    """Hysteresis threshold inside the body: voxels above `threshold` in connected parts that
    reach above `seed` (cortical bone), so that enhancing vessels and organs near 200 HU are not
    called bone while cancellous bone joined to its cortex is."""
    labelled, n = ndimage.label((hu > threshold) & body)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    seeded = np.unique(labelled[(hu > seed) & (labelled > 0)])
    return np.isin(labelled, seeded)


def tissue_labels(hu: np.ndarray, affine: np.ndarray, t: TissueThresholds = TissueThresholds()) -> tuple[np.ndarray, np.ndarray]:
    """(label map uint8 with `TISSUE_NAMES` ids, body mask) of a CT volume in HU on the grid of
    the RAS `affine`. Earlier classes win: lung, bone, fat, soft tissue."""
    hu = np.asarray(hu, dtype=np.float32)
    voxel_ml = float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0
    body = body_mask(hu, threshold=t.body_hu, axis=axial_axis(affine))
    labels = np.zeros(hu.shape, dtype=np.uint8)
    fat = body & (hu >= t.fat_hu[0]) & (hu <= t.fat_hu[1])
    soft = body & (hu >= t.soft_tissue_hu[0]) & (hu <= t.soft_tissue_hu[1])
    labels[soft] = SOFT_TISSUE
    labels[fat] = FAT
    labels[bone_mask(hu, body, threshold=t.bone_hu, seed=t.bone_seed_hu)] = BONE
    lungs = lung_mask(
        hu, body, voxel_ml=voxel_ml, threshold=t.lung_hu, components=t.lung_components,
        min_ml=t.lung_min_ml, min_fraction=t.lung_min_fraction,
    )
    labels[lungs] = LUNG
    return labels, body


def selected(arg: str) -> set[str]:
    """Structure names an argument asks for: all for "" or "everything", else a comma list."""
    names = set(arg_parts(arg))
    every = set(TISSUE_NAMES.values()) | {BODY_NAME}
    if not names or names == {"everything"}:
        return every
    aliases = {"lungs": "lung", "bones": "bone", "soft tissues": "soft tissue"}
    names = {aliases.get(n, n) for n in names}
    unknown = names - every
    if unknown:
        raise ValueError(f"unknown structure(s) {sorted(unknown)} in argument {arg!r}; choose from everything, {', '.join(sorted(every))}")
    return names


class CtTissueRunner(ExpertRunner):
    """Body, lungs, bone, fat and soft tissue of a CT volume from HU thresholds."""

    runner: ClassVar[str] = "ct_tissue"
    thread_safe: ClassVar[bool] = True  # no state kept between calls (an expert host runs it in threads)
    modalities: ClassVar[tuple[str, ...]] = ("CT",)
    kinds: ClassVar[tuple[str, ...]] = ("dicom", "nifti")
    PROVIDES: ClassVar[frozenset[str] | None] = frozenset({"structures", "key_slice", "overlay"})

    def __init__(self, spec: ExpertSpec, *, image_max_side: int = 512):
        super().__init__(spec, image_max_side=image_max_side)
        options = dict(spec.options)
        self.window = str(options.pop("window", "soft_tissue"))
        if self.window not in CT_WINDOWS:
            raise CurationError(f"expert {spec.name!r}: option 'window' must be one of {sorted(CT_WINDOWS)}, got {self.window!r}")
        self.thresholds = TissueThresholds.from_options(options, f"expert {spec.name!r}")

    def vocabulary(self, arg: str) -> list[str] | None:
        try:
            return sorted(selected(arg))
        except ValueError:
            return None

    def predict(self, inp: ExpertInput, arg: str, timing: dict[str, float]) -> Findings:
        wanted = selected(arg)
        with phase(timing, "load"):
            array = np.asarray(inp.volume.array)
        with phase(timing, "preprocess"):
            if array.ndim != 3:
                raise ValueError(f"ct_tissue needs a 3D volume (x, y, z), got an array of shape {array.shape}")
            hu = array.astype(np.float32, copy=False)
            affine = np.asarray(inp.volume.affine, dtype=np.float64)
        with phase(timing, "inference"):
            labels, body = tissue_labels(hu, affine, self.thresholds)
            keep = [label for label, name in TISSUE_NAMES.items() if name in wanted]
            if len(keep) < len(TISSUE_NAMES):
                labels = np.where(np.isin(labels, keep), labels, 0).astype(np.uint8)
        with phase(timing, "postprocess"):
            findings = segmentation_findings(
                expert=self.name, runner=self.runner, arg=arg, modality=inp.item.modality, image=hu,
                label_map=labels, affine=affine, names=TISSUE_NAMES, window=self.window,
                image_max_side=self.image_max_side, min_size_ml=self.min_size_ml,
            )
            if BODY_NAME in wanted and body.any():
                body_lps, affine_lps = reorient(body.astype(np.uint8) * BODY, affine, "LPS")
                findings.structures += measure_structures(body_lps, affine_lps, {BODY: BODY_NAME})
        return findings
