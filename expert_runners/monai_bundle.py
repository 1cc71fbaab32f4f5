"""`monai_bundle`: any other local 3D segmentation bundle, findings named by its `channel_def`.

What is read from the bundle (see `bundle.py` for how):

- the network: `network_def` (a `_target_` component or a `$` expression) + `models/model.pt`;
- preprocessing, in the config's order, from `preprocessing.transforms` (a list, or a
  `"$@name"` reference to one) or `preprocessing_transforms`: `Spacingd`, `Orientationd`,
  `CropForegroundd` (on the image), `ScaleIntensityRanged`, `ScaleIntensityd`,
  `NormalizeIntensityd`, `DivisiblePadd` and `SpatialPadd` are applied with their arguments;
  loading/typing steps are not needed; anything else (and any argument we do not pass on) is
  listed in `Bundle.ignored` and warned about once at `setup` — random augmentations,
  `Lambdad`, bundle `scripts.*` code, label-only steps;
- inference: `inferer#roi_size` (or `patch_size`) as a sliding window with
  `inferer#sw_batch_size` and `inferer#overlap`; no ROI means the whole volume at once;
- output: `softmax` (argmax over channels; channel k is label k, 0 is background) unless the
  postprocessing has a sigmoid `Activationsd` and no argmax `AsDiscreted` — then each channel
  is thresholded and channel k paints label k + 1 (a later channel wins where several are on);
- names: metadata `network_data_format.outputs.pred.channel_def` (unnamed labels read
  "label <id>"); modality: `network_data_format.inputs.image.modality`.

Input channels are passed in the item's order (a group's channels are not matched by name
against the metadata's input `channel_def`; only their number is checked). Not supported: 2D bundles, networks that need more than the image (prompts, points), outputs
other than one segmentation tensor, bundle-specific postprocessing (`Lambdad`, connected-
component filtering). The prediction goes back to the item's grid through MONAI's `Invertd`.

Manifest:

```yaml
experts:
  - name: SpleenCT
    runner: monai_bundle
    bundle: models/spleen_ct_segmentation
    options:                      # all optional; plus patch_size, sw_batch_size, overlap, amp
      activation: softmax         # or sigmoid: overrides what the postprocessing implies
      threshold: 0.5              # sigmoid only
      labels: {1: spleen}         # id → name, over the channel_def
      modalities: [CT]            # items accepted (default: the metadata's input modality; [] = any)
      window: auto                # picture window: auto (soft_tissue for CT, else percentile),
                                  # soft_tissue, lung, bone, or null (percentile normalisation)
```
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
from pydantic import Field

from curation.errors import CurationError, ItemError
from curation.findings import Findings
from curation.imaging import CT_WINDOWS
from curation.items import Volume
from curation.manifest import ExpertSpec
from expert_runners.base import ExpertInput, phase
from expert_runners.bundle import read_bundle
from expert_runners.segmentation import segmentation_findings
from expert_runners.volumetric import BundleRunner, InferenceOptions, invert, parse_options

if TYPE_CHECKING:  # pragma: no cover
    import torch

class MonaiBundleOptions(InferenceOptions):
    activation: Literal["softmax", "sigmoid"] | None = None
    threshold: float = Field(0.5, gt=0, lt=1)
    labels: dict[int, str] = {}
    modalities: list[str] | None = None
    window: str | None = "auto"


class MonaiBundleRunner(BundleRunner):
    runner: ClassVar[str] = "monai_bundle"
    thread_safe: ClassVar[bool] = True  # no state kept between calls (an expert host runs it in threads)
    modalities: ClassVar[tuple[str, ...]] = ()
    kinds: ClassVar[tuple[str, ...]] = ("dicom", "nifti", "nifti_group")

    def __init__(self, spec: ExpertSpec, *, image_max_side: int = 512):
        super().__init__(spec, image_max_side=image_max_side)
        if spec.bundle is None:
            raise CurationError(f"expert {spec.name!r} (runner monai_bundle): set `bundle:` to a local MONAI bundle folder")
        self.options: MonaiBundleOptions = parse_options(spec, MonaiBundleOptions)
        self.bundle = read_bundle(spec.bundle)
        opts = self.options
        modality = (self.bundle.modality or "").upper()
        # an instance attribute: which items this bundle accepts is the bundle's business
        self.modalities = tuple(opts.modalities) if opts.modalities is not None else ((modality,) if modality else ())  # type: ignore[misc]
        self.activation = opts.activation or self.bundle.activation
        if self.activation == "sigmoid":  # channel k paints label k + 1
            names = {k + 1: v for k, v in self.bundle.label_names.items()}
        else:  # channel k is label k; 0 is background
            names = {k: v for k, v in self.bundle.label_names.items() if k != 0}
        self.names = names | opts.labels
        if opts.window == "auto":
            self.window = "soft_tissue" if modality == "CT" else None
        elif opts.window is None or opts.window in CT_WINDOWS:
            self.window = opts.window
        else:
            raise CurationError(f"expert {spec.name!r}: options.window {opts.window!r} is not one of {sorted(CT_WINDOWS)} or null")
        self.net: torch.nn.Module | None = None

    def predict(self, inp: ExpertInput, arg: str, timing: dict[str, float]) -> Findings:
        volume, item, bundle = inp.volume, inp.item, self.bundle
        array = volume.array
        channels = 1 if array.ndim == 3 else array.shape[-1] if array.ndim == 4 else None
        if channels != bundle.input_channels:
            raise ItemError(
                item.item_id,
                f"{self.name} takes a 3D volume with {bundle.input_channels} channel(s) (bundle metadata `num_channels`), got shape {array.shape}",
            )
        label_map = self.segment(volume, timing)
        with phase(timing, "postprocess"):
            return segmentation_findings(
                expert=self.name,
                runner=self.runner,
                arg=arg.strip(),
                modality=item.modality,
                image=array if array.ndim == 3 else array[..., 0],
                label_map=label_map,
                affine=volume.affine,
                names=self.names,
                window=self.window,
                image_max_side=self.image_max_side,
                min_size_ml=self.min_size_ml,
            )

    def vocabulary(self, arg: str) -> list[str] | None:
        return sorted(self.names.values())

    def segment(self, volume: Volume, timing: dict[str, float] | None = None) -> np.ndarray:
        """The label map (int16) on the volume's own grid."""
        return self.segment_array(volume.array, volume.affine, timing)

    def postprocess(self, logits: torch.Tensor, pre: Any, data: dict[str, Any], **_: Any) -> np.ndarray:
        """Sigmoid (channel k → label k + 1, a later channel winning) or argmax, then back to
        the item's grid (nearest neighbour)."""
        import torch

        logits = logits[0]
        if self.activation == "sigmoid":
            on = (torch.sigmoid(logits) > self.options.threshold).numpy()
            labels = np.zeros(on.shape[1:], np.int16)
            for k in range(on.shape[0]):
                labels[on[k]] = k + 1
        else:
            labels = logits.argmax(0).numpy().astype(np.int16)
        back = invert(pre, data, torch.from_numpy(labels[None]).float(), nearest=True)
        return np.rint(back[0].numpy()).astype(np.int16)
