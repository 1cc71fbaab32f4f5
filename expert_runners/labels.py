"""`labels`: ground-truth annotations turned into Findings, as if an expert had produced them.

Public labelled sets (and our demo archive) pair images with label maps or per-image labels.
Sending them through the same `segmentation_findings` path as the networks makes their
volumes, counts, colours and pictures exactly comparable, so a labelled archive becomes expert
data with perfect "predictions".

- 3D items (CT/MR volumes, MR sequence groups) need `ExpertInput.labels`: an integer label map
  on the item's grid (axis flips and transposes against the image are undone; anything else is
  an error: resample the labels first).
- 2D items use `item.attrs["labels"]` (name → 0/1, from the source's labels table) as classes
  with probability 1.0 or 0.0; a 2D label map, when there is one, gives structures too.

Manifest:

```yaml
experts:
  - name: VISTA3D          # the name the VLM will call: labels stand in for the real expert
    runner: labels
    options:
      preset: vista3d      # names from VISTA3D's channel_def (or `brats`: 1/2/4 sub-regions)
      names: {100: "my structure"}   # id → name, overrides the preset; unnamed ids: "label <id>"
      colours: {26: green} # id → colour name from curation.imaging.COLOURS; default: table order
      display_channel: t1c # MR groups: the channel (name or index) drawn; default the first
      window: soft_tissue  # CT window (soft_tissue, lung, bone) or null for percentile
                           # normalisation; default soft_tissue for CT, null otherwise
```

The argument picks labels: empty or `everything` for all, a VISTA3D group name (`hepatic
tumor`, `organs`, …) when `preset: vista3d` and `data/vista3d_label_groups.json` is present, or
a comma-separated list of names or ids.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, ClassVar

import numpy as np
from nibabel import orientations as nib_orient

from curation.errors import CurationError, ItemError
from curation.expert_args import arg_parts, canonical_arg
from curation.imaging import COLOURS, CT_WINDOWS, encode_png, reorient
from curation.items import Volume
from curation.manifest import ExpertSpec
from expert_runners.base import ExpertInput, ExpertRunner, phase
from curation.findings import ClassResult, Findings, Image, Truth
from expert_runners.picture2d import grayscale, picture_2d
from expert_runners.segmentation import segmentation_findings, sequence_pictures

BRATS_NAMES: dict[int, str] = {1: "necrotic tumor core", 2: "peritumoral edema", 4: "enhancing tumor"}
# VILA-M3 describes BRATS overlays as "yellow and red: tumor core, only yellow: enhancing tumor".
BRATS_COLOURS: dict[int, str] = {1: "red", 2: "green", 4: "yellow"}
PRESETS = ("vista3d", "brats")
OPTIONS = ("preset", "names", "colours", "display_channel", "window")
GRID_TOLERANCE_MM = 0.05


# What the published VISTA3D bundle segments for "everything" (its `everything_labels`): all
# 132 classes but tumours, lesions and the classes it splits into subclasses.
DEFAULT_EVERYTHING = sorted(set(range(1, 133)) - {2, 16, 18, 20, 21, 23, 24, 25, 26, 27, 128, 129, 130, 131, 132})


def _package_json(name: str) -> Any:
    return json.loads(resources.files("expert_runners").joinpath("data", name).read_text())


def preset_names(preset: str) -> dict[int, str]:
    """Label id → name of a named preset.

    >>> preset_names("vista3d")[26], preset_names("brats")[4]
    ('hepatic tumor', 'enhancing tumor')
    """
    if preset == "brats":
        return dict(BRATS_NAMES)
    if preset == "vista3d":
        return {int(k): v for k, v in _package_json("vista3d_labels.json").items() if int(k) != 0}
    raise CurationError(f"unknown label preset {preset!r}; choose one of {list(PRESETS)}")


def vista3d_groups() -> dict[str, list[int]]:
    """VILA-M3's argument groups (name → label ids) when the package carries them, else {}."""
    try:
        groups = _package_json("vista3d_label_groups.json")
    except FileNotFoundError:
        return {}
    return {name: sorted(int(v) for v in ids.values()) for name, ids in groups.items() if isinstance(ids, dict)}


