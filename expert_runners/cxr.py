"""`cxr_ensemble`: VILA-M3's chest X-ray expert, an ensemble of 2D classifiers over 18 labels.

Each member is a classifier file on local disk; each votes on a subset of the 18 labels
(`CXR_LABELS`, TorchXRayVision's order). A label's probability is the mean of the members'
sigmoid outputs for it, and it is present when that mean is above the threshold (0.5), as in
VILA-M3 (`reference/VILA-M3.md`). Labels no member votes on are left out of the Findings. The
canonical label name is stored (`Pleural_Thickening`); templates write it lower-cased with `_`
as a space.

Manifest:

```yaml
experts:
  - name: CXR
    runner: cxr_ensemble
    bundle: /models/cxr          # optional: relative model paths resolve against it
    options:
      threshold: 0.5             # present: mean probability > threshold
      normalise: unit            # default input scaling of members: unit ([0, 1]) or xrv
      crop: none                 # default crop of members: none or center (square, central)
    models:
      - path: densenet_all.ts    # TorchScript: (1, 1, size, size) → (1, 18) or (1, len(labels)) logits
        kind: torchscript
      - path: opacity.pt2        # torch.export'ed program (torch.export.save), same interface
        kind: torch_export
        size: 224                # exported programs usually fix the input size: match it
      - path: ptx.pt             # a MONAI DenseNet121(spatial_dims=2, in_channels=1) state dict
        kind: monai_densenet
        labels: [Pneumothorax]   # the labels it votes on; default all 18
        size: 512                # input side; default 224
      - kind: torchxrayvision    # needs `pip install torchxrayvision` and its weights on disk
        weights: densenet121-res224-chex
```

Model paths: an absolute path is used as is; a relative one resolves against `bundle` when the
expert has one, else against the working directory of the process that reads the manifest
(the manifest loader does not resolve `models:`). They are made absolute when the runner is
built, so workers elsewhere find the same files.

Per member (all optional but `path`, or `weights` for torchxrayvision): `labels`, `size`,
`normalise`, `crop`, and `activation` (`sigmoid` on logits, the default; `none` for members
that output probabilities, the default for torchxrayvision, whose published models calibrate
their outputs so that 0.5 is the operating point). A model's output has 18 columns in
`CXR_LABELS` order or one column per entry of its `labels`, in that order.

Preprocessing, per member: grayscale (colour channels averaged); scaled to [0, 1] (8-bit
pictures divided by 255 as TorchXRayVision's `normalize(img, 255)` does; other pixel data,
such as DICOM values, min–max per image); optionally centre-cropped to a square; resized to
`size` × `size` (bilinear, antialiased); then, with `normalise: xrv`, mapped to
[−1024, 1024] (`x · 2048 − 1024`), TorchXRayVision's input range.

TorchXRayVision members are loaded through `torchxrayvision.models.get_model(weights)`; the
weight file must already be in its cache folder (`~/.torchxrayvision/models_data/`): this
runner never downloads. `weights` is a model name (`densenet121-res224-all`) or the path of
that file.
"""

from __future__ import annotations

import importlib
import os
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from curation.errors import CurationError
from curation.imaging import encode_png
from curation.manifest import ExpertSpec
from expert_runners.base import ExpertInput, ExpertRunner, phase
from expert_runners.monai_import import import_monai
from curation.findings import ClassResult, Findings, Image
from expert_runners.picture2d import grayscale, picture_2d

if TYPE_CHECKING:  # pragma: no cover - torch is imported where it is used
    import torch

CXR_LABELS: tuple[str, ...] = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
    "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia",
    "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)
KINDS = ("torchscript", "torch_export", "monai_densenet", "torchxrayvision")
ENTRY_KEYS = ("path", "weights", "kind", "labels", "size", "normalise", "crop", "activation")
OPTIONS = ("threshold", "normalise", "crop")
NORMALISE = ("unit", "xrv")
CROP = ("none", "center")
ACTIVATION = ("sigmoid", "none")
XRV_CACHE = Path("~/.torchxrayvision/models_data")


def canonical_label(name: str) -> str:
    """The `CXR_LABELS` spelling of a label, matched ignoring case, spaces and underscores.

    >>> canonical_label("pleural thickening"), canonical_label("LUNG_OPACITY")
    ('Pleural_Thickening', 'Lung Opacity')
    """
    key = str(name).lower().replace("_", " ").strip()
    for label in CXR_LABELS:
        if label.lower().replace("_", " ") == key:
            return label
    raise ValueError(f"{name!r} is not one of the 18 CXR labels {list(CXR_LABELS)}")


