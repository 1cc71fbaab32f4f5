"""`brats_demo`: a BRATS-like SegResNet for the brain phantoms, for the `brats` runner.

The published BRATS bundle's design at a demo's size: four input channels (T1c, T1, T2, FLAIR),
channel-wise `NormalizeIntensityd` over non-zero voxels as its only preprocessing, three sigmoid
outputs — tumour core (1 ∪ 4), whole tumour (1 ∪ 2 ∪ 4), enhancing tumour (4) — that the runner
thresholds at 0.5 and turns into labels 4/1/2 as the bundle's postprocessing does. The network is
its SegResNet with `init_filters` 8 instead of 16 and `blocks_down` [1, 2, 2, 2] instead of
[1, 2, 2, 4], without dropout; trained on random 64³ crops (two in three centred on the tumour
when there is one) with Dice + BCE, as the bundle trains on crops and infers on whole volumes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from curation.demo import SEQUENCES, brain_phantom
from curation.demo.brain import BRAIN_SHAPE, BRAIN_SPACING
from expert_runners.bundle import TransformStep
from expert_runners.demo_training.common import (Progress, cosine_lr, half_state_dict, metadata, seed_everything,
                                                 training_record, write_bundle_folder)
from expert_runners.volumetric import KEY, build_preprocessing, to_meta_tensor

NAME = "brats_demo"
REGIONS = {"TC": (1, 4), "WT": (1, 2, 4), "ET": (4,)}  # output channels, in the bundle's order
STEPS = [TransformStep("NormalizeIntensityd", {"nonzero": True, "channel_wise": True})]
NETWORK: dict[str, Any] = {"blocks_down": [1, 2, 2, 2], "blocks_up": [1, 1, 1], "init_filters": 8, "in_channels": 4, "out_channels": 3}
CROP = 64
TRAIN_STEPS = 200
LEARNING_RATE = 3e-3


def network() -> torch.nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(spatial_dims=3, **NETWORK)


def targets(seg: np.ndarray) -> np.ndarray:
    """BraTS labels (0/1/2/4) → three binary channels TC, WT, ET (float32).

    >>> targets(np.array([[[0, 1, 2, 4]]]))[:, 0, 0].tolist()
    [[0.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]]
    """
    return np.stack([np.isin(seg, ids) for ids in REGIONS.values()]).astype(np.float32)


def training_case(seed: int, case: int, pre: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(normalised sequences [4, x, y, z], targets [3, x, y, z]) of brain phantom `case`."""
    p = brain_phantom(seed, case)
    array = np.stack([p.images[s] for s in SEQUENCES], axis=-1).astype(np.float32)
    image = pre({KEY: to_meta_tensor(array, p.affine)})[KEY].as_tensor().float()
    return image.contiguous(), torch.from_numpy(targets(p.seg))


