"""`vista3d`: VISTA3D class-prompt segmentation of CT from a local MONAI bundle folder.

Runs MONAI's own VISTA3D code the way the bundle's `inference.json` does, but without its
`scripts/` package (which bundles ship as code next to the config):

1. the bundle's preprocessing, rebuilt from its config in its order (VISTA3D: `Spacingd` to
   1.5 mm bilinear, `CropForegroundd` margin 10, `VistaPreTransformd`, `ScaleIntensityRanged`
   −963.8…1053.7 HU → 0…1 clipped, `Orientationd` RAS);
2. the argument (VILA-M3's `<VISTA3D(arg)>`) becomes the class prompt: a group of
   `data/vista3d_label_groups.json`, "everything" (or "") = the bundle's `everything_labels`;
   `VistaPreTransformd(subclass=…)` expands subclass keys (lung 20 → its five lobes, …) and
   repeats are dropped;
3. `sliding_window_inference(…, with_coord=True, transpose=True, class_vector=prompt)` with the
   bundle's patch size and overlap, under `torch.no_grad()` (autocast on CUDA), then
   `VistaPostTransformd` → one channel of VISTA3D label ids;
4. `Invertd` (nearest neighbour) back to the item's own grid, then `segmentation_findings`
   with VISTA3D's names and the CT soft-tissue window.

Manifest:

```yaml
experts:
  - name: VISTA3D
    runner: vista3d
    bundle: models/vista3d          # configs/metadata.json, configs/inference.json, models/model.pt
    options:                        # all optional; see volumetric.InferenceOptions
      patch_size: 96                # sliding-window ROI (bundle: 128³)
      sw_batch_size: 1
      overlap: 0.3
      amp: true                     # CUDA only
      window: soft_tissue           # CT window of the pictures: soft_tissue, lung or bone
```

Label names: the published VISTA3D names (`data/vista3d_labels.json`) overridden by the
bundle's metadata `channel_def`. A bundle without `everything_labels` or `subclass` uses the
published ones (below).

A bundle whose `network_def` is not a VISTA3D (our demo bundles: small networks trained on
phantoms) is taken as an ordinary segmentation network whose output channel k is VISTA3D
label k: argmax, then only the labels of the argument's prompt (before and after subclass
expansion) are kept. Everything else — preprocessing, names, findings — is the same.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from curation.errors import CurationError
from curation.expert_args import canonical_arg
from curation.findings import Findings
from curation.imaging import CT_WINDOWS
from curation.items import Volume
from curation.manifest import ExpertSpec
from expert_runners.base import ExpertInput, phase
from expert_runners.bundle import read_bundle
from expert_runners.labels import DEFAULT_EVERYTHING, truth_map
from expert_runners.segmentation import segmentation_findings
from expert_runners.volumetric import KEY, BundleRunner, InferenceOptions, invert, parse_options, sliding_window, window_size

if TYPE_CHECKING:  # pragma: no cover
    import torch

# The published bundle's values, used when a bundle's config lacks them (`everything`: in
# expert_runners.labels, which templates' vocabulary reads without importing torch).
DEFAULT_SUBCLASS: dict[str, list[int]] = {
    "2": [14, 5],
    "20": [28, 29, 30, 31, 32],
    "21": list(range(33, 57)) + list(range(63, 98)) + [114, 120, 122],
}
# SegResNetDS2 in vista3d132 halves the grid four times (and InstanceNorm needs more than one
# voxel at the bottom, so a window is at least 32).
DOWNSAMPLE = 16


class Vista3DOptions(InferenceOptions):
    window: str = "soft_tissue"


def _package_json(name: str) -> Any:
    return json.loads(resources.files("expert_runners").joinpath("data", name).read_text())


def label_groups() -> dict[str, list[int]]:
    """VILA-M3's argument groups: name → VISTA3D label ids ("everything" is not a list there).

    >>> label_groups()["hepatic tumor"]
    [1, 26]
    """
    return {name: [int(v) for v in ids.values()] for name, ids in _package_json("vista3d_label_groups.json").items() if isinstance(ids, dict)}


class Vista3DRunner(BundleRunner):
    runner: ClassVar[str] = "vista3d"
    thread_safe: ClassVar[bool] = True  # its one memo (`_last_argmax`) is read once per call and replaced whole
    modalities: ClassVar[tuple[str, ...]] = ("CT",)
    kinds: ClassVar[tuple[str, ...]] = ("dicom", "nifti")
    DOWNSAMPLE: ClassVar[int] = DOWNSAMPLE

    def __init__(self, spec: ExpertSpec, *, image_max_side: int = 512):
        super().__init__(spec, image_max_side=image_max_side)
        if spec.bundle is None:
            raise CurationError(f"expert {spec.name!r} (runner vista3d): set `bundle:` to a local VISTA3D bundle folder")
        self.options: Vista3DOptions = parse_options(spec, Vista3DOptions)
        if self.options.window not in CT_WINDOWS:
            raise CurationError(f"expert {spec.name!r}: options.window {self.options.window!r} is not one of {sorted(CT_WINDOWS)}")
        if self.options.patch_size and any(p % DOWNSAMPLE or p < 2 * DOWNSAMPLE for p in self.options.patch_size):
            raise CurationError(
                f"expert {spec.name!r}: options.patch_size {self.options.patch_size} must be multiples of {DOWNSAMPLE}, "
                f"at least {2 * DOWNSAMPLE} (VISTA3D's encoder halves the grid four times)"
            )
        self.bundle = read_bundle(spec.bundle, extra_keys=("everything_labels", "subclass"))
        names = {int(k): v for k, v in _package_json("vista3d_labels.json").items()} | self.bundle.label_names
        if not any(step.name == "ScaleIntensityRanged" for step in self.bundle.preprocessing):
            raise CurationError(
                f"{self.bundle.config_file}: no ScaleIntensityRanged in `preprocessing`; VISTA3D needs its HU window "
                "(the published bundle scales −963.8…1053.7 HU to 0…1)"
            )
        self.names = {k: v for k, v in names.items() if k != 0}
        self.everything = [int(v) for v in self.bundle.values.get("everything_labels") or DEFAULT_EVERYTHING]
        self.subclass = {str(k): [int(i) for i in v] for k, v in (self.bundle.values.get("subclass") or DEFAULT_SUBCLASS).items()}
        self.groups = label_groups()
        self.net: torch.nn.Module | None = None
        self.prompted = True  # a VISTA3D network takes class prompts; known after setup
        # (volume, preprocessing, its output, argmax) of the last item a plain network ran on
        self._last_argmax: tuple[Volume, Any, dict[str, Any], torch.Tensor] | None = None

    def setup(self, device: str = "cpu") -> None:
        from monai.networks.nets.vista3d import VISTA3D

        super().setup(device)
        self.prompted = isinstance(self.net, VISTA3D)

    def arguments(self) -> list[str]:
        """The arguments the VLM may write in `<VISTA3D(arg)>`."""
        return ["everything", *self.groups]

    def prompt(self, arg: str) -> tuple[str, list[int]]:
        """(normalised argument, class prompt before subclass expansion); ValueError if unknown.

        "" means everything, as in VILA-M3.
        """
        arg = canonical_arg(arg) or "everything"
        if arg == "everything":
            return arg, list(self.everything)
        if arg not in self.groups:
            raise ValueError(f"unknown {self.name} argument {arg!r}; use one of: {', '.join(self.arguments())}")
        return arg, list(self.groups[arg])

    def vocabulary(self, arg: str) -> list[str] | None:
        """The names of the argument's classes (subclass keys expanded, as the network reports
        them), among those the bundle names."""
        try:
            _, prompt = self.prompt(arg)
        except ValueError:
            return None
        return sorted({self.names[i] for i in self.label_ids(prompt) if i in self.names})

    def label_ids(self, prompt: list[int]) -> set[int]:
        """The label ids a class prompt can give: the prompt and its subclass expansions."""
        return {*prompt, *(i for p in prompt for i in self.subclass.get(str(p), []))}

    def predict(self, inp: ExpertInput, arg: str, timing: dict[str, float]) -> Findings:
        arg, prompt = self.prompt(arg)
        volume = inp.volume
        label_map = self.segment(volume, prompt, timing)
        with phase(timing, "postprocess"):
            return segmentation_findings(
                expert=self.name,
                runner=self.runner,
                arg=arg,
                modality=inp.item.modality,
                image=volume.array,
                label_map=label_map,
                affine=volume.affine,
                names=self.names,
                window=self.options.window,
                image_max_side=self.image_max_side,
                min_size_ml=self.min_size_ml,
                truth_map=truth_map(inp, keep=sorted(self.label_ids(prompt))),
            )

    def segment(self, volume: Volume, prompt: list[int], timing: dict[str, float] | None = None) -> np.ndarray:
        """VISTA3D label ids (int16) on the volume's own grid for a class prompt (before
        subclass expansion, as `prompt()` gives it)."""
        from monai.apps.vista3d.transforms import VistaPreTransformd

        timing = {} if timing is None else timing
        if volume.array.ndim != 3:
            raise ValueError(f"{self.name} takes one 3D volume, got an array of shape {volume.array.shape}")
        vista_pre = VistaPreTransformd(keys=KEY, subclass=self.subclass, labels_dict={str(k): v for k, v in self.names.items()})
        # subclasses expanded, repeats dropped
        classes = list(dict.fromkeys(int(c) for c in vista_pre({"label_prompt": list(prompt)})["label_prompt"]))
        last = self._last_argmax  # read once: an expert host may run this runner in several threads
        if not self.prompted and last is not None and last[0] is volume:
            # a plain network's output does not depend on the prompt: the build asks for several
            # groups of one item in a row (everything, organs, hepatic tumor), so run it once
            _, pre, data, argmax = last
            with phase(timing, "postprocess"):
                return self._plain_labels(pre, data, argmax, prompt, classes)
        return self.segment_array(volume.array, volume.affine, timing, volume=volume, vista_pre=vista_pre, prompt=prompt, classes=classes)

    def preprocess_inputs(self, *, vista_pre: Any, prompt: list[int], **_: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"VistaPreTransformd": vista_pre}, {"label_prompt": list(prompt)}

    def infer(self, image: torch.Tensor, *, classes: list[int], **_: Any) -> torch.Tensor:
        assert self.net is not None
        patch = self.options.patch_size or self.bundle.patch_size
        if not self.prompted:  # an ordinary network over the whole label set
            return sliding_window(self.net, image, roi=window_size(tuple(image.shape[1:]), patch), **self.sliding_settings())
        import torch

        # [B, 1]: the same logits as [B] without InstanceNorm1d's "size at dim=0" warning
        class_vector = torch.tensor(classes, dtype=torch.long, device=self.device)[:, None]
        return sliding_window(self.net, image, roi=self.roi(tuple(image.shape[1:])), with_coord=True, transpose=True,
                              class_vector=class_vector, **self.sliding_settings())

    def postprocess(self, logits: torch.Tensor, pre: Any, data: dict[str, Any], *, volume: Volume, prompt: list[int],
                    classes: list[int], **_: Any) -> np.ndarray:
        import torch

        if not self.prompted:  # channel k is label k
            argmax = logits[0].argmax(0, keepdim=True)
            self._last_argmax = (volume, pre, data, argmax)
            return self._plain_labels(pre, data, argmax, prompt, classes)
        from monai.apps.vista3d.transforms import VistaPostTransformd

        with torch.no_grad():
            pred = VistaPostTransformd(keys="pred")({"pred": logits[0], "label_prompt": torch.tensor(classes)})["pred"]
        return self._on_item_grid(pre, data, pred)

    def _plain_labels(self, pre: Any, data: dict[str, Any], argmax: torch.Tensor, prompt: list[int], classes: list[int]) -> np.ndarray:
        """A plain network's argmax with only the labels asked for kept, on the item's grid."""
        import torch

        pred = argmax.clone()
        pred[~torch.isin(pred, torch.tensor(sorted(set(prompt) | set(classes))))] = 0
        return self._on_item_grid(pre, data, pred.float())

    @staticmethod
    def _on_item_grid(pre: Any, data: dict[str, Any], pred: torch.Tensor) -> np.ndarray:
        import torch

        pred = invert(pre, data, pred, nearest=True)
        return np.rint(torch.nan_to_num(pred[0], nan=0.0).numpy()).astype(np.int16)
