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
from curation.expert_args import canonical_arg
from curation.expert_info import ExpertInfo, refusal
from curation.findings import Findings
from curation.items import ITEM_KINDS, StudyItem, Volume
from curation.manifest import BuildSpec, ExpertSpec

ENTRY_POINT_GROUP = "m3_curate.runners"

# Built-in runners by manifest name; imported only when used (torch and MONAI are heavy).
BUILTIN: dict[str, str] = {
    "vista3d": "expert_runners.vista3d:Vista3DRunner",
    "brats": "expert_runners.brats:BratsRunner",
    "monai_bundle": "expert_runners.monai_bundle:MonaiBundleRunner",
    "cxr_ensemble": "expert_runners.cxr:CxrEnsembleRunner",
    "ct_tissue": "expert_runners.ct_tissue:CtTissueRunner",
    "labels": "expert_runners.labels:LabelsRunner",
    "picture": "expert_runners.picture2d:PictureRunner",
}


@dataclass(slots=True)
class ExpertInput:
    """What a runner sees for one item: the item, its voxels, and its ground-truth label map
    when the source has one (only the `labels` runner uses it)."""

    item: StudyItem
    volume: Volume
    labels: Volume | None = None


class ExpertRunner(ABC):
    """One expert family. Lifecycle, in the manner of a Ray Data callable class:

    - `__init__(spec)` on the driver: validate the manifest entry and store it (cheap; no
      weights loaded). A module defining a runner imports no torch at module level, so the
      driver, `render` and `preview` can read the declarations below without it.
    - `fingerprint()` and `describe()` on the driver: the cache key, and the plain
      `ExpertInfo` the plan and the renderer use instead of the runner.
    - `setup(device)` once per worker: load weights.
    - `run(inp, arg)` per item and argument: `Findings`, or an `ItemError` naming the item.

    Declarations (class attributes a subclass sets; `provides()` and `vocabulary()` may
    refine them per instance): `runner` (the manifest's `runner:` value), `modalities` (DICOM
    modalities taken; empty: any), `kinds` (item kinds taken), `PROVIDES` (what the findings
    hold, from `curation.expert_info.NEEDS`; None: not declared, not checked), `thread_safe`
    (`run` may be called from several threads at once: it keeps no state between calls; a
    class declares it for itself, it is not inherited — see `thread_safe()`). A runner that
    turns reference annotations into findings (`labels`) says so in the findings themselves:
    their `truth` repeats them (`expert_runners.labels.as_truth`).
    """

    runner: ClassVar[str]
    modalities: ClassVar[tuple[str, ...]]
    kinds: ClassVar[tuple[str, ...]] = ITEM_KINDS
    PROVIDES: ClassVar[frozenset[str] | None] = None
    thread_safe: ClassVar[bool] = False

    def __init__(self, spec: ExpertSpec, *, image_max_side: int = 512):
        self.spec = spec
        self.image_max_side = image_max_side
        self.min_size_ml = spec.min_size_ml
        self.device = "cpu"

    @property
    def name(self) -> str:
        """The name the VLM calls: `<VISTA3D(...)>`."""
        return self.spec.name

    def fingerprint(self) -> str:
        """Weights + configuration + code version: findings cached under another fingerprint
        are never reused. Where the bundle lies is not part of it (its files' contents are): a
        cache moved with its bundle, or read on a node that mounts them elsewhere, still hits."""
        h = hashlib.sha256()
        computed = self.spec.without_placement().model_dump(mode="json", exclude={"name", "bundle"})
        h.update(json.dumps([self.runner, __version__, computed], sort_keys=True).encode())
        for path in self.weight_files():
            h.update(path.name.encode())
            h.update(file_digest(path).encode())
        return h.hexdigest()[:16]

    def weight_files(self) -> list[Path]:
        """Files whose content defines the expert (weights, configs); none for weight-free runners."""
        return []

    def accepts(self, item: StudyItem) -> str | None:
        """None if this runner can run on the item, else the reason it cannot."""
        return refusal(self.name, self.modalities, self.kinds, item)

    def provides(self) -> frozenset[str] | None:
        """What this expert's findings hold (`curation.expert_info.NEEDS`); None: undeclared."""
        return self.PROVIDES

    def vocabulary(self, arg: str) -> list[str] | None:
        """Structure names this expert reports for `arg` when they are present (so a name here
        that is missing from its findings is truly absent); None when it cannot say."""
        return None

    def describe(self, args: list[str] | tuple[str, ...] = ()) -> ExpertInfo:
        """The plain description the plan and the renderer use instead of the runner, with the
        vocabulary of each argument in `args` (those the manifest's tasks use)."""
        provides = self.provides()
        vocabularies = {}
        for arg in args:
            names = self.vocabulary(arg)
            if names is not None:
                vocabularies[canonical_arg(arg)] = tuple(sorted(set(names)))
        return ExpertInfo(
            name=self.name, runner=self.spec.runner, fingerprint=self.fingerprint(),
            spec=self.spec.without_placement().model_dump(mode="json"), modalities=tuple(self.modalities),
            kinds=tuple(self.kinds), weights=bool(self.weight_files()),
            provides=None if provides is None else tuple(sorted(provides)), vocabularies=vocabularies,
            family=family(type(self)),
        )

    def setup(self, device: str = "cpu") -> None:
        """Load weights once per worker. Weight-free runners need nothing."""
        self.device = device

    @abstractmethod
    def predict(self, inp: ExpertInput, arg: str, timing: dict[str, float]) -> Findings:
        """The runner's own work; fill `timing` with seconds per phase via `phase()`."""

    def run(self, inp: ExpertInput, arg: str = "") -> Findings:
        """Run on one item; any failure becomes an `ItemError` naming the item and the expert."""
        reason = self.accepts(inp.item)
        if reason:
            raise ItemError(inp.item.item_id, reason)
        timing: dict[str, float] = {}
        try:
            findings = self.predict(inp, arg, timing)
        except ItemError:
            raise
        except Exception as e:
            raise ItemError(inp.item.item_id, f"expert {self.name} failed: {type(e).__name__}: {e}".replace("\n", " ")) from e
        findings.timing = {k: round(v, 4) for k, v in timing.items()}
        return findings


