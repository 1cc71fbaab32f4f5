"""`cxr_demo`: an 18-label chest X-ray classifier for the `cxr_ensemble` runner.

A small MONAI `DenseNet` (4 dense blocks of 3 layers, growth 12) with 18 sigmoid outputs in
`CXR_LABELS` order. Only the six findings the phantom draws (`curation.demo.FINDINGS`) carry
signal; the other twelve are negative in every training image, so the model learns to answer
"no" to them. Input exactly as the runner prepares it (`model_input`): the 8-bit image divided
by 255, rows × columns as the PNG, 256 × 256 (the phantom's own size: no resizing).

The runner loads classifiers from files, not from `network_def`, so the weights are written
twice from the same network: `models/model.pt` (the state dict, for the bundle's
`network_def`) and `models/model.pt2`, a `torch.export` program with a fixed 1 × 1 × 256 × 256
input, which the manifest names (`kind: torch_export`, `size: 256`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from curation.demo import CXR_LABELS, FINDINGS, cxr_phantom
from expert_runners.cxr import model_input, unit_scale
from expert_runners.demo_training.common import (LossLog, draws, fit, metadata, seed_everything, training_record,
                                                 write_bundle_folder)

NAME = "cxr_demo"
SIZE = 256
IMAGES_PER_CASE = 20  # chest X-rays per --cases (one balanced block of the finding schedule)
NETWORK: dict[str, Any] = {"spatial_dims": 2, "in_channels": 1, "out_channels": len(CXR_LABELS), "init_features": 16,
                           "growth_rate": 12, "block_config": [3, 3, 3, 3], "bn_size": 2}
BATCH = 16
TRAIN_STEPS = 360
LEARNING_RATE = 3e-3
EXPORTED = "models/model.pt2"


def network() -> torch.nn.Module:
    from monai.networks.nets import DenseNet

    return DenseNet(**NETWORK)


def training_images(seed: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [count, 1, SIZE, SIZE], labels [count, 18]) of chest X-ray phantoms 0…count−1,
    each input made by the runner's own `model_input` from the image as the reader gives it
    ((x, y) = the PNG transposed)."""
    images, labels = [], []
    for index in range(count):
        s = cxr_phantom(seed, index)
        images.append(model_input(unit_scale(s.image.T), size=SIZE))
        labels.append([float(s.labels[name]) for name in CXR_LABELS])
    return torch.cat(images), torch.tensor(labels)


def train(out: Path, *, seed: int, cases: int, steps: int = TRAIN_STEPS) -> Path:
    """Train on `IMAGES_PER_CASE × cases` chest X-ray phantoms of `seed` and write the bundle."""
    progress = LossLog(NAME, steps)
    seed_everything(seed)
    count = IMAGES_PER_CASE * cases
    inputs, labels = training_images(seed, count)
    positives = {n: int(labels[:, i].sum()) for i, n in enumerate(CXR_LABELS) if n in FINDINGS}
    progress.say(f"{count} chest X-ray phantoms (seed {seed}); positives {positives}")
    net = network()
    loss_fn = torch.nn.BCEWithLogitsLoss()
    batches = ((inputs[b], labels[b]) for b in draws(np.random.default_rng([seed, 3]), count, BATCH))
    fit(net, loss_fn, batches, steps=steps, lr=LEARNING_RATE, weight_decay=1e-4, progress=progress)
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    root = write_bundle_folder(out, metadata=_metadata(seed, cases, steps), inference=inference_config(), weights=state,
                               readme=README, extra_files={EXPORTED: lambda path: export(net, path)})
    progress.say(f"wrote {root} in {progress.elapsed():.0f} s")
    return root


def export(net: torch.nn.Module, path: Path) -> None:
    """`torch.export` the network in eval mode for a (1, 1, SIZE, SIZE) input: the file the
    `cxr_ensemble` runner loads with `kind: torch_export`."""
    example = (torch.zeros(1, 1, SIZE, SIZE),)
    with torch.no_grad():
        program = torch.export.export(net.eval(), example)
    torch.export.save(program, str(path))


def inference_config() -> dict[str, Any]:
    """The network and the preprocessing the runner applies, as a bundle config: load, ÷ 255,
    rows × columns (MONAI's image readers give columns × rows, so transpose), 256 × 256, sigmoid."""
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "image_key": "image",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "DenseNet", **NETWORK},
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                {"_target_": "ScaleIntensityRanged", "keys": "@image_key", "a_min": 0.0, "a_max": 255.0, "b_min": 0.0, "b_max": 1.0, "clip": False},
                {"_target_": "Transposed", "keys": "@image_key", "indices": [0, 2, 1]},
                {"_target_": "Resized", "keys": "@image_key", "spatial_size": [SIZE, SIZE], "mode": "bilinear", "anti_aliasing": True},
            ],
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {"_target_": "Compose", "transforms": [{"_target_": "Activationsd", "keys": "pred", "sigmoid": True}]},
    }


def _metadata(seed: int, cases: int, steps: int) -> dict[str, Any]:
    return metadata(
        name="m3-curate demo CXR classifier",
        task="chest X-ray multi-label classification over the 18 TorchXRayVision labels (demo, phantoms only)",
        description=(
            "Small MONAI DenseNet trained on m3-curate's chest X-ray phantoms; only "
            f"{', '.join(FINDINGS)} are ever positive there. Run it with runner: cxr_ensemble, "
            f"models: [{{path: {EXPORTED}, kind: torch_export, size: {SIZE}}}]."
        ),
        network_data_format={
            "inputs": {"image": {"type": "image", "format": "magnitude", "modality": "CR", "num_channels": 1,
                                 "spatial_shape": [SIZE, SIZE], "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": False, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "probabilities", "format": "classes", "num_channels": len(CXR_LABELS),
                                 "spatial_shape": [1], "dtype": "float32", "value_range": [0, 1], "is_patch_data": False,
                                 "channel_def": {str(i): name for i, name in enumerate(CXR_LABELS)}}},
        },
        training=training_record(seed=seed, cases=cases, steps=steps, extra={
            "images": IMAGES_PER_CASE * cases, "batch": BATCH, "loss": "BCE with logits over 18 labels",
            "optimiser": f"AdamW lr {LEARNING_RATE}, cosine", "visible_findings": list(FINDINGS),
            "weights": f"float32 state dict (models/model.pt) and the same network exported ({EXPORTED})"}),
    )


README = f"""# cxr_demo (m3-curate demo bundle)

A small MONAI DenseNet that answers the 18 chest X-ray labels of VILA-M3's CXR expert, trained on the
**synthetic chest X-ray phantoms** of `curation.demo`. Only {', '.join(FINDINGS)} are ever drawn
there; it answers "no" to everything else. It has never seen a patient and knows only these phantoms.

Run it with `runner: cxr_ensemble` and `models: [{{path: {EXPORTED}, kind: torch_export, size: {SIZE}}}]`.
Retrain: `python -m expert_runners.demo_training OUT --only cxr_demo`.
Quality on held-out phantoms: `python bench/demo_experts_quality.py`.
"""
