"""How much device memory a training run's model state takes, from the model itself.

Every parameter is held at its dtype's size; every trainable one also has a gradient of the
same size and AdamW's two fp32 moments (8 bytes). So full tuning (fp32 master weights, bf16
autocast) takes 16 bytes a parameter, and LoRA 2 bytes a frozen bf16 parameter plus 16 per
adapter or projector parameter. Activations come on top: they grow with batch size and row
length, and gradient checkpointing (on by default on GPU) keeps them to a few GiB.
"""

from __future__ import annotations

from typing import Any

ADAM_BYTES = 8  # AdamW's exp_avg and exp_avg_sq, fp32


def state_bytes(model: Any) -> dict[str, int]:
    """Parameters, trainable parameters and the bytes of weights + gradients + AdamW state."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    weights = sum(p.numel() * p.element_size() for p in params)
    training = sum(p.numel() * (p.element_size() + ADAM_BYTES) for p in trainable)
    return {
        "parameters": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in trainable),
        "bytes": weights + training,
    }


def gib(n: int) -> float:
    return round(n / 2**30, 1)