def thread_safe(runner: ExpertRunner) -> bool:
    """Whether an expert host may run `runner` on several items at once: only if its own
    class says so. A subclass (a plug-in deriving from a built-in runner) may keep state
    between calls that its parent does not, so it runs one item at a time until it declares
    `thread_safe = True` itself."""
    return bool(type(runner).__dict__.get("thread_safe", False))


def family(cls: type) -> str:
    """The built-in runner a runner class is, or derives from ("" for one of its own)."""
    return next((c.__dict__["runner"] for c in cls.__mro__ if c.__dict__.get("runner") in BUILTIN), "")


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


def manifest_runners(spec: BuildSpec) -> dict[str, ExpertRunner]:
    """Every expert of a manifest constructed on the driver: options validated, no weights
    loaded, no torch imported (placement keys left out, so they never change a fingerprint)."""
    return {e.name: make_runner(e.without_placement(), image_max_side=spec.output.image_max_side) for e in spec.experts}


def task_args(spec: BuildSpec, expert: str) -> list[str]:
    """The distinct arguments the manifest's tasks give an expert, in first-use order."""
    return list(dict.fromkeys(a for t in spec.tasks if t.expert == expert for a in t.args))


def describe_experts(spec: BuildSpec) -> dict[str, ExpertInfo]:
    """Every expert of a manifest as the plain `ExpertInfo` the plan and the renderer use, each
    described for the arguments the manifest's tasks give it."""
    return {name: runner.describe(task_args(spec, name)) for name, runner in manifest_runners(spec).items()}


def pick_device(gpus: float | None = None) -> str:
    """`cuda` when the worker was given a GPU share (or, with `gpus` None, whenever one is
    visible) and torch sees one; `cpu` otherwise."""
    if gpus is not None and gpus <= 0:
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
