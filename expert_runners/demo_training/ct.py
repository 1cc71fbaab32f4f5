"""`ct_organs`: a small SegResNet for the CT phantom's organs and liver tumours, in VISTA3D ids.

Run through the `vista3d` runner. Its network is not a VISTA3D, so the runner treats it as an
ordinary segmentation network whose output channel k is VISTA3D label k (argmax, then only the
labels of the argument's prompt are kept). The network is trained on the 14 classes the phantom
draws (`CLASSES`, compact indices) and saved with its last 1×1×1 convolution spread out to
`OUT_CHANNELS` = 40 channels: channel k carries label k's weights, every other channel a
constant −100 logit that never wins the argmax.

Preprocessing (the bundle's `preprocessing`, built here for training from the same `STEPS` the
config is written from, so training and inference see the same voxels): RAS, 4 × 4 × 5 mm
(bilinear), HU −150…250 → 0…1 clipped, crop to the body with a 4-voxel margin, pad to a multiple
of 8. The narrow window matters: with a wide one (−1000…1000, or −200…300 unclipped) the
normalised contrast between kidney, aorta, liver and tumour is a fifth as large, and those
classes were still unlearned after 300 steps. Inference is one window over the whole cropped
volume (ROI 160 × 160 × 64), as training: the network sees the whole scan, which it needs to
tell left from right and the vertebral levels apart (the phantom's levels are fixed fractions of
the scan's height).

Training: whole volumes, batch 1, softmax Dice (foreground classes) + cross-entropy weighted by
`(voxels / class voxels) ** 0.75` — small structures (kidneys, aorta, vertebrae: ~0.4 % of the
voxels; tumours ~0.1 %) otherwise appear only after many hundreds of steps — AdamW, cosine
schedule, `TRAIN_STEPS` steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from curation.demo import CT_LABELS, ct_phantom
from expert_runners.bundle import TransformStep
from expert_runners.demo_training.common import (LossLog, draws, fit, half_state_dict, metadata, seed_everything,
                                                 training_record, write_bundle_folder)
from expert_runners.vista3d import DEFAULT_SUBCLASS
from expert_runners.volumetric import KEY, build_preprocessing, to_meta_tensor

NAME = "ct_organs"
TUMOUR = CT_LABELS["hepatic tumor"]
CLASSES: list[int] = [0, *sorted(CT_LABELS.values())]  # compact index → VISTA3D label id
OUT_CHANNELS = max(CLASSES) + 1
EVERYTHING = [c for c in CLASSES[1:] if c != TUMOUR]  # as VISTA3D: tumours only when asked for
SPACING = [4.0, 4.0, 5.0]
ROI = [160, 160, 64]
STEPS: list[TransformStep] = [
    TransformStep("Orientationd", {"axcodes": "RAS"}),
    TransformStep("Spacingd", {"pixdim": SPACING, "mode": "bilinear"}),
    TransformStep("ScaleIntensityRanged", {"a_min": -150.0, "a_max": 250.0, "b_min": 0.0, "b_max": 1.0, "clip": True}),
    TransformStep("CropForegroundd", {"margin": 4, "allow_smaller": True}),
    TransformStep("DivisiblePadd", {"k": 8}),
]
NETWORK: dict[str, Any] = {"spatial_dims": 3, "init_filters": 8, "in_channels": 1, "blocks_down": [1, 2, 2, 2], "blocks_up": [1, 1, 1]}
CLASS_WEIGHT_POWER = 0.75  # cross-entropy weight of a class: (all voxels / its voxels) ** power, background 1
TRAIN_STEPS = 500
LEARNING_RATE = 5e-3


def network(out_channels: int) -> torch.nn.Module:
    from monai.networks.nets import SegResNet

    return SegResNet(**NETWORK, out_channels=out_channels)


def paired_preprocessing() -> Any:
    """`STEPS` on image and label together: spatial steps move both (labels nearest),
    intensity steps touch the image only."""
    from monai import transforms as mt

    keys = [KEY, "label"]
    out: list[Any] = []
    for step in STEPS:
        args = dict(step.args)
        if step.name == "Orientationd":
            out.append(mt.Orientationd(keys=keys, labels=None, **args))
        elif step.name == "Spacingd":
            out.append(mt.Spacingd(keys=keys, pixdim=args["pixdim"], mode=[args["mode"], "nearest"]))
        elif step.name == "CropForegroundd":
            out.append(mt.CropForegroundd(keys=keys, source_key=KEY, **args))
        elif step.name == "DivisiblePadd":
            out.append(mt.DivisiblePadd(keys=keys, **args))
        else:
            out.append(build_preprocessing([step]))
    return mt.Compose(out)


def training_case(seed: int, case: int, pre: Any, lut: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(image [1, 1, x, y, z], compact labels [1, 1, x, y, z]) of phantom `case`, preprocessed."""
    hu, labels, affine = ct_phantom(seed, case)
    data = pre({KEY: to_meta_tensor(hu, affine), "label": to_meta_tensor(lut[labels], affine)})
    image = data[KEY].as_tensor().float()[None]  # plain tensors: MetaTensor bookkeeping costs time per op
    label = data["label"].as_tensor().round().long()[None]
    return image.contiguous(), label.contiguous()