@dataclass(frozen=True, slots=True)
class Member:
    """One classifier of the ensemble, as declared (validated; paths absolute)."""

    index: int
    kind: str
    path: Path | None
    weights: str | None
    labels: tuple[str, ...]
    size: int
    normalise: str
    crop: str
    activation: str

    @property
    def title(self) -> str:
        return f"models[{self.index}] ({self.path or self.weights})"


@dataclass(slots=True)
class Loaded:
    """A member ready to run: the module and which output column holds each of its labels."""

    member: Member
    module: Any
    columns: dict[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------- numeric core

def unit_scale(gray: np.ndarray) -> np.ndarray:
    """(x, y) pixels → float32 in [0, 1]: uint8 / 255, anything else min–max.

    >>> unit_scale(np.array([[0, 255]], dtype=np.uint8)).tolist(), unit_scale(np.array([[100.0, 300.0]])).tolist()
    ([[0.0, 1.0]], [[0.0, 1.0]])
    """
    if gray.dtype == np.uint8:
        return gray.astype(np.float32) / 255.0
    a = gray.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    return np.zeros_like(a) if hi <= lo else (a - lo) / (hi - lo)


def model_input(unit: np.ndarray, *, size: int, normalise: str = "unit", crop: str = "none") -> torch.Tensor:
    """A (1, 1, size, size) float32 tensor from a [0, 1] (x, y) image: rows × columns as the
    picture is seen, optionally centre-cropped to a square, resized, optionally mapped to
    TorchXRayVision's [−1024, 1024]."""
    import torch
    import torch.nn.functional as F

    img = torch.from_numpy(np.ascontiguousarray(unit.T, dtype=np.float32))
    if crop == "center":
        rows, cols = img.shape
        side = min(rows, cols)
        top, left = (rows - side) // 2, (cols - side) // 2
        img = img[top : top + side, left : left + side]
    t = img[None, None]
    if tuple(t.shape[-2:]) != (size, size):
        t = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    if normalise == "xrv":
        t = t * 2048.0 - 1024.0
    return t.contiguous()


def ensemble(votes: list[dict[str, float]], threshold: float = 0.5) -> list[ClassResult]:
    """Per label (in `CXR_LABELS` order), the mean probability over the members that vote on
    it; present when the mean is above the threshold. Labels without a vote are left out.

    >>> [(c.name, c.probability, c.present) for c in ensemble([{"Edema": 0.9}, {"Edema": 0.3, "Mass": 0.5}])]
    [('Edema', 0.6, True), ('Mass', 0.5, False)]
    """
    out = []
    for label in CXR_LABELS:
        ps = [v[label] for v in votes if label in v]
        if ps:
            p = round(float(np.mean(ps)), 6)
            out.append(ClassResult(name=label, probability=p, present=p > threshold, threshold=threshold))
    return out


# ----------------------------------------------------------------------------- declaration

def _import_xrv() -> Any:
    try:
        return importlib.import_module("torchxrayvision")
    except ImportError as e:
        raise CurationError(
            "a cxr_ensemble member has kind: torchxrayvision, but the package is not installed: "
            "`pip install torchxrayvision` (and place its weights in ~/.torchxrayvision/models_data/), "
            "or drop that member"
        ) from e


def xrv_weight_file(xrv: Any, weights: str, where: str) -> tuple[str, Path]:
    """(model name, local weight file) of a TorchXRayVision member; the file must exist."""
    urls: dict[str, dict[str, Any]] = xrv.models.model_urls
    files = {name: os.path.basename(info["weights_url"]) for name, info in urls.items() if "weights_url" in info}
    cache = XRV_CACHE.expanduser()
    if weights in files:
        name, path = weights, cache / files[weights]
    else:
        given = Path(weights).expanduser()
        matches = [n for n, f in files.items() if f == given.name and n.startswith(("densenet", "resnet"))]
        if not matches:
            raise CurationError(f"{where}: weights {weights!r} is neither a torchxrayvision model name ({sorted(n for n in files if n.startswith(('densenet', 'resnet')))}) nor one of their weight files")
        name, path = matches[0], given.resolve()
        if path.parent != cache.resolve():
            raise CurationError(f"{where}: torchxrayvision reads weights from {cache}; move {path} there (as {given.name})")
    if not path.is_file():
        raise CurationError(f"{where}: the weights of torchxrayvision model {name!r} are not on disk at {path}; this runner never downloads: copy the file there")
    return name, path


def parse_members(spec: ExpertSpec, defaults: dict[str, str]) -> list[Member]:
    """Validate `spec.models` into Members, resolving paths (see the module docstring)."""
    where = f"expert {spec.name!r}"
    if not spec.models:
        raise CurationError(f"{where}: runner cxr_ensemble needs `models:`, a list of classifier entries ({{path, kind, labels, size}})")
    members = []
    for i, entry in enumerate(spec.models):
        at = f"{where}, models[{i}]"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict):
            raise CurationError(f"{at}: an entry must be a mapping with keys {list(ENTRY_KEYS)}, got {entry!r}")
        unknown = sorted(set(entry) - set(ENTRY_KEYS))
        if unknown:
            raise CurationError(f"{at}: unknown key(s) {unknown}; valid keys are {list(ENTRY_KEYS)}")
        kind = entry.get("kind", "torchscript")
        if kind not in KINDS:
            raise CurationError(f"{at}: kind must be one of {list(KINDS)}, got {kind!r}")
        path: Path | None = None
        weights = None
        default_labels: tuple[str, ...] = CXR_LABELS
        if kind == "torchxrayvision":
            if "weights" not in entry:
                raise CurationError(f"{at}: a torchxrayvision member needs `weights:` (a model name such as densenet121-res224-all)")
            xrv = _import_xrv()
            weights, path = xrv_weight_file(xrv, str(entry["weights"]), at)
            default_labels = tuple(label for label in xrv.models.model_urls[weights]["labels"] if label)
        else:
            if "path" not in entry:
                raise CurationError(f"{at}: a {kind} member needs `path:` (its model file)")
            raw = Path(str(entry["path"])).expanduser()
            path = (raw if raw.is_absolute() else (Path(spec.bundle) / raw if spec.bundle else raw)).resolve()
            if not path.is_file():
                base = f"expert `bundle` {spec.bundle}" if spec.bundle else "the working directory (no `bundle` given)"
                raise CurationError(f"{at}: model file {path} does not exist (relative paths resolve against {base})")
        try:
            labels = tuple(canonical_label(n) for n in entry.get("labels", default_labels))
        except ValueError as e:
            raise CurationError(f"{at}: labels: {e}") from e
        if not labels or len(set(labels)) != len(labels):
            raise CurationError(f"{at}: labels must be a non-empty list without repeats, got {list(labels)}")
        size = entry.get("size", 512 if weights and "res512" in weights else 224)
        if not isinstance(size, int) or size < 8:
            raise CurationError(f"{at}: size must be an integer of at least 8, got {size!r}")
        choices = {"normalise": NORMALISE, "crop": CROP, "activation": ACTIVATION}
        xrv_defaults = {"normalise": "xrv", "crop": "center", "activation": "none"}
        chosen = {}
        for key, allowed in choices.items():
            default = xrv_defaults[key] if kind == "torchxrayvision" else defaults.get(key, allowed[0])
            chosen[key] = entry.get(key, default)
            if chosen[key] not in allowed:
                raise CurationError(f"{at}: {key} must be one of {list(allowed)}, got {chosen[key]!r}")
        members.append(Member(i, kind, path, weights, labels, size, chosen["normalise"], chosen["crop"], chosen["activation"]))
    return members


