"""What the three demo trainers share: seeding, progress lines, the training loop's clock, the
bundle folder writer and the metrics the bench and tests use.

Pure helpers; nothing here knows about CT, MRI or X-rays.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from curation.errors import CurationError

# The seed `data/demo` (and every demo manifest) is written with: the held-out evaluation set.
EVALUATION_SEED = 0
DEFAULT_SEED = 1
AUTHOR = "m3-curate demo training (python -m expert_runners.demo_training)"
INTENDED_USE = (
    "Demonstration only. Trained on synthetic phantoms from curation.demo and never on a patient: "
    "it knows only those phantoms and must not be used on real images."
)


def seed_everything(seed: int) -> None:
    """Seed torch and ask for deterministic kernels. Data sampling uses its own numpy
    generators (`np.random.default_rng([seed, …])`), never global state. Bit-for-bit equal
    weights need the same torch build and thread count as well."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def check_seed(seed: int) -> None:
    """Training phantoms must not be the evaluation phantoms (`data/demo` is seed 0)."""
    if not isinstance(seed, int) or seed < 0:
        raise CurationError(f"demo training: --seed must be a whole number ≥ 0, got {seed!r}")
    if seed == EVALUATION_SEED:
        raise CurationError(
            f"demo training: --seed {seed} is the seed of the demo archive (data/demo) the bundles are evaluated on; "
            f"train on another seed (default {DEFAULT_SEED}) so that evaluation cases stay held out"
        )


@dataclass(slots=True)
class LossLog:
    """Prints `[name] step 40/300 loss 0.512 lr 1.9e-03 12 s` every `every` steps."""

    name: str
    steps: int
    every: int = 25
    started: float = field(default_factory=time.perf_counter)
    losses: list[float] = field(default_factory=list)

    def say(self, text: str) -> None:
        print(f"[{self.name}] {text}", flush=True)

    def step(self, step: int, loss: float, lr: float) -> None:
        self.losses.append(loss)
        if step % self.every == 0 or step == self.steps:
            recent = float(np.mean(self.losses[-self.every:]))
            self.say(f"step {step:4d}/{self.steps}  loss {recent:.4f}  lr {lr:.1e}  {self.elapsed():.0f} s")

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def cosine_lr(optimiser: torch.optim.Optimizer, steps: int, warmup: int = 10) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up for `warmup` steps, then cosine decay to 5 % of the base rate."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * min(t, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


def draws(rng: np.random.Generator, count: int, size: int) -> Iterator[list[int]]:
    """`size` indices a step, without replacement: a fresh permutation of `count` whenever fewer
    than `size` are left (the leftovers are dropped, so every batch is full)."""
    order: list[int] = []
    while True:
        if len(order) < size:
            order = list(rng.permutation(count))
        yield [order.pop() for _ in range(size)]


def fit(net: torch.nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *, steps: int, lr: float, weight_decay: float,
        progress: LossLog) -> None:
    """`steps` steps of AdamW on the cosine schedule, one (input, target) batch each; the
    network is left in eval mode."""
    optimiser = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = cosine_lr(optimiser, steps)
    net.train()
    for step in range(1, steps + 1):
        inputs, target = next(batches)
        loss = loss_fn(net(inputs), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        progress.step(step, loss.item(), schedule.get_last_lr()[0])
    net.eval()


def half_state_dict(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Floating-point tensors as float16 (half the file; `read_bundle` casts them back to the
    network's float32), integers (norm counters) as they are."""
    return {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).clone() for k, v in net.state_dict().items()}


def write_bundle_folder(root: Path, *, metadata: dict[str, Any], inference: dict[str, Any], weights: dict[str, torch.Tensor],
                        readme: str, extra_files: dict[str, Any] | None = None) -> Path:
    """An ordinary MONAI bundle folder: `configs/metadata.json`, `configs/inference.json`,
    `models/model.pt` (a state dict), `docs/README.md`, plus `extra_files` (relative path →
    callable writing that path). Files this writer owns are replaced; the folder is not
    otherwise touched."""
    for sub in ("configs", "models", "docs"):
        if (root / sub).is_dir():
            shutil.rmtree(root / sub)
        (root / sub).mkdir(parents=True)
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=1) + "\n")
    (root / "configs" / "inference.json").write_text(json.dumps(inference, indent=1) + "\n")
    (root / "docs" / "README.md").write_text(readme)
    torch.save(weights, root / "models" / "model.pt")
    for rel, write in (extra_files or {}).items():
        write(root / rel)
    return root


def metadata(*, name: str, task: str, description: str, network_data_format: dict[str, Any], training: dict[str, Any]) -> dict[str, Any]:
    """metadata.json in the shape the published bundles use (schema fields, `network_data_format`
    with `channel_def`), plus a `training` record of how the weights were made."""
    import monai

    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "changelog": {"0.1.0": "demo bundle trained on m3-curate phantoms"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "name": name,
        "task": task,
        "description": description,
        "authors": AUTHOR,
        "copyright": "Apache-2.0, as m3-curate",
        "data_source": "synthetic phantoms from curation.demo (no patient data)",
        "data_type": "numpy arrays generated in memory",
        "intended_use": INTENDED_USE,
        "network_data_format": network_data_format,
        "training": training,
    }


def training_record(*, seed: int, cases: int, steps: int, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "command": f"python -m expert_runners.demo_training OUT --seed {seed} --cases {cases}",
        "seed": seed,
        "cases": cases,
        "steps": steps,
        "held_out": f"phantoms of seed {EVALUATION_SEED} (the demo archive data/demo) are never trained on",
        **(extra or {}),
    }


def dice(pred: np.ndarray, truth: np.ndarray) -> float | None:
    """Dice of two boolean masks; None when both are empty (undefined, not perfect).

    >>> dice(np.array([1, 1, 0, 0], bool), np.array([1, 0, 0, 0], bool))
    0.6666666666666666
    >>> dice(np.zeros(3, bool), np.zeros(3, bool)) is None
    True
    """
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    total = int(p.sum()) + int(t.sum())
    if total == 0:
        return None
    return 2.0 * int((p & t).sum()) / total


def auroc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the ROC curve (the Mann–Whitney statistic, ties counted half); None when the
    labels are all one class.

    >>> auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1]))
    0.75
    """
    s, y = np.asarray(scores, float), np.asarray(labels).astype(bool)
    pos, neg = s[y], s[~y]
    if len(pos) == 0 or len(neg) == 0:
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def file_size(root: Path) -> int:
    """Bytes of every file under `root`."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