def crop_start(rng: np.random.Generator, target: torch.Tensor) -> tuple[int, int, int]:
    """Corner of a `CROP`³ window: centred (± 8 voxels) on a tumour voxel two times in three
    when there is a tumour, anywhere otherwise."""
    shape = target.shape[1:]
    voxels = torch.nonzero(target[1]) if rng.random() < 2 / 3 else torch.empty(0)
    if len(voxels):
        centre = voxels[int(rng.integers(len(voxels)))].numpy() + rng.integers(-8, 9, size=3)
    else:
        centre = np.array([int(rng.integers(CROP // 2, s - CROP // 2 + 1)) for s in shape])
    return tuple(int(np.clip(c - CROP // 2, 0, s - CROP)) for c, s in zip(centre, shape))  # type: ignore[return-value]


def train(out: Path, *, seed: int, cases: int, steps: int = TRAIN_STEPS) -> Path:
    """Train on brain phantoms `(seed, 0…cases−1)` and write the bundle folder `out`."""
    from monai.losses import DiceCELoss

    progress = Progress(NAME, steps)
    seed_everything(seed)
    pre = build_preprocessing(STEPS)
    data = [training_case(seed, c, pre) for c in range(cases)]
    with_tumour = sum(int(t[1].any()) for _, t in data)
    progress.say(f"{cases} brain phantoms (seed {seed}, {with_tumour} with a tumour) preprocessed; crops of {CROP}³")
    net = network()
    loss_fn = DiceCELoss(sigmoid=True, squared_pred=True, smooth_nr=0.0, smooth_dr=1e-5)
    optimiser = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-5)
    schedule = cosine_lr(optimiser, steps)
    rng = np.random.default_rng([seed, 2])
    order: list[int] = []
    net.train()
    for step in range(1, steps + 1):
        if not order:
            order = list(rng.permutation(cases))
        image, target = data[order.pop()]
        x, y, z = crop_start(rng, target)
        window = (slice(None), slice(x, x + CROP), slice(y, y + CROP), slice(z, z + CROP))
        loss = loss_fn(net(image[window][None]), target[window][None])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        progress.step(step, float(loss), schedule.get_last_lr()[0])
    net.eval()
    root = write_bundle_folder(out, metadata=_metadata(seed, cases, steps), inference=inference_config(),
                               weights=half_state_dict(net), readme=README)
    progress.say(f"wrote {root} in {progress.elapsed():.0f} s")
    return root


def inference_config() -> dict[str, Any]:
    """inference.json shaped as the published BRATS bundle's (`reference/brats_mri_segmentation`)."""
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "image_key": "image",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "amp": True,
        "network_def": {"_target_": "SegResNet", **NETWORK},
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key", "image_only": False},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                *({"_target_": s.name, "keys": "@image_key", **s.args} for s in STEPS),
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [240, 240, 160], "sw_batch_size": 1, "overlap": 0.5},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
                 "nearest_interp": False, "to_tensor": True},
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
                {"_target_": "Lambdad", "keys": "pred",
                 "func": "$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1, torch.where(x[[1]] > 0, 2, 0)))"},
            ],
        },
    }


def _metadata(seed: int, cases: int, steps: int) -> dict[str, Any]:
    shape = list(BRAIN_SHAPE)
    return metadata(
        name="m3-curate demo BRATS",
        task="brain tumour sub-region segmentation from T1c, T1, T2, FLAIR (demo, phantoms only)",
        description=(
            "SegResNet (init_filters 8) trained on m3-curate's 4-sequence brain MRI phantoms; sigmoid outputs "
            "TC, WT, ET as the BRATS bundle. Run it with runner: brats."
        ),
        network_data_format={
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "MR", "num_channels": 4,
                                 "spatial_shape": ["8*n", "8*n", "8*n"], "dtype": "float32", "value_range": [],
                                 "is_patch_data": True, "channel_def": {"0": "T1c", "1": "T1", "2": "T2", "3": "FLAIR"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": 3,
                                 "spatial_shape": ["8*n", "8*n", "8*n"], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": {"0": "Tumor core", "1": "Whole tumor", "2": "Enhancing tumor"}}},
        },
        training=training_record(seed=seed, cases=cases, steps=steps, extra={
            "loss": "Dice + BCE on sigmoid outputs", "optimiser": f"AdamW lr {LEARNING_RATE}, cosine",
            "crops": f"{CROP}^3 voxels at {BRAIN_SPACING} mm of phantoms {shape}", "weights": "float16 state dict"}),
    )


README = """# brats_demo (m3-curate demo bundle)

A small BRATS-like SegResNet (T1c, T1, T2, FLAIR in; sigmoid tumour core, whole tumour, enhancing
tumour out) trained on the **synthetic brain MRI phantoms** of `curation.demo`. It has never seen a
patient and knows only these phantoms.

Run it with `runner: brats`. Retrain: `python -m expert_runners.demo_training OUT --only brats_demo`.
Quality on held-out phantoms: `python bench/demo_experts_quality.py`.
"""