# ----------------------------------------------------------------------------- loading

def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch

    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError("not a state dict (a mapping of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_member(member: Member, device: str, expert: str) -> Loaded:
    """Load one member onto `device`; a file that does not load is a CurationError naming it."""
    import torch

    try:
        if member.kind == "torchscript":
            with warnings.catch_warnings():  # torch ≥ 2.10 deprecates TorchScript; its files still load
                warnings.filterwarnings("ignore", message=r".*torch\.jit.* is deprecated", category=DeprecationWarning)
                module = torch.jit.load(str(member.path), map_location=device)
        elif member.kind == "torch_export":
            module = torch.export.load(str(member.path)).module()
        elif member.kind == "monai_densenet":
            import_monai()
            from monai.networks.nets import DenseNet121

            sd = _state_dict(member.path)  # type: ignore[arg-type]
            head = sd.get("class_layers.out.weight")
            if head is None:
                raise ValueError("no 'class_layers.out.weight': not a MONAI DenseNet121 state dict")
            module = DenseNet121(spatial_dims=2, in_channels=1, out_channels=int(head.shape[0]))
            module.load_state_dict(sd)
        else:
            module = _import_xrv().models.get_model(member.weights)
    except CurationError:
        raise
    except Exception as e:
        raise CurationError(
            f"expert {expert!r}: cannot load {member.title} as {member.kind}: {type(e).__name__}: {e}".replace("\n", " ")
        ) from e
    module = module.to(device)
    if member.kind != "torch_export":  # an exported program's mode was fixed when it was exported
        module = module.eval()
    if member.kind == "torchxrayvision":
        targets = list(module.pathologies)
        columns = {label: targets.index(label) for label in member.labels if label in targets}
    else:
        columns = {}  # decided from the output width at the first run
    return Loaded(member, module, columns)


def _columns(loaded: Loaded, width: int) -> dict[str, int]:
    m = loaded.member
    if loaded.columns:
        return loaded.columns
    if width == len(CXR_LABELS):
        loaded.columns = {label: CXR_LABELS.index(label) for label in m.labels}
    elif width == len(m.labels):
        loaded.columns = {label: i for i, label in enumerate(m.labels)}
    else:
        raise ValueError(f"{m.title} gives {width} outputs; expected {len(CXR_LABELS)} (all labels) or {len(m.labels)} (its `labels`)")
    return loaded.columns


# ----------------------------------------------------------------------------- runner

class CxrEnsembleRunner(ExpertRunner):
    """Mean of several chest X-ray classifiers per label, thresholded (VILA-M3's `<CXR()>`)."""

    runner: ClassVar[str] = "cxr_ensemble"
    thread_safe: ClassVar[bool] = True  # no state kept between calls (an expert host runs it in threads)
    modalities: ClassVar[tuple[str, ...]] = ("CR", "DX")
    kinds: ClassVar[tuple[str, ...]] = ("image2d",)
    PROVIDES: ClassVar[frozenset[str] | None] = frozenset({"classes", "key_slice"})

    def __init__(self, spec: ExpertSpec, *, image_max_side: int = 512):
        super().__init__(spec, image_max_side=image_max_side)
        where = f"expert {spec.name!r}"
        unknown = sorted(set(spec.options) - set(OPTIONS))
        if unknown:
            raise CurationError(f"{where}: unknown option(s) {unknown}; valid options are {list(OPTIONS)}")
        threshold = spec.options.get("threshold", 0.5)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
            raise CurationError(f"{where}: option 'threshold' must be a number between 0 and 1, got {threshold!r}")
        self.threshold = float(threshold)
        defaults = {k: str(spec.options[k]) for k in ("normalise", "crop") if k in spec.options}
        self.members = parse_members(spec, defaults)
        self.loaded: list[Loaded] = []

    def weight_files(self) -> list[Path]:
        return [m.path for m in self.members if m.path is not None]

    def setup(self, device: str = "cpu") -> None:
        self.device = device
        self.loaded = [load_member(m, device, self.name) for m in self.members]

    def predict(self, inp: ExpertInput, arg: str, timing: dict[str, float]) -> Findings:
        import torch

        with phase(timing, "load"):
            if not self.loaded:
                self.setup(self.device)
            gray = grayscale(np.asarray(inp.volume.array))
        with phase(timing, "preprocess"):
            unit = unit_scale(gray)
            inputs: dict[tuple[int, str, str], torch.Tensor] = {}
            for loaded in self.loaded:
                m = loaded.member
                key = (m.size, m.normalise, m.crop)
                if key not in inputs:
                    inputs[key] = model_input(unit, size=m.size, normalise=m.normalise, crop=m.crop).to(self.device)
        votes = []
        with phase(timing, "inference"), torch.no_grad():
            autocast = torch.autocast(device_type="cuda") if self.device.startswith("cuda") else nullcontext()
            with autocast:
                for loaded in self.loaded:
                    m = loaded.member
                    out = loaded.module(inputs[(m.size, m.normalise, m.crop)])
                    if isinstance(out, (tuple, list)):
                        out = out[0]
                    out = out.float().reshape(out.shape[0], -1)[0]
                    probs = torch.sigmoid(out) if m.activation == "sigmoid" else out
                    probs = probs.cpu().numpy()
                    votes.append({label: float(probs[col]) for label, col in _columns(loaded, probs.shape[0]).items()})
        with phase(timing, "postprocess"):
            classes = ensemble(votes, self.threshold)
            png = encode_png(picture_2d(gray), self.image_max_side)
        return Findings(
            expert=self.name, runner=self.runner, arg=arg, modality=inp.item.modality, classes=classes,
            images=[Image(kind="key_slice", png=png, caption="the chest X-ray")],
        )
