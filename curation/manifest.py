"""The build recipe: `manifests/*.yaml` read into a typed `BuildSpec`.

Every key is declared; an unknown key, a wrong type or a dangling reference (a task naming a
source that does not exist) is one `CurationError` naming the file and the key. Relative paths
resolve against the manifest's folder, so a manifest works from any working directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from curation.errors import CurationError, validation_message
from curation.expert_args import canonical_arg


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SeriesRules(_Spec):
    """Which DICOM series become items, in the spirit of MONAI Deploy's series selector."""

    modalities: list[str] | None = None  # None: any modality
    image_type_all: list[str] = ["ORIGINAL", "PRIMARY"]
    image_type_none: list[str] = ["LOCALIZER"]
    min_slices: int = Field(8, ge=1)


DEFAULT_MAX_VOXELS = 1 << 30  # ~1.07 G voxels: 4 GiB as float32; a 512×512×4096 CT fits
DEFAULT_MAX_PIXELS = 50_000_000  # a 2D image: the largest radiographs and mammograms are ~30 MP
# PIL, which decodes pictures, refuses one of more pixels than this (2 × Image.MAX_IMAGE_PIXELS,
# its decompression-bomb guard): a larger `max_pixels` would index pictures no load can decode
PIL_MAX_PIXELS = 2 * (1024 * 1024 * 1024 // 4 // 3)


class _SourceBase(_Spec):
    """What every source has. Limits are checked against the sizes headers declare, at index
    time, before anything is decoded or memory is reserved: a larger item is set aside with the
    reason, and loaders refuse it too (`convert` and `build` obey the same caps)."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    root: Path
    follow_links: bool = True  # follow symbolic links (each real file and folder once; see curation.ingest.walk)
    max_voxels: int = Field(DEFAULT_MAX_VOXELS, ge=1)  # per 3D item: x × y × z (× channels)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)  # per 2D image: width × height

    @field_validator("max_pixels")
    @classmethod
    def _decodable(cls, value: int) -> int:
        if value > PIL_MAX_PIXELS:
            raise ValueError(f"at most {PIL_MAX_PIXELS:,}: pictures are decoded by PIL, which refuses more pixels "
                             "(its decompression-bomb guard)")
        return value


class DicomSourceSpec(_SourceBase):
    kind: Literal["dicom"]
    select: SeriesRules = SeriesRules()
    labels: Path | None = None  # folder of <SeriesInstanceUID>.nii.gz ground-truth label maps
    workers: int | None = Field(None, ge=1)  # file-reading threads of one item's load; default: CPU count
    keep_burned_in: bool = False  # True: keep images at risk of burned-in text (BurnedInAnnotation YES, ultrasound)


class NiftiSourceSpec(_SourceBase):
    kind: Literal["nifti"]
    modality: str = "CT"
    split_4d: bool = True  # a 4D file becomes one item per volume; False sets it aside
    patient_pattern: str | None = None  # regex on the relative path; group "patient"


class NiftiGroupSourceSpec(_SourceBase):
    kind: Literal["nifti_group"]
    channels: list[str] = Field(min_length=1)
    pattern: str = "{case}/{case}_{channel}.nii.gz"
    labels: str | None = None  # the channel name of a ground-truth label file, e.g. "seg"
    modality: str = "MR"


class Image2DSourceSpec(_SourceBase):
    kind: Literal["image2d"]
    labels: Path | None = None  # CSV: column `image` (path under root), optional `patient_id`, 0/1 label columns
    modality: str = "CR"
    keep_burned_in: bool = False  # as for DICOM sources: applies to the DICOM files among the images


class QaSourceSpec(_SourceBase):
    """An existing question–answer set (VQA-RAD, SLAKE, MIMIC-CXR VQA exports): `file` is a
    LLaVA-style JSON (`image` + `conversations`), a JSON list or JSON-lines of records, or a CSV,
    with an image, a question and an answer per record; image paths are relative to `root`.
    Each record becomes a 2D item carrying its own Q/A (see `curation.ingest.qa`)."""

    kind: Literal["qa"]
    file: Path  # relative paths resolve against the manifest's folder, like `root`
    modality: str = "CR"
    columns: dict[str, str] = {}  # our name (image, question, answer, patient_id, answer_type) → the file's
    keep_burned_in: bool = False  # as for DICOM sources: applies to the DICOM files among the images


SourceSpec = Annotated[
    DicomSourceSpec | NiftiSourceSpec | NiftiGroupSourceSpec | Image2DSourceSpec | QaSourceSpec,
    Field(discriminator="kind"),
]


# ExpertSpec keys that only place the work (see its docstring): never part of a fingerprint.
SCHEDULING_KEYS = ("actors", "batch_size", "gpus", "memory_gb")


class ExpertSpec(_Spec):
    """An expert and how `m3-curate build` schedules it. `actors` (pool size; default one per
    GPU share, else 1), `batch_size` (items per actor call), `gpus` (per actor; default 1
    on a cluster with GPUs for runners with weights, else 0) and `memory_gb` (host memory each
    actor reserves in Ray's scheduler; default none) only place the work: they are not part
    of the expert's fingerprint, so changing them keeps the cache.

    `min_size_ml` is the smallest connected part of a segmented structure that is reported:
    smaller parts (a 0.1 mL "tumour" speck) are dropped from the label map before anything is
    measured or drawn, in the expert's output and in the ground truth alike (0 keeps all; 2D
    masks have no volume and keep all).
    The default, 0.5 mL, is a sphere of 10 mm: the usual size below which a lesion is not
    measured (RECIST)."""

    name: str
    runner: str
    bundle: Path | None = None
    models: list[Any] = []
    options: dict[str, Any] = {}
    min_size_ml: float = Field(0.5, ge=0)
    actors: int | None = Field(None, ge=1)
    batch_size: int = Field(1, ge=1)
    gpus: float | None = Field(None, ge=0)
    memory_gb: float | None = Field(None, gt=0)

    def without_placement(self) -> "ExpertSpec":
        """The spec with the placement keys at their defaults: what a runner is built from and
        what its fingerprint covers, so pool sizes never change a fingerprint."""
        return self.model_copy(update={k: type(self).model_fields[k].default for k in SCHEDULING_KEYS})


class TaskSpec(_Spec):
    """One kind of conversation: a template over a source's items, optionally through an
    expert called with `args` (one argument, or a list that variants take in turn, e.g.
    VISTA3D groups; each kept in its one spelling, `curation.expert_args.canonical_arg`).
    `weight` is the upsampling factor of VILA-M3's mixtures: variants per item (a fractional
    part is sampled with the seed)."""

    template: str
    source: str
    expert: str | None = None
    args: list[str] = Field([""], min_length=1)
    weight: float = Field(1.0, gt=0)
    # Where closed answers come from when the item has no ground truth: `truth` (default) sets
    # such items aside; `expert` answers from the expert's prediction (counted in the card).
    answer_from: Literal["truth", "expert"] = "truth"

    @field_validator("args", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("args")
    @classmethod
    def _canonical(cls, value: list[str]) -> list[str]:
        return [canonical_arg(a) for a in value]


class SplitSpec(_Spec):
    by: Literal["patient"] = "patient"
    val: float = Field(0.1, ge=0, lt=1)
    test: float = Field(0.1, ge=0, lt=1)

    @model_validator(mode="after")
    def _fractions(self) -> "SplitSpec":
        if self.val + self.test >= 1:
            raise ValueError(f"val + test must be below 1, got {self.val} + {self.test}")
        return self


class OutputSpec(_Spec):
    dir: Path = Path("out")
    rows_per_shard: int = Field(2000, ge=1)
    image_max_side: int = Field(512, ge=16)
    cache: Path | None = None  # default: <dir>/cache


class BuildSpec(_Spec):
    name: str
    seed: int = 0
    key: str | None = None  # secret for pseudonymous keys; M3_CURATE_KEY overrides
    # The dataset card's licence: a Hugging Face licence id (cc-by-4.0, apache-2.0, …) or "other";
    # the build cannot know the terms of the archive, so it never guesses them.
    license: str = Field("other", pattern=r"^[a-z0-9][a-z0-9.+-]*$")
    description: str = ""  # the card's opening paragraph: what the archive is, who may use it
    sources: list[SourceSpec] = Field(min_length=1)
    experts: list[ExpertSpec] = []
    tasks: list[TaskSpec] = []
    prompts: list[Path] = []  # template folders searched before the built-in prompts/
    split: SplitSpec = SplitSpec()
    output: OutputSpec = OutputSpec()
    _written: dict[str, str] = PrivateAttr(default_factory=dict)  # resolved path → as the manifest wrote it (`load_manifest`)

    @model_validator(mode="after")
    def _references(self) -> "BuildSpec":
        for what, names in (("sources", [s.name for s in self.sources]), ("experts", [e.name for e in self.experts])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what}: duplicate name(s) {dupes}")
        sources = {s.name for s in self.sources}
        experts = {e.name for e in self.experts}
        for i, task in enumerate(self.tasks):
            if task.source not in sources:
                raise ValueError(f"tasks[{i}].source: no source named {task.source!r} (have {sorted(sources)})")
            if task.expert is not None and task.expert not in experts:
                raise ValueError(f"tasks[{i}].expert: no expert named {task.expert!r} (have {sorted(experts)})")
        return self

    def source(self, name: str) -> SourceSpec:
        for s in self.sources:
            if s.name == name:
                return s
        raise CurationError(f"no source named {name!r} in manifest {self.name!r}")


def resolve_paths(data: dict[str, Any], base: Path, written: dict[str, str] | None = None) -> dict[str, Any]:
    """Make relative paths absolute against the manifest's folder (before validation, so
    error messages still show what the user wrote when a value has the wrong type). Also what
    makes a copy of a manifest's data work from another folder. `written` collects each path
    made absolute and what the manifest wrote for it (what its hash counts)."""
    written = {} if written is None else written

    def resolve(value: Any, against: Path = base) -> Any:
        if not isinstance(value, str) or Path(value).is_absolute():
            return value
        resolved = str((against / value).resolve())
        written[resolved] = value
        return resolved

    for src in data.get("sources") or []:
        if isinstance(src, dict):
            for key in ("root", "file") if src.get("kind") == "qa" else ("root",):
                if key in src:
                    src[key] = resolve(src[key])
            if src.get("kind") in ("dicom", "image2d") and "labels" in src and isinstance(src.get("root"), str):
                src["labels"] = resolve(src["labels"], Path(src["root"]))  # against the root: labels usually live inside it
    if isinstance(data.get("prompts"), list):
        data["prompts"] = [resolve(p) for p in data["prompts"]]
    for exp in data.get("experts") or []:
        if isinstance(exp, dict) and "bundle" in exp:
            exp["bundle"] = resolve(exp["bundle"])
    out = data.get("output")
    if isinstance(out, dict):
        for key in ("dir", "cache"):
            if key in out:
                out[key] = resolve(out[key])
    elif out is None:
        data["output"] = {"dir": resolve(f"out/{data.get('name', 'build')}")}
    return data


def load_manifest(path: str | Path) -> BuildSpec:
    """Read and validate a manifest; every problem is a `CurationError` naming file and key."""
    path = Path(path)
    if not path.is_file():
        raise CurationError(f"manifest not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CurationError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from e
    if not isinstance(data, dict):
        raise CurationError(f"{path}: a manifest is a mapping of keys (name, sources, …), got {type(data).__name__}")
    written: dict[str, str] = {}
    data = resolve_paths(data, path.parent.resolve(), written)
    try:
        spec = BuildSpec.model_validate(data)
    except ValidationError as e:
        raise CurationError(f"{path}: {validation_message(e)}") from None
    spec._written = written
    return spec


def manifest_hash(spec: BuildSpec) -> str:
    """A stable hash of the manifest, part of every row's provenance. A path the manifest wrote
    relative to its folder counts as written (an absolute one, as it is): the same recipe checked
    out in two places, or on two machines, hashes alike (and makes the same rows).

    >>> spec = BuildSpec(name="x", sources=[{"name": "a", "kind": "nifti", "root": "/one/data/a"}])
    >>> spec._written = {"/one/data/a": "data/a"}
    >>> moved = BuildSpec(name="x", sources=[{"name": "a", "kind": "nifti", "root": "/two/data/a"}])
    >>> moved._written = {"/two/data/a": "data/a"}
    >>> manifest_hash(spec) == manifest_hash(moved)
    True
    """
    text = json.dumps(_replaced(spec.model_dump(mode="json"), spec._written), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _replaced(data: Any, strings: dict[str, str]) -> Any:
    if isinstance(data, dict):
        return {k: _replaced(v, strings) for k, v in data.items()}
    if isinstance(data, list):
        return [_replaced(v, strings) for v in data]
    return strings.get(data, data) if isinstance(data, str) else data
