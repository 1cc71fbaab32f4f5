"""Bundle folders, volumes and items for expert-runner tests.

Bundles are ordinary MONAI bundle folders on disk (`configs/metadata.json`,
`configs/inference.json`, `models/model.pt`), so runners read them through the same code as a
downloaded bundle. The VISTA3D and BRATS ones use the published configs (copies of
`../shared/reference/`, kept in `tests/data/reference/` so the tests run without the shared
folder; `test_vista3d.py` checks the copies are identical) with seeded random weights of the
real architectures.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curation.items import StudyItem, Volume

REFERENCE = Path(__file__).resolve().parent / "data" / "reference"


def random_state_dict(net: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded weights shaped like `net`'s, without running its initialisers (VISTA3D's take
    7 s): build the net on the meta device and pass it here. Kernels are uniform in
    ±1/sqrt(fan_in) (PyTorch's default bound), norm weights one, norm biases zero, other biases
    small. numpy's generator is used: about twice as fast as torch's here."""
    rng = np.random.default_rng(seed)
    out: dict[str, torch.Tensor] = {}
    for name, t in net.state_dict().items():
        if not t.dtype.is_floating_point:
            out[name] = torch.zeros(t.shape, dtype=t.dtype)
        elif t.dim() < 2 and "norm" in name:
            out[name] = torch.ones(t.shape, dtype=t.dtype) if name.endswith("weight") else torch.zeros(t.shape, dtype=t.dtype)
        else:
            values = rng.random(t.shape, dtype=np.float32)
            scale = 2 / math.sqrt(max(t.shape[1] * math.prod(t.shape[2:]), 1)) if t.dim() >= 2 else 0.1
            values -= 0.5
            values *= scale
            out[name] = torch.from_numpy(values).to(t.dtype)
    return out


def write_bundle(root: Path, *, inference: dict[str, Any] | Path, metadata: dict[str, Any] | Path, weights: dict[str, Any] | None) -> Path:
    """A bundle folder at `root`; configs given as dicts or copied from files; `weights`
    saved with `torch.save` as `models/model.pt` (None: no weights file)."""
    (root / "configs").mkdir(parents=True, exist_ok=True)
    for name, content in (("inference.json", inference), ("metadata.json", metadata)):
        if isinstance(content, Path):
            shutil.copyfile(content, root / "configs" / name)
        else:
            (root / "configs" / name).write_text(json.dumps(content, indent=1))
    if weights is not None:
        (root / "models").mkdir(exist_ok=True)
        torch.save(weights, root / "models" / "model.pt")
    return root


def vista3d_bundle(root: Path, *, seed: int = 0, weights: dict[str, Any] | None = None) -> Path:
    """The published VISTA3D configs with `vista3d132` weights (seeded random unless given).
    The weights file is 870 MB: build it once per session."""
    from monai.networks.nets import vista3d132

    if weights is None:
        with torch.device("meta"):
            net = vista3d132()
        weights = random_state_dict(net, seed)
    ref = REFERENCE / "vista3d"
    return write_bundle(root, inference=ref / "inference.json", metadata=ref / "metadata.json", weights=weights)


def brats_bundle(root: Path, *, seed: int = 0) -> Path:
    """The published BRATS configs with seeded random SegResNet weights (its `network_def`)."""
    from monai.networks.nets import SegResNet

    ref = REFERENCE / "brats_mri_segmentation"
    net_def = {k: v for k, v in json.loads((ref / "inference.json").read_text())["network_def"].items() if k != "_target_"}
    with torch.device("meta"):
        net = SegResNet(**net_def)
    return write_bundle(root, inference=ref / "inference.json", metadata=ref / "metadata.json", weights=random_state_dict(net, seed))


# A 1×1×1 convolution whose weights threshold the scaled intensity x ∈ 0…1: label 1 where
# 0.4 < x < 0.6, label 2 where x > 0.6 (HU 100…200 and above 200 with the window below).
THRESHOLD_WEIGHTS = {"conv.weight": torch.tensor([0.0, 10.0, 20.0]).reshape(3, 1, 1, 1, 1), "conv.bias": torch.tensor([0.0, -4.0, -10.0])}