def _id_map(value: Any, key: str, where: str) -> dict[int, str]:
    if not isinstance(value, dict):
        raise CurationError(f"{where}: option {key!r} must be a mapping of label id to {key[:-1]}, got {value!r}")
    out = {}
    for k, v in value.items():
        try:
            out[int(k)] = str(v)
        except (TypeError, ValueError) as e:
            raise CurationError(f"{where}: option {key!r} has key {k!r}, which is not an integer label id") from e
    return out


def select_labels(args: str, present: list[int], names: dict[int, str], groups: dict[str, list[int]]) -> list[int]:
    """The label ids an argument asks for, among those present.

    >>> select_labels("", [1, 26], {1: "liver", 26: "hepatic tumor"}, {})
    [1, 26]
    >>> select_labels("hepatic tumor, 1", [1, 3, 26], {1: "liver", 26: "hepatic tumor"}, {})
    [1, 26]
    """
    arg = canonical_arg(args)
    if arg in ("", "everything"):
        return present
    if arg in groups:
        return [label for label in present if label in groups[arg]]
    by_name = {name.lower(): label for label, name in names.items()}
    wanted = set()
    for part in arg_parts(arg):
        if part.isdigit():
            wanted.add(int(part))
        elif part in by_name:
            wanted.add(by_name[part])
        else:
            choices = sorted(groups) + ["a label name or id"]
            raise ValueError(f"argument {args!r}: {part!r} is neither a label group nor a label name; use everything, {', '.join(choices)}")
    return [label for label in present if label in wanted]


def integer_labels(array: np.ndarray) -> np.ndarray:
    """A label map as int32, refusing probability maps and negative ids."""
    a = np.asarray(array)
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)) or np.any(a != np.round(a)):
            raise ValueError("the label map holds non-integer values; is it a probability map? Threshold it first")
    a = a.astype(np.int32)
    if a.size and a.min() < 0:
        raise ValueError(f"the label map holds a negative label ({int(a.min())}); label ids must be 0 (background) or positive")
    return a


