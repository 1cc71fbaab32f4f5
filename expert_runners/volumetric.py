"""What the MONAI-bundle runners share: options, input tensors, the bundle's preprocessing
rebuilt as MONAI transforms, sliding-window inference, and the way back to the item's grid.

The way back: preprocessing runs on a `MetaTensor` carrying the item's RAS affine, so each
invertible transform (Spacingd, Orientationd, CropForegroundd, padding) records what it did;
the prediction is then sent back through MONAI's `Invertd` with the image's record — the same
mechanism the bundles' own `Invertd` postprocessing uses. Label maps come back with nearest
neighbour, so the result has exactly the item's shape and affine.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, ContextManager

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from curation.errors import CurationError, validation_message
from curation.manifest import ExpertSpec
from expert_runners.base import ExpertRunner, phase
from expert_runners.bundle import Bundle, TransformStep, warn_ignored

if TYPE_CHECKING:  # pragma: no cover - torch is imported where it is used (runners import without it)
    import torch

KEY = "image"


class InferenceOptions(BaseModel):
    """Manifest `options:` every bundle runner accepts (each overrides the bundle's config).

    - `patch_size`: sliding-window ROI, one int or three (the bundle's `inferer#roi_size` /
      `patch_size` otherwise) — a smaller one is faster and uses less memory, at some accuracy
    - `sw_batch_size`: windows per forward pass (bundle's `inferer#sw_batch_size`, else 1)
    - `overlap`: window overlap 0…<1 (bundle's `inferer#overlap`, else 0.25)
    - `amp`: mixed precision on CUDA (bundle's `evaluator#amp`/`amp`, else true); never on CPU
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    patch_size: list[int] | None = None
    sw_batch_size: int | None = Field(None, ge=1)
    overlap: float | None = Field(None, ge=0, lt=1)
    amp: bool | None = None

    @field_validator("patch_size", mode="before")
    @classmethod
    def _three(cls, v: Any) -> Any:
        if isinstance(v, int):
            v = [v, v, v]
        if v is not None and (not isinstance(v, (list, tuple)) or len(v) != 3 or any(not isinstance(p, int) or p < 1 for p in v)):
            raise ValueError("patch_size is one positive int or a list of three")
        return v


def parse_options(spec: ExpertSpec, model: type[InferenceOptions]) -> Any:
    """Validate the manifest's `options:` for this runner; a bad key is one `CurationError`."""
    try:
        return model.model_validate(spec.options)
    except ValidationError as e:
        message = validation_message(e, prefix="options.", unknown="unknown option", show_input=False)
        raise CurationError(f"expert {spec.name!r} (runner {spec.runner}): {message} (valid options: {', '.join(model.model_fields)})") from None


def to_meta_tensor(array: np.ndarray, affine: np.ndarray) -> Any:
    """(x, y, z) or (x, y, z, c) numpy → channel-first float32 MetaTensor with the RAS affine."""
    import torch
    from monai.data import MetaTensor

    data = np.asarray(array, dtype=np.float32)
    data = data[None] if data.ndim == 3 else np.moveaxis(data, -1, 0)
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(data)), affine=torch.as_tensor(affine, dtype=torch.float64), meta={"space": "RAS"})


def build_preprocessing(steps: list[TransformStep], special: dict[str, Callable[..., Any]] | None = None) -> Any:
    """The bundle's honoured preprocessing as a MONAI `Compose` on key `image`, in the bundle's
    order. `special` supplies transforms for marker steps (VISTA3D's `VistaPreTransformd`);
    marker steps without one are skipped."""
    from monai import transforms as mt

    out: list[Any] = []
    for step in steps:
        if step.name == "VistaPreTransformd":
            if special and step.name in special:
                out.append(special[step.name])
            continue
        cls = getattr(mt, step.name)
        args = dict(step.args)
        if step.name == "CropForegroundd":
            args["source_key"] = KEY
        if step.name == "Orientationd":
            args["labels"] = None  # use the MetaTensor's space (RAS), MONAI's coming default
        out.append(cls(keys=KEY, **args))
    return mt.Compose(out)


def invert(pre: Any, data: dict[str, Any], pred: torch.Tensor, *, nearest: bool) -> torch.Tensor:
    """`pred` (channel-first, on the preprocessed grid) back on the input's grid through the
    record of `pre` kept on `data["image"]`."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Invertd

    if not data[KEY].applied_operations:  # nothing moved the voxels (BRATS: intensity only)
        return torch.as_tensor(pred).detach().cpu()
    if not isinstance(pred, MetaTensor):
        pred = MetaTensor(pred, affine=data[KEY].affine)
    payload: dict[Any, Any] = {**data, "pred": pred}
    out = Invertd(keys="pred", transform=pre, orig_keys=KEY, nearest_interp=nearest, to_tensor=True)(payload)
    return torch.as_tensor(out["pred"]).detach().cpu()


def window_size(shape: tuple[int, ...], patch: list[int] | None, *, multiple: int = 1, minimum: int = 1) -> list[int]:
    """The sliding-window ROI: the patch clipped to the volume rounded up to `multiple` (and
    at least `minimum`: what the network's down-sampling needs); the whole volume, so rounded,
    when there is no patch. The inferer pads a volume smaller than the window.

    >>> window_size((48, 40, 200), [128, 128, 128], multiple=16, minimum=32)
    [48, 48, 128]
    >>> window_size((20, 60, 9), None, multiple=8, minimum=16)
    [24, 64, 16]
    """
    shape = tuple(max(minimum, int(math.ceil(s / multiple) * multiple)) for s in shape)
    if patch is None:
        return list(shape)
    return [min(p, s) for p, s in zip(patch, shape)]


def autocast(device: str, amp: bool) -> ContextManager[Any]:
    """Mixed precision on CUDA when asked; nothing on CPU."""
    import torch

    if amp and device.startswith("cuda"):
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


def sliding_window(
    net: torch.nn.Module,
    image: torch.Tensor,
    *,
    roi: list[int],
    sw_batch_size: int,
    overlap: float,
    device: str,
    amp: bool,
    **kwargs: Any,
) -> torch.Tensor:
    """`monai.inferers.sliding_window_inference` on a channel-first image; float32 logits
    `[1, C, x, y, z]` on the CPU. Runs under `torch.no_grad()` (not inference mode: MONAI's
    VISTA3D post-transform edits tensors in place)."""
    import torch
    from monai.inferers import sliding_window_inference

    with torch.no_grad(), autocast(device, amp):
        out = sliding_window_inference(image[None].to(device), roi, sw_batch_size, net, overlap=overlap, **kwargs)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the network returned a {type(out).__name__}; bundle runners take networks with one output tensor")
    return out.float().cpu()


def preprocess(steps: list[TransformStep], array: np.ndarray, affine: np.ndarray, *,
               special: dict[str, Callable[..., Any]] | None = None, extra: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """(the bundle's preprocessing as a `Compose`, its output) for one item: the input as a
    MetaTensor under key `image`, plus any `extra` keys the transforms read (VISTA3D's
    `label_prompt`). The output's `image` records what was done, for `invert`."""
    pre = build_preprocessing(steps, special)
    return pre, pre({KEY: to_meta_tensor(array, affine), **(extra or {})})


class BundleRunner(ExpertRunner):
    """A runner over a local MONAI bundle: its files are the fingerprint, its network is built
    once per worker in `setup`, and every item goes through one skeleton, `segment_array`:

        load (once) → preprocess (the bundle's transforms) → infer (sliding window)
                    → postprocess (the runner's own: activation, labels, back to the item's grid)

    each step timed under its name. A subclass validates its options in `__init__` (setting
    `self.bundle` and `self.options`), and fills the hooks: `postprocess` (required),
    `infer` (default: `sliding_window` with the bundle's window) and `preprocess_inputs`
    (default: none). `DOWNSAMPLE` is how often the network halves the grid: windows are rounded
    up to a multiple of it, and are at least twice it (the bottom of the network needs more
    than one voxel).
    """

    PROVIDES: ClassVar[frozenset[str] | None] = frozenset({"structures", "key_slice", "overlay"})
    DOWNSAMPLE: ClassVar[int] = 1
    bundle: Bundle
    options: InferenceOptions
    net: torch.nn.Module | None = None

    def weight_files(self) -> list[Path]:
        return self.bundle.weight_files()

    def setup(self, device: str = "cpu") -> None:
        self.device = device
        self.net = self.bundle.build_network(device)
        warn_ignored(self.bundle, self.name)

    def sliding_settings(self) -> dict[str, Any]:
        """Sliding-window settings: the manifest's options over the bundle's values."""
        opts, bundle = self.options, self.bundle
        return {
            "sw_batch_size": opts.sw_batch_size or bundle.sw_batch_size,
            "overlap": bundle.overlap if opts.overlap is None else opts.overlap,
            "device": self.device,
            "amp": bundle.amp if opts.amp is None else opts.amp,
        }

    def roi(self, shape: tuple[int, ...]) -> list[int]:
        """The window for a preprocessed image of spatial `shape`."""
        minimum = 2 * self.DOWNSAMPLE if self.DOWNSAMPLE > 1 else 1
        return window_size(shape, self.options.patch_size or self.bundle.patch_size, multiple=self.DOWNSAMPLE, minimum=minimum)

    def segment_array(self, array: np.ndarray, affine: np.ndarray, timing: dict[str, float] | None = None,
                      **context: Any) -> np.ndarray:
        """The label map on the grid of `array` ((x, y, z) or (x, y, z, c)), through the skeleton
        above; `context` is passed to the hooks (VISTA3D: the class prompt)."""
        timing = {} if timing is None else timing
        if self.net is None:
            with phase(timing, "load"):
                self.setup(self.device)
        with phase(timing, "preprocess"):
            special, extra = self.preprocess_inputs(**context)
            pre, data = preprocess(self.bundle.preprocessing, array, affine, special=special, extra=extra)
        with phase(timing, "inference"):
            logits = self.infer(data[KEY], **context)
        with phase(timing, "postprocess"):
            label_map = self.postprocess(logits, pre, data, **context)
        if label_map.shape != array.shape[:3]:
            raise RuntimeError(f"label map {label_map.shape} did not come back to the item's grid {array.shape[:3]}")
        return label_map

    def preprocess_inputs(self, **context: Any) -> tuple[dict[str, Callable[..., Any]] | None, dict[str, Any] | None]:
        """(transforms for the bundle's marker steps, extra input keys) for one item."""
        return None, None

    def infer(self, image: torch.Tensor, **context: Any) -> torch.Tensor:
        """Logits `[1, C, x, y, z]` of the preprocessed image (channel-first)."""
        assert self.net is not None
        return sliding_window(self.net, image, roi=self.roi(tuple(image.shape[1:])), **self.sliding_settings())

    @abstractmethod
    def postprocess(self, logits: torch.Tensor, pre: Any, data: dict[str, Any], **context: Any) -> np.ndarray:
        """The label map on the item's grid from the logits (`invert` through `pre`/`data`)."""
