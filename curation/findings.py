"""Findings: what an expert returns, as plain data.

Templates only ever see Findings, never tensors, so everything a conversation may state (a
volume, a count, a side, a yes/no) must be here, computed once from the expert's output. The
JSON form (`Findings.to_dict`) is what a shard's `findings` column holds; images travel
separately as PNG bytes.

Schema (all JSON-safe):

- `expert`, `runner`, `args`: who ran and with which argument (`everything`, `hepatic tumor`, …)
- `modality`: CT, MR, CR, …
- `structures`: per segmented structure — `label` (id), `name`, `voxels`, `volume_ml`,
  `bbox` ([x0, y0, z0, x1, y1, z1], half-open voxel indices), `key_slice` (axial index of
  largest area), `centroid_ras` (mm), `side` (patient's `left`/`right`/`midline`/`both`), `components`
  (count) and `component_volumes_ml` (largest first), `colour` (overlay colour name or null)
- `classes`: per class — `name`, `probability`, `present` (probability > `threshold`), `threshold`
- `legend`: overlay colour name → structure name, in drawing order
- `images`: list of {`kind` (`key_slice`, `overlay`, `sequence`), `slice`, `caption`} — the
  PNG bytes are in `Findings.images[i].png`, not in the JSON
- `timing`: seconds per phase (`load`, `preprocess`, `inference`, `postprocess`)
"""

from __future__ import annotations

import base64
from dataclasses import asdict, dataclass, field
from typing import Any



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


@dataclass(slots=True)
class Findings:
    expert: str
    runner: str
    args: str = ""
    modality: str = ""
    structures: list[Structure] = field(default_factory=list)
    classes: list[ClassResult] = field(default_factory=list)
    legend: dict[str, str] = field(default_factory=dict)
    images: list[Image] = field(default_factory=list)
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
    def from_dict(cls, d: dict[str, Any]) -> "Findings":
        d = dict(d)
        d["structures"] = [Structure(**s) for s in d.get("structures", [])]
        d["classes"] = [ClassResult(**c) for c in d.get("classes", [])]
        d["images"] = [
            Image(kind=i["kind"], png=base64.b64decode(i.get("png_base64", "")), slice=i.get("slice"), caption=i.get("caption", ""))
            for i in d.get("images", [])
        ]
        return cls(**d)