def labels_on_grid(labels: Volume, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """The label array in the image's voxel order: as is when the grids agree, turned when the
    label file stores the same grid with flipped or swapped axes; otherwise an error."""
    lab = np.asarray(labels.array)
    if lab.ndim == 4 and lab.shape[3] == 1:
        lab = lab[..., 0]
    if lab.shape == shape and np.allclose(labels.affine, affine, atol=GRID_TOLERANCE_MM):
        return lab
    if lab.ndim == 3:
        lab_lps, lab_aff = reorient(lab, np.asarray(labels.affine, dtype=np.float64), "LPS")
        img_lps_shape, img_aff = reorient(np.zeros(shape, dtype=np.uint8), affine, "LPS")
        if lab_lps.shape == img_lps_shape.shape and np.allclose(lab_aff, img_aff, atol=GRID_TOLERANCE_MM):
            codes = "".join(nib_orient.aff2axcodes(affine))
            return reorient(lab_lps, lab_aff, codes)[0]
    raise ValueError(
        f"the label map's grid (shape {list(lab.shape)}, voxel size {np.round(np.linalg.norm(labels.affine[:3, :3], axis=0), 3).tolist()} mm) "
        f"is not the image's (shape {list(shape)}, voxel size {np.round(np.linalg.norm(affine[:3, :3], axis=0), 3).tolist()} mm); "
        "resample the labels onto the image grid"
    )

def truth_map(inp: ExpertInput, shape: tuple[int, ...] | None = None, *, keep: list[int] | None = None) -> np.ndarray | None:
    """The item's ground-truth label map on the image's grid (int32; only the ids in `keep`
    when given), or None when the item has none. Segmentation experts measure it beside their
    own output, as the reference their findings are compared with."""
    if inp.labels is None:
        return None
    shape = tuple(shape or np.asarray(inp.volume.array).shape[:3])
    labels = integer_labels(labels_on_grid(inp.labels, shape, np.asarray(inp.volume.affine, dtype=np.float64)))
    return labels if keep is None else np.where(np.isin(labels, keep), labels, 0)


# Usual file-name spellings of the BRATS sequences → the captions templates ask for.
SEQUENCE_CAPTIONS = {"t1c": "T1c", "t1ce": "T1c", "t1gd": "T1c", "t1": "T1", "t1n": "T1", "t2": "T2", "t2w": "T2", "flair": "FLAIR", "t2f": "FLAIR"}


class LabelsRunner(ExpertRunner):
    """Ground-truth label maps and per-image labels as Findings."""

    runner: ClassVar[str] = "labels"
    thread_safe: ClassVar[bool] = True  # no state kept between calls (an expert host runs it in threads)
    modalities: ClassVar[tuple[str, ...]] = ()
    # sequence: on multi-sequence groups; classes: on 2D items with a labels table
    PROVIDES: ClassVar[frozenset[str] | None] = frozenset({"structures", "key_slice", "overlay", "classes", "sequence"})

    def __init__(self, spec: ExpertSpec, *, image_max_side: int = 512):
        super().__init__(spec, image_max_side=image_max_side)
        where = f"expert {spec.name!r}"
        options = dict(spec.options)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise CurationError(f"{where}: unknown option(s) {unknown}; valid options are {list(OPTIONS)}")
        preset = options.get("preset")
        if preset is not None and preset not in PRESETS:
            raise CurationError(f"{where}: option 'preset' must be one of {list(PRESETS)}, got {preset!r}")
        self.names = preset_names(preset) if preset else {}
        self.names.update(_id_map(options.get("names", {}), "names", where))
        self.colours = dict(BRATS_COLOURS) if preset == "brats" else {}
        self.colours.update(_id_map(options.get("colours", {}), "colours", where))
        bad = sorted({c for c in self.colours.values()} - {name for name, _ in COLOURS})
        if bad:
            raise CurationError(f"{where}: option 'colours' names unknown colour(s) {bad}; use {[n for n, _ in COLOURS]}")
        self.groups = vista3d_groups() if preset == "vista3d" else {}
        self.display_channel: str | int = options.get("display_channel", 0)
        if not isinstance(self.display_channel, (str, int)):
            raise CurationError(f"{where}: option 'display_channel' must be a channel name or index, got {self.display_channel!r}")
        self.window_option = options.get("window", "default")
        if self.window_option not in ("default", None) and self.window_option not in CT_WINDOWS:
            raise CurationError(f"{where}: option 'window' must be one of {sorted(CT_WINDOWS)} or null, got {self.window_option!r}")

    def vocabulary(self, arg: str) -> list[str] | None:
        """The names the argument covers when the options name the labels (a preset or
        `names`); None when the label map's ids are unnamed."""
        if not self.names:
            return None
        key = canonical_arg(arg)
        if key in ("", "everything"):
            return sorted(set(self.names.values()))
        if key in self.groups:
            return sorted({self.names[i] for i in self.groups[key] if i in self.names})
        by_name = {n.lower(): n for n in self.names.values()}
        parts = arg_parts(key)
        return sorted({self.names[int(p)] if p.isdigit() and int(p) in self.names else by_name.get(p, p) for p in parts})

    def window(self, modality: str) -> str | None:
        if self.window_option == "default":
            return "soft_tissue" if modality == "CT" else None
        return self.window_option  # type: ignore[no-any-return]

    def predict(self, inp: ExpertInput, arg: str, timing: dict[str, float]) -> Findings:
        item = inp.item
        table = item.attrs.get("labels") if item.kind == "image2d" else None
        if inp.labels is None and not table:
            raise ItemError(
                item.item_id,
                f"expert {self.name} (runner labels) needs ground truth, and this {item.kind} item has none: give its "
                "source `labels:` (dicom: a folder of <SeriesInstanceUID>.nii.gz; nifti_group: the label channel; "
                "image2d: a labels CSV) or drop the item from this expert's tasks",
            )
        with phase(timing, "load"):
            image = np.asarray(inp.volume.array)
            label_array = None if inp.labels is None else np.asarray(inp.labels.array)
        if item.kind == "image2d" or inp.labels is None:
            return self._image_2d(inp, image, label_array, table or {}, arg, timing)
        with phase(timing, "preprocess"):
            group = image if image.ndim == 4 else None
            image = self._display_channel(image, inp.volume.channels)
            affine = np.asarray(inp.volume.affine, dtype=np.float64)
            labels = integer_labels(labels_on_grid(inp.labels, image.shape, affine))
            present = [int(v) for v in np.unique(labels) if v != 0]
            keep = select_labels(arg, present, self.names, self.groups)
            if len(keep) < len(present):
                labels = np.where(np.isin(labels, keep), labels, 0)
        with phase(timing, "postprocess"):
            findings = segmentation_findings(
                expert=self.name, runner=self.runner, arg=arg, modality=item.modality, image=image,
                label_map=labels, affine=affine, names=self.names, window=self.window(item.modality),
                colours=self._colours(keep), image_max_side=self.image_max_side, min_size_ml=self.min_size_ml,
            )
            if group is not None:  # a multi-sequence case shows every sequence, as BRATS does
                captions = [SEQUENCE_CAPTIONS.get(c.lower(), c) for c in inp.volume.channels or item.channels]
                findings.images += sequence_pictures(group, affine, findings.images[0].slice or 0, self.image_max_side, captions,
                                                     like=findings.images[0])
            return as_truth(findings)

    def _colours(self, labels: list[int]) -> dict[int, str] | None:
        """Fixed colours where the options (or the BRATS preset) give them; None lets the
        table order decide."""
        if not self.colours:
            return None
        taken = {self.colours[label] for label in labels if label in self.colours}
        spare = iter(name for name, _ in COLOURS if name not in taken)
        return {label: self.colours.get(label) or next(spare, COLOURS[0][0]) for label in labels}

    def _display_channel(self, image: np.ndarray, channels: tuple[str, ...]) -> np.ndarray:
        if image.ndim == 3:
            return image
        if image.ndim != 4:
            raise ValueError(f"expected a volume (x, y, z) or a sequence group (x, y, z, c), got shape {image.shape}")
        choice = self.display_channel
        if isinstance(choice, str):
            if choice not in channels:
                raise ValueError(f"option 'display_channel' is {choice!r}, but this item's channels are {list(channels)}")
            choice = channels.index(choice)
        if not 0 <= choice < image.shape[3]:
            raise ValueError(f"option 'display_channel' is {choice}, but this item has {image.shape[3]} channels")
        return image[..., choice]

    def _image_2d(self, inp: ExpertInput, image: np.ndarray, label_array: np.ndarray | None,
                  table: dict[str, Any], arg: str, timing: dict[str, float]) -> Findings:
        item = inp.item
        with phase(timing, "preprocess"):
            gray = grayscale(image)
            wanted = set(arg_parts(arg)) - {"everything"}
        with phase(timing, "postprocess"):
            if label_array is not None:
                # A 2D mask: one axial "slice" on an LPS-pointing affine, so pictures keep the
                # stored orientation (rows down, columns right).
                if label_array.shape[:2] != gray.shape or label_array.size != gray.size:
                    raise ValueError(f"the 2D label map has shape {list(label_array.shape)}, the image {list(gray.shape)}")
                sx, sy = np.linalg.norm(np.asarray(inp.volume.affine)[:3, :2], axis=0)
                flat = np.diag([-float(sx), -float(sy), 1.0, 1.0])
                labels = integer_labels(label_array.reshape(gray.shape + (1,)))
                present = [int(v) for v in np.unique(labels) if v != 0]
                # With a labels table the argument picks classes; without, structures.
                keep = present if table else select_labels(arg, present, self.names, self.groups)
                labels = np.where(np.isin(labels, keep), labels, 0)
                findings = segmentation_findings(
                    expert=self.name, runner=self.runner, arg=arg, modality=item.modality, image=gray[..., None],
                    label_map=labels, affine=flat, names=self.names, window=self.window(item.modality),
                    colours=self._colours(keep), image_max_side=self.image_max_side,  # a 2D mask has no volume: no min size
                )
            else:
                picture = picture_2d(gray)
                findings = Findings(
                    expert=self.name, runner=self.runner, arg=arg, modality=item.modality,
                    images=[Image(kind="key_slice", png=encode_png(picture, self.image_max_side), caption="the image")],
                )
            for name, value in table.items():
                if wanted and name.lower() not in wanted:
                    continue
                present_flag = bool(int(value))
                findings.classes.append(ClassResult(name=name, probability=1.0 if present_flag else 0.0, present=present_flag, threshold=0.5))
        return as_truth(findings)


def as_truth(findings: Findings) -> Findings:
    """Ground truth is its own reference: `truth` repeats the structures and classes, and each
    picture's `truth` its `labels`, so templates and the grounding check read every expert's
    findings alike."""
    findings.truth = Truth(structures=list(findings.structures), classes=list(findings.classes))
    for img in findings.images:
        img.truth = list(img.labels)
    return findings
