"""The one contract every expert fills, and the table that finds a runner by name.

A runner is constructed on the driver from its manifest entry (cheap: validate and store),
`fingerprint()`ed there for the cache key, then shipped to workers where `setup(device)` loads
weights once and `run(...)` is called per item, in the manner of a Ray Data callable class.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Iterator

from curation import __version__
from curation.errors import CurationError, ItemError
from curation.items import StudyItem, Volume
from curation.manifest import SCHEDULING_KEYS, ExpertSpec
from curation.findings import Findings

ENTRY_POINT_GROUP = "m3_curate.runners"

# Manifest keys that only place the work (and the expert's display name): never part of what
# an expert computes, so changing them keeps the cache.
PLACEMENT_KEYS = {"name", *SCHEDULING_KEYS}

# Built-in runners by manifest name; imported only when used (torch and MONAI are heavy).
BUILTIN: dict[str, str] = {
    "vista3d": "expert_runners.vista3d:Vista3DRunner",
    "brats": "expert_runners.brats:BratsRunner",
    "monai_bundle": "expert_runners.monai_bundle:MonaiBundleRunner",
    "cxr_ensemble": "expert_runners.cxr:CxrEnsembleRunner",
    "ct_tissue": "expert_runners.ct_tissue:CtTissueRunner",
    "labels": "expert_runners.labels:LabelsRunner",
}


@dataclass(slots=True)
class ExpertInput:
    """What a runner sees for one item: the item, its voxels, and its ground-truth label map
    when the source has one (only the `labels` runner uses it)."""

    item: StudyItem
    volume: Volume
    labels: Volume | None = None


class ExpertRunner(ABC):
    runner: ClassVar[str]  # the manifest's `runner:` value
    modalities: ClassVar[tuple[str, ...]]  # accepted DICOM modalities; empty = any
    kinds: ClassVar[tuple[str, ...]] = ("dicom", "nifti", "nifti_group", "image2d")

    def __init__(self, spec: ExpertSpec, *, image_max_side: int = 512):
        self.spec = spec
        self.image_max_side = image_max_side
        self.device = "cpu"

    @property
    def name(self) -> str:
        """The name the VLM calls: `<VISTA3D(...)>`."""
        return self.spec.name

    def fingerprint(self) -> str:
        """Weights + configuration + code version: findings cached under another fingerprint
        are never reused."""
        h = hashlib.sha256()
        h.update(json.dumps([self.runner, __version__, self.spec.model_dump(mode="json", exclude=PLACEMENT_KEYS)], sort_keys=True).encode())
        for path in self.weight_files():
            h.update(path.name.encode())
            h.update(file_digest(path).encode())
        return h.hexdigest()[:16]

    def weight_files(self) -> list[Path]:
        """Files whose content defines the expert (weights, configs); none for weight-free runners."""
        return []

    def accepts(self, item: StudyItem) -> str | None:
        """None if this runner can run on the item, else the reason it cannot."""
        if self.modalities and item.modality not in self.modalities:
            return f"{self.name} takes {'/'.join(self.modalities)}, not {item.modality}"
        if item.kind not in self.kinds:
            return f"{self.name} takes {'/'.join(self.kinds)} items, not {item.kind}"
        return None

    def setup(self, device: str = "cpu") -> None:
        """Load weights once per worker. Weight-free runners need nothing."""
        self.device = device

    @abstractmethod
    def predict(self, inp: ExpertInput, args: str, timing: dict[str, float]) -> Findings:
        """The runner's own work; fill `timing` with seconds per phase via `phase()`."""

    def run(self, inp: ExpertInput, args: str = "") -> Findings:
        """Run on one item; any failure becomes an `ItemError` naming the item and the expert."""
        reason = self.accepts(inp.item)
        if reason:
            raise ItemError(inp.item.item_id, reason)
        timing: dict[str, float] = {}
        try:
            findings = self.predict(inp, args, timing)
        except ItemError:
            raise
        except Exception as e:
            raise ItemError(inp.item.item_id, f"expert {self.name} failed: {type(e).__name__}: {e}".replace("\n", " ")) from e
        findings.timing = {k: round(v, 4) for k, v in timing.items()}
        return findings


@contextmanager
def phase(timing: dict[str, float], name: str) -> Iterator[None]:
    """Add the seconds spent in the block to `timing[name]`."""
    started = time.perf_counter()
    try:
        yield
    finally:
        timing[name] = timing.get(name, 0.0) + time.perf_counter() - started


@lru_cache(maxsize=256)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file, remembered per (path, size, mtime): weights are hashed once a process."""
    st = path.stat()
    return _digest(str(path), st.st_size, st.st_mtime_ns)


def runner_class(name: str) -> type[ExpertRunner]:
    """A built-in runner, an installed entry point (group `m3_curate.runners`), or a dotted
    path `package.module:Class`."""
    target = BUILTIN.get(name)
    if target is None:
        found = [ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if found:
            cls = found[0].load()
            return _checked(name, cls)
        if ":" not in name:
            raise CurationError(
                f"unknown expert runner {name!r}: use one of {sorted(BUILTIN)}, an entry point in "
                f"group {ENTRY_POINT_GROUP!r}, or a dotted path 'package.module:Class'"
            )
        target = name
    module_name, _, attr = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise CurationError(f"expert runner {name!r}: cannot import {target} ({e})") from e
    return _checked(name, cls)


def _checked(name: str, cls: Any) -> type[ExpertRunner]:
    if not (isinstance(cls, type) and issubclass(cls, ExpertRunner)):
        raise CurationError(f"expert runner {name!r} is not a subclass of expert_runners.base.ExpertRunner")
    return cls


def make_runner(spec: ExpertSpec, *, image_max_side: int = 512) -> ExpertRunner:
    return runner_class(spec.runner)(spec, image_max_side=image_max_side)
