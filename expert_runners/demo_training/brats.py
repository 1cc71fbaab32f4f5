"""`brats_demo`: a BRATS-like SegResNet for the brain phantoms, for the `brats` runner.

The published BRATS bundle's design at a demo's size: four input channels (T1c, T1, T2, FLAIR),
channel-wise `NormalizeIntensityd` over non-zero voxels as its only preprocessing, three sigmoid
outputs — tumour core (1 ∪ 4), whole tumour (1 ∪ 2 ∪ 4), enhancing tumour (4) — that the runner
thresholds at 0.5 and turns into labels 4/1/2 as the bundle's postprocessing does. The network is
its SegResNet with `init_filters` 8 instead of 16 and `blocks_down` [1, 2, 2, 2] instead of
[1, 2, 2, 4], without dropout. The phantoms are small (80 × 96 × 72 at 2 mm), so it trains on
whole volumes, batch 1, with batch Dice + binary cross-entropy whose positives are weighted by
`(negatives / positives) ** 0.5`, the last layer's bias starting at −3 (no tumour), AdamW at
1e-3 with a cosine schedule: at 5e-3 the network collapsed to a constant output, and without the
weighting the enhancing rim was still unlearned after 300 steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from curation.demo import SEQUENCES, brain_phantom
from curation.demo.brain import BRAIN_SHAPE, BRAIN_SPACING
from expert_runners.bundle import TransformStep
from expert_runners.demo_training.common import (LossLog, draws, fit, half_state_dict, metadata, seed_everything,
                                                 training_record, write_bundle_folder)
from expert_runners.volumetric import KEY, build_preprocessing, to_meta_tensor

NAME = "brats_demo"
REGIONS = {"TC": (1, 4), "WT": (1, 2, 4), "ET": (4,)}  # output channels, in the bundle's order
STEPS = [TransformStep("NormalizeIntensityd", {"nonzero": True, "channel_wise": True})]
NETWORK: dict[str, Any] = {"blocks_down": [1, 2, 2, 2], "blocks_up": [1, 1, 1], "init_filters": 8, "in_channels": 4, "out_channels": 3}
TRAIN_STEPS = 300
LEARNING_RATE = 1e-3  # 5e-3 and above: the network collapses to one constant output within 100 steps
INITIAL_BIAS = -3.0
POSITIVE_WEIGHT_POWER = 0.5


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


def train(out: Path, *, seed: int, cases: int, steps: int = TRAIN_STEPS) -> Path:
    """Train on brain phantoms `(seed, 0…cases−1)` and write the bundle folder `out`."""
    from monai.losses import DiceLoss

    progress = LossLog(NAME, steps)
    seed_everything(seed)
    pre = build_preprocessing(STEPS)
    data = [training_case(seed, c, pre) for c in range(cases)]
    with_tumour = sum(int(t[1].any()) for _, t in data)
    progress.say(f"{cases} brain phantoms (seed {seed}, {with_tumour} with a tumour) preprocessed, {list(data[0][0].shape[1:])} voxels")
    net = network()
    with torch.no_grad():  # start from "no tumour anywhere" (p ≈ 0.05), as the voxels mostly are
        net.conv_final[2].conv.bias.fill_(INITIAL_BIAS)
    weight = positive_weights([t for _, t in data])
    progress.say(f"binary cross-entropy positive weights (TC, WT, ET) {[round(float(w), 1) for w in weight]}")
    # batch=True: a tumour-free case is not a constant loss of 1 (no gradient) but asks for no tumour
    dice_loss = DiceLoss(sigmoid=True, squared_pred=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=True)
    bce = torch.nn.BCEWithLogitsLoss(pos_weight=weight[:, None, None, None])

    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # not MONAI's DiceCELoss: with several channels its "CE" is a softmax cross-entropy across
        # TC/WT/ET, which is zero on tumour-free voxels (all-zero targets) — nothing would teach
        # the network to say "no tumour" there
        return dice_loss(logits, target) + bce(logits, target)

    batches = ((data[i][0][None], data[i][1][None]) for [i] in draws(np.random.default_rng([seed, 2]), cases, 1))
    fit(net, loss_fn, batches, steps=steps, lr=LEARNING_RATE, weight_decay=1e-5, progress=progress)
    root = write_bundle_folder(out, metadata=_metadata(seed, cases, steps), inference=inference_config(),
                               weights=half_state_dict(net), readme=README)
    progress.say(f"wrote {root} in {progress.elapsed():.0f} s")
    return root


def positive_weights(targets: list[torch.Tensor]) -> torch.Tensor:
    """Per output channel, `(negative voxels / positive voxels) ** POSITIVE_WEIGHT_POWER`: the
    enhancing rim is ~0.3 % of the voxels, and unweighted it is still unlearned after 300 steps."""
    positive = torch.stack([t.flatten(1).sum(1) for t in targets]).sum(0).double().clamp(min=1)
    total = sum(t[0].numel() for t in targets)
    return (((total - positive) / positive) ** POSITIVE_WEIGHT_POWER).float()


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
            "loss": f"batch Dice + BCE on sigmoid outputs, positives weighted (neg/pos)^{POSITIVE_WEIGHT_POWER}",
            "optimiser": f"AdamW lr {LEARNING_RATE}, cosine", "initial bias": INITIAL_BIAS,
            "input": f"whole volumes {shape} at {BRAIN_SPACING} mm", "weights": "float16 state dict"}),
    )


README = """# brats_demo (m3-curate demo bundle)

A small BRATS-like SegResNet (T1c, T1, T2, FLAIR in; sigmoid tumour core, whole tumour, enhancing
tumour out) trained on the **synthetic brain MRI phantoms** of `curation.demo`. It has never seen a
patient and knows only these phantoms.

Run it with `runner: brats`. Retrain: `python -m expert_runners.demo_training OUT --only brats_demo`.
Quality on held-out phantoms: `python bench/demo_experts_quality.py`.
"""