def threshold_bundle(root: Path, *, spacing: float = 2.0, mode: str = "nearest", extra_transforms: list[dict[str, Any]] | None = None) -> Path:
    """A small segmentation bundle with known behaviour: RAS, resample to `spacing` mm
    (nearest by default: linear interpolation would blur a 300 HU organ's rim through the
    100…200 HU of label 1), window −100…400 HU → 0…1, a sliding window of 32³, softmax +
    argmax; labels 1 "liver", 2 "spleen"."""
    inference = {
        "imports": ["$import glob"],
        "bundle_root": ".",
        "image_key": "image",
        "device": "$torch.device('cpu')",
        "network_def": {"_target_": "monai.networks.blocks.Convolution", "spatial_dims": 3, "in_channels": 1, "out_channels": 3, "kernel_size": 1, "conv_only": True},
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key"},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "@image_key", "pixdim": [spacing] * 3, "mode": mode},
                {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": -100, "a_max": 400, "b_min": 0.0, "b_max": 1.0, "clip": True},
                *(extra_transforms or []),
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32], "sw_batch_size": 2, "overlap": 0.25},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            ],
        },
    }
    metadata = {
        "name": "threshold test bundle",
        "network_data_format": {
            "inputs": {"image": {"type": "image", "modality": "CT", "num_channels": 1, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "num_channels": 3, "channel_def": {"0": "background", "1": "liver", "2": "spleen"}}},
        },
    }
    return write_bundle(root, inference=inference, metadata=metadata, weights=THRESHOLD_WEIGHTS)


def _ellipsoid(shape: tuple[int, ...], centre: tuple[float, ...], radii: tuple[float, ...]) -> np.ndarray:
    grid = np.indices(shape, dtype=np.float32)
    return sum(((grid[i] - centre[i]) / radii[i]) ** 2 for i in range(3)) <= 1.0


def ct_volume(shape: tuple[int, int, int] = (40, 40, 30), spacing: tuple[float, float, float] = (1.8, 1.8, 2.4)) -> tuple[Volume, dict[str, np.ndarray]]:
    """A CT phantom in HU stored as DICOM-derived volumes often are (x and y axes pointing to
    the patient's left and posterior, affine diag(−sx, −sy, sz)): air, a 40 HU body, an organ
    at 150 HU and one at 300 HU. Returns the volume and its masks by name."""
    hu = np.full(shape, -1000.0, np.float32)
    body = _ellipsoid(shape, tuple(s / 2 for s in shape), (shape[0] * 0.42, shape[1] * 0.36, shape[2] * 0.45))
    organ_a = _ellipsoid(shape, (shape[0] * 0.3, shape[1] * 0.5, shape[2] * 0.5), (6, 5, 5))
    organ_b = _ellipsoid(shape, (shape[0] * 0.72, shape[1] * 0.5, shape[2] * 0.5), (4, 4, 4))
    hu[body] = 40.0
    hu[organ_a] = 150.0
    hu[organ_b] = 300.0
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    affine[:3, 3] = [spacing[0] * shape[0] / 2, spacing[1] * shape[1] / 2, -spacing[2] * shape[2] / 2]
    return Volume(array=hu, affine=affine), {"body": body, "organ_a": organ_a, "organ_b": organ_b}


def mr_group_volume(shape: tuple[int, int, int] = (48, 48, 48), channels: tuple[str, ...] = ("t1c", "t1", "t2", "flair"), seed: int = 0) -> Volume:
    """A 4-sequence brain phantom at 1 mm, zero outside the head, with a bright lesion."""
    rng = np.random.default_rng(seed)
    head = _ellipsoid(shape, tuple(s / 2 for s in shape), tuple(s * 0.42 for s in shape))
    lesion = _ellipsoid(shape, (shape[0] * 0.6, shape[1] * 0.45, shape[2] * 0.5), (6, 6, 5))
    sequences = []
    for i, _ in enumerate(channels):
        img = np.where(head, 300.0 + 40 * i, 0.0) + np.where(lesion, 200.0 * (1 + i % 2), 0.0)
        sequences.append((img + rng.normal(0, 10, shape) * head).astype(np.float32))
    return Volume(array=np.stack(sequences, axis=-1), affine=np.diag([1.0, 1.0, 1.0, 1.0]), channels=tuple(channels))


def study_item(volume: Volume, *, item_id: str = "item-1", kind: str = "nifti", modality: str = "CT") -> StudyItem:
    spacing = [float(v) for v in np.linalg.norm(volume.affine[:3, :3], axis=0)]
    return StudyItem(
        item_id=item_id,
        patient_key=f"patient-{item_id}",
        study_key=f"study-{item_id}",
        source="test",
        kind=kind,  # type: ignore[arg-type]
        modality=modality,
        shape=list(volume.array.shape[:3]),
        spacing=spacing,
        n_files=max(1, len(volume.channels)),
        uris=[f"{item_id}_{c}.nii.gz" for c in volume.channels] or [f"{item_id}.nii.gz"],
        channels=list(volume.channels),
    )
