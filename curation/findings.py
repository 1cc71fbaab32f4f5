"""Findings: what an expert returns, as plain data.

Templates only ever see Findings, never tensors, so everything a conversation may state (a
volume, a count, a side, a yes/no) must be here, computed once from the expert's output. The
JSON form (`Findings.to_dict`) is what a shard's `findings` column holds; images travel
separately as PNG bytes.

Schema (all JSON-safe):

- `expert`, `runner`, `arg`: who ran and with which argument (`everything`, `hepatic tumor`, …)
- `modality`: CT, MR, CR, …
- `structures`: per segmented structure — `label` (id), `name`, `voxels`, `volume_ml`,
  `bbox` ([x0, y0, z0, x1, y1, z1], half-open voxel indices), `key_slice` (axial index of
  largest area), `centroid_ras` (mm), `side` (patient's `left`/`right`/`midline`/`both`), `components`
  (count) and `component_volumes_ml` (largest first), `colour` (overlay colour name or null).
  Parts smaller than the expert's `min_size_ml` are not structures (nor drawn, nor counted).
- `classes`: per class — `name`, `probability`, `present` (probability > `threshold`), `threshold`
- `legend`: overlay colour name → structure name(s), over the whole label map, in drawing order
  (a picture shows only some: its own legend is its `labels` that have a colour)
- `images`: the pictures, each {`kind` (`key_slice`, `overlay`, `sequence`), `slice` (axial
  index), `caption`, `labels` (the structures on that slice in the expert's label map, in
  drawing order: on an overlay, the ones drawn), `truth` (the structures on that slice in the
  reference annotation, null without one), `digest` (sha256 of the PNG, first 16 hex)}. The
  first two are the main slice (the reference's largest labelled area when there is a
  reference, else the expert's) without and with the overlay; then the same pair for every
  other structure's key slice, in slice order, so a question about X can show X's own
  largest cross-section. The PNG bytes are in `Findings.images[i].png`, not in the JSON.
- `truth`: the reference for the same item and argument, null when there is none: the
  ground-truth label map measured exactly as the expert's (`structures`, uncoloured) and, for
  a labelled 2D image, its `classes`. Answers are taken from here where it exists.
- `timing`: seconds per phase (`load`, `preprocess`, `inference`, `postprocess`)
"""

from __future__ import annotations

import base64
import hashlib
from dataclasses import asdict, dataclass, field
from typing import Any


def without_timing(data: dict[str, Any]) -> dict[str, Any]:
    """Findings as a row or a preview shows them (`Findings.to_dict`, or the renderer's
    `findings_data`): run timings left out, as they differ between runs and are not findings."""
    return {k: v for k, v in data.items() if k != "timing"}


def png_digest(png: bytes) -> str:
    """The digest a picture is known by in rows and meta (sha256, first 16 hex digits)."""
    return hashlib.sha256(png).hexdigest()[:16]


@dataclass(slots=True)
class Structure:
    label: int
    name: str
    voxels: int
    volume_ml: float
    bbox: list[int]
    key_slice: int
    centroid_ras: list[float]
    side: str
    components: int
    component_volumes_ml: list[float]
    colour: str | None = None


@dataclass(slots=True)
class ClassResult:
    name: str
    probability: float
    present: bool
    threshold: float = 0.5


@dataclass(slots=True)
class Image:
    kind: str
    png: bytes
    slice: int | None = None
    caption: str = ""
    labels: list[str] = field(default_factory=list)
    truth: list[str] | None = None
    digest: str = ""

    def __post_init__(self) -> None:
        if not self.digest and self.png:
            self.digest = png_digest(self.png)


@dataclass(slots=True)
class Truth:
    """The reference annotation of the item, in the expert's terms."""

    structures: list[Structure] = field(default_factory=list)
    classes: list[ClassResult] = field(default_factory=list)


@dataclass(slots=True)
class Findings:
    expert: str
    runner: str
    arg: str = ""
    modality: str = ""
    structures: list[Structure] = field(default_factory=list)
    classes: list[ClassResult] = field(default_factory=list)
    legend: dict[str, str] = field(default_factory=dict)
    images: list[Image] = field(default_factory=list)
    truth: Truth | None = None
    timing: dict[str, float] = field(default_factory=dict)

    def structure(self, name: str) -> Structure | None:
        return next((s for s in self.structures if s.name == name), None)

    def to_dict(self, *, with_png: bool = False) -> dict[str, Any]:
        """JSON-safe form; PNG bytes only when asked (as base64, for the cache)."""
        d = asdict(self)
        for img in d["images"]:
            png = img.pop("png")
            if with_png:
                img["png_base64"] = base64.b64encode(png).decode()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Findings:
        d = dict(d)
        d["structures"] = [Structure(**s) for s in d.get("structures", [])]
        d["classes"] = [ClassResult(**c) for c in d.get("classes", [])]
        d["images"] = [
            Image(kind=i["kind"], png=base64.b64decode(i.get("png_base64", "")), slice=i.get("slice"), caption=i.get("caption", ""),
                  labels=list(i.get("labels", [])), truth=None if i.get("truth") is None else list(i["truth"]),
                  digest=i.get("digest", ""))
            for i in d.get("images", [])
        ]
        truth = d.get("truth")
        d["truth"] = None if truth is None else Truth(structures=[Structure(**s) for s in truth.get("structures", [])],
                                                       classes=[ClassResult(**c) for c in truth.get("classes", [])])
        return cls(**d)
