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
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, ContextManager

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from curation.errors import CurationError, validation_message
from curation.manifest import ExpertSpec
from expert_runners.base import ExpertRunner
from expert_runners.bundle import Bundle, TransformStep, warn_ignored

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
    from monai.inferers import sliding_window_inference

    with torch.no_grad(), autocast(device, amp):
        out = sliding_window_inference(image[None].to(device), roi, sw_batch_size, net, overlap=overlap, **kwargs)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"the network returned a {type(out).__name__}; bundle runners take networks with one output tensor")
    return out.float().cpu()


class BundleRunner(ExpertRunner):
    """A runner over a local MONAI bundle: its files are the fingerprint, and its network is
    built once per worker in `setup`. Subclasses set `self.bundle` in `__init__`."""

    bundle: Bundle
    net: torch.nn.Module | None = None

    def weight_files(self) -> list[Path]:
        return self.bundle.weight_files()

    def setup(self, device: str = "cpu") -> None:
        self.device = device
        self.net = self.bundle.build_network(device)
        warn_ignored(self.bundle, self.name)