def train(out: Path, *, seed: int, cases: int, steps: int = TRAIN_STEPS) -> Path:
    """Train on CT phantoms `(seed, 0…cases−1)` and write the bundle folder `out`."""
    from monai.losses import DiceLoss

    progress = LossLog(NAME, steps)
    seed_everything(seed)
    lut = np.zeros(256, dtype=np.int64)
    lut[CLASSES] = np.arange(len(CLASSES))
    pre = paired_preprocessing()
    data = [training_case(seed, c, pre, lut) for c in range(cases)]
    progress.say(f"{cases} CT phantoms (seed {seed}) preprocessed, shapes e.g. {list(data[0][0].shape[2:])}; {len(CLASSES)} classes")
    net = network(len(CLASSES))
    weight = class_weights([label for _, label in data])
    progress.say(f"cross-entropy class weights {[round(float(w), 1) for w in weight]}")
    dice_loss = DiceLoss(to_onehot_y=True, softmax=True, include_background=False)
    cross_entropy = torch.nn.CrossEntropyLoss(weight=weight)

    def loss_fn(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return dice_loss(logits, label) + cross_entropy(logits, label[:, 0])

    batches = (data[i] for [i] in draws(np.random.default_rng([seed, 1]), cases, 1))
    fit(net, loss_fn, batches, steps=steps, lr=LEARNING_RATE, weight_decay=1e-5, progress=progress)
    root = write_bundle_folder(out, metadata=_metadata(seed, cases, steps), inference=inference_config(),
                               weights=half_state_dict(spread_head(net)), readme=README)
    progress.say(f"wrote {root} in {progress.elapsed():.0f} s")
    return root


def class_weights(labels: list[torch.Tensor]) -> torch.Tensor:
    """Cross-entropy weight per compact class, `(voxels / class voxels) ** CLASS_WEIGHT_POWER`
    relative to the background: without it the small structures (kidneys, aorta, vertebrae,
    tumours: 0.1–0.5 % of the voxels) are still unlearned after a few hundred steps."""
    counts = torch.bincount(torch.cat([label.flatten() for label in labels]), minlength=len(CLASSES)).double()
    weight = (counts.sum() / counts.clamp(min=1)) ** CLASS_WEIGHT_POWER
    return (weight / weight[0]).float()


def spread_head(compact: torch.nn.Module) -> torch.nn.Module:
    """The trained network with `OUT_CHANNELS` outputs: channel `CLASSES[i]` is compact channel i;
    the others have zero weights and a −100 bias."""
    full = network(OUT_CHANNELS)
    state = compact.state_dict()
    weight, bias = state.pop("conv_final.2.conv.weight"), state.pop("conv_final.2.conv.bias")
    new_weight = torch.zeros((OUT_CHANNELS, *weight.shape[1:]), dtype=weight.dtype)
    new_bias = torch.full((OUT_CHANNELS,), -100.0, dtype=bias.dtype)
    new_weight[CLASSES] = weight
    new_bias[CLASSES] = bias
    state |= {"conv_final.2.conv.weight": new_weight, "conv_final.2.conv.bias": new_bias}
    full.load_state_dict(state)
    return full.eval()


def _transform(step: TransformStep) -> dict[str, Any]:
    extra = {"source_key": "@image_key"} if step.name == "CropForegroundd" else {}
    return {"_target_": step.name, "keys": "@image_key", **extra, **step.args}


def inference_config() -> dict[str, Any]:
    """inference.json in the shape of the published VISTA3D/BRATS ones: `network_def`,
    `preprocessing`, `inferer`, `postprocessing`, plus VISTA3D's `everything_labels` and
    `subclass` (the published subclass table)."""
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "image_key": "image",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "input_channels": 1,
        "patch_size": ROI,
        "everything_labels": EVERYTHING,
        "subclass": DEFAULT_SUBCLASS,
        "network_def": {"_target_": "SegResNet", **NETWORK, "out_channels": OUT_CHANNELS},
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                *(_transform(s) for s in STEPS),
                {"_target_": "EnsureTyped", "keys": "@image_key"},
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": "@patch_size", "sw_batch_size": 1, "overlap": 0.25},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
                 "nearest_interp": True, "to_tensor": True},
            ],
        },
        "amp": True,
    }


def _metadata(seed: int, cases: int, steps: int) -> dict[str, Any]:
    names = {str(k): name for name, k in sorted(CT_LABELS.items(), key=lambda kv: kv[1])}
    return metadata(
        name="m3-curate demo CT organs",
        task="CT organ and liver tumour segmentation in VISTA3D label ids (demo, phantoms only)",
        description=(
            "SegResNet (init_filters 8) trained on m3-curate's abdominal CT phantoms. Output channel k is VISTA3D "
            "label k; only the channels in channel_def are trained, the others never win the argmax. Run it with "
            "runner: vista3d."
        ),
        network_data_format={
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": ["8*n", "8*n", "8*n"], "dtype": "float32", "value_range": [-1024, 3071],
                                 "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": OUT_CHANNELS,
                                 "spatial_shape": ["8*n", "8*n", "8*n"], "dtype": "float32", "value_range": [0, OUT_CHANNELS - 1],
                                 "is_patch_data": False, "channel_def": {"0": "background", **names}}},
        },
        training=training_record(seed=seed, cases=cases, steps=steps, extra={
            "loss": "DiceCE (softmax, background excluded from Dice)", "optimiser": f"AdamW lr {LEARNING_RATE}, cosine",
            "weights": "float16 state dict", "trained_labels": CLASSES[1:]}),
    )


README = """# ct_organs (m3-curate demo bundle)

A small SegResNet that segments the **synthetic CT phantoms** of `curation.demo` in VISTA3D label
ids: liver 1, spleen 3, right kidney 5, aorta 6, left kidney 14, hepatic tumor 26, lung lower lobes
29/32, vertebrae T11–L3 (39–35). It has never seen a patient and knows only these phantoms.

Run it with `runner: vista3d`. Retrain: `python -m expert_runners.demo_training OUT --only ct_organs`.
Quality on held-out phantoms: `python bench/demo_experts_quality.py`.
"""
