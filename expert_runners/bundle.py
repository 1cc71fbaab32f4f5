"""Reading a local MONAI bundle folder: what a runner needs, typed once.

A bundle is `configs/metadata.json`, `configs/inference.json` (or `.yaml`) and
`models/model.pt` (a state dict). `read_bundle` turns it into a `Bundle`: label names from the
metadata's `channel_def`, the inference patch size, overlap and batch size, the preprocessing
steps we honour, and any extra config values a runner asks for (VISTA3D: `everything_labels`,
`subclass`). `Bundle.build_network` makes the network from `network_def` and loads the weights.
Nothing is ever downloaded: a missing file is a `CurationError` naming it.

How config values are read, and why. A MONAI bundle config is partly Python: `$` expressions
(`"$list(range(33, 57)) + …"`), `@` references and `_target_` components. The real bundles
are written for MONAI's own `monai.bundle.ConfigParser`, so we read them with it: any other
reader would drift from the published semantics. `ConfigParser` evaluates `$` strings with
`eval`, so we keep it on a short leash:

- it only ever reads config files inside the bundle folder the manifest names (a bundle is
  code by construction, trusted like an installed package — the same trust MONAI asks for);
- only the ids listed here are resolved (`network_def`, `inferer#…`, one argument of one
  preprocessing transform at a time, and the runner's extra keys) — never `imports`,
  `initialize`, `run`, `evaluator`, `network` or the loaders, so nothing else executes;
- `bundle_root` is set to the bundle folder, so relative references point inside it;
- weights are read with `torch.load(weights_only=True)`, so `model.pt` cannot run code.

Nothing else in m3-curate evaluates config strings.

>>> sorted(HONOURED)[:3]
['CropForegroundd', 'DivisiblePadd', 'NormalizeIntensityd']
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curation.errors import CurationError
from expert_runners.monai_import import import_monai

if TYPE_CHECKING:  # pragma: no cover - imported where used: reading a bundle's configs needs no torch
    import torch

CONFIG_NAMES = ("inference.json", "inference.yaml", "inference.yml")

# Preprocessing transforms we rebuild from the config, with the arguments we pass through.
HONOURED: dict[str, tuple[str, ...]] = {
    "Spacingd": ("pixdim", "mode", "padding_mode", "align_corners", "diagonal", "scale_extent"),
    "Orientationd": ("axcodes",),
    "CropForegroundd": ("margin", "allow_smaller", "k_divisible"),
    "ScaleIntensityRanged": ("a_min", "a_max", "b_min", "b_max", "clip"),
    "NormalizeIntensityd": ("nonzero", "channel_wise", "subtrahend", "divisor"),
    "ScaleIntensityd": ("minv", "maxv", "factor", "channel_wise"),
    "DivisiblePadd": ("k", "mode"),
    "SpatialPadd": ("spatial_size", "mode"),
    "VistaPreTransformd": (),  # a marker: the VISTA3D runner puts its prompt conversion here
}
# Transforms made unnecessary by how runners hand over the input: an in-memory float32
# channel-first MetaTensor with its RAS affine, on the CPU.
HANDLED = {"LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureTyped", "CastToTyped", "ToDeviced", "ToTensord", "Identityd"}
# Arguments that carry no numeric meaning once the key is checked.
_QUIET_ARGS = {"_target_", "_disabled_", "_requires_", "_desc_", "_mode_", "keys", "allow_missing_keys", "meta_keys", "meta_key_postfix", "source_key", "dtype", "image_only", "track_meta", "lazy"}
_REFERENCE = re.compile(r"^\$?\s*@([\w#]+)\s*$")


@dataclass(frozen=True, slots=True)
class TransformStep:
    """One honoured preprocessing transform: MONAI dictionary-transform name and its resolved
    keyword arguments (only those listed in `HONOURED`)."""

    name: str
    args: dict[str, Any]


@dataclass(slots=True)
class Bundle:
    """What runners need from one bundle folder. Plain data: picklable, cheap to ship to
    workers; the network is built on the worker by `build_network`."""

    root: Path
    config_file: Path
    metadata_file: Path
    weights_file: Path
    name: str
    modality: str | None
    input_channels: int
    input_names: dict[int, str]
    label_names: dict[int, str]
    preprocessing: list[TransformStep]
    ignored: list[str]  # transforms / arguments in the config that we do not apply
    patch_size: list[int] | None  # None: the bundle infers on the whole volume
    sw_batch_size: int
    overlap: float
    amp: bool
    activation: str  # "softmax" (argmax over channels) or "sigmoid" (per-channel threshold)
    values: dict[str, Any] = field(default_factory=dict)

    def weight_files(self) -> list[Path]:
        """The files that define the expert: both configs and the weights (the cache key)."""
        return [self.config_file, self.metadata_file, self.weights_file]

    def build_network(self, device: str = "cpu") -> torch.nn.Module:
        """`network_def` from the config with `models/model.pt` loaded, in eval mode on `device`.

        The network is built on the meta device and the weights assigned to it, so no time is
        spent on a random initialisation that the weights overwrite at once (VISTA3D: 7 s).
        """
        import torch

        parser = _parser(self.config_file, self.root)
        if "network_def" not in parser:
            raise CurationError(f"{self.config_file}: no `network_def`; a runnable bundle defines its network under that key")
        state = load_state_dict(self.weights_file)
        with torch.device("meta"):
            net = _resolve(parser, self.config_file, "network_def")
        if not isinstance(net, torch.nn.Module):
            raise CurationError(f"{self.config_file}: `network_def` gives a {type(net).__name__}, not a torch module")
        wanted = net.state_dict()
        _check_keys(self.weights_file, wanted.keys(), state.keys())
        state = {k: v.to(wanted[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
        net.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in [*net.parameters(), *net.buffers()]):
            # a tensor made at construction but not saved (non-persistent buffer): build for real
            net = _resolve(_parser(self.config_file, self.root), self.config_file, "network_def")
            net.load_state_dict(state, strict=True)
        return net.to(device).eval()


def read_bundle(root: str | Path, *, extra_keys: tuple[str, ...] = ()) -> Bundle:
    """Read a bundle folder; every missing file or unreadable key is a `CurationError` that
    names it. `extra_keys` are top-level config ids resolved into `Bundle.values` when present."""
    root = Path(root)
    if not root.is_dir():
        raise CurationError(f"MONAI bundle folder not found: {root} (expected configs/metadata.json, configs/inference.json, models/model.pt)")
    metadata_file = root / "configs" / "metadata.json"
    config_file = next((root / "configs" / n for n in CONFIG_NAMES if (root / "configs" / n).is_file()), root / "configs" / CONFIG_NAMES[0])
    weights_file = root / "models" / "model.pt"
    for path in (metadata_file, config_file, weights_file):
        if not path.is_file():
            raise CurationError(f"MONAI bundle {root}: missing {path.relative_to(root)} (nothing is downloaded; put the bundle's files there)")
    try:
        metadata = json.loads(metadata_file.read_text())
    except (OSError, ValueError) as e:
        raise CurationError(f"{metadata_file}: not readable JSON: {e}") from e
    inputs = _first(metadata, "inputs", "image", metadata_file)
    outputs = _first(metadata, "outputs", "pred", metadata_file)
    parser = _parser(config_file, root)
    image_key = str(_resolve(parser, config_file, "image_key", "image"))
    steps, ignored = _preprocessing(parser, config_file, image_key)
    patch = _resolve(parser, config_file, "inferer#roi_size", None)
    if patch is None:
        patch = _resolve(parser, config_file, "patch_size", None)
    return Bundle(
        root=root,
        config_file=config_file,
        metadata_file=metadata_file,
        weights_file=weights_file,
        name=str(metadata.get("name", root.name)),
        modality=inputs.get("modality"),
        input_channels=int(inputs.get("num_channels", 1)),
        input_names=_channel_def(inputs, metadata_file),
        label_names=_channel_def(outputs, metadata_file),
        preprocessing=steps,
        ignored=ignored,
        patch_size=[int(p) for p in patch] if patch is not None else None,
        sw_batch_size=int(_resolve(parser, config_file, "inferer#sw_batch_size", 1)),
        overlap=float(_resolve(parser, config_file, "inferer#overlap", 0.25)),
        amp=bool(_resolve(parser, config_file, "evaluator#amp", _resolve(parser, config_file, "amp", True))),
        activation=_activation(parser),
        values={k: _resolve(parser, config_file, k) for k in extra_keys if k in parser},
    )


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Weights from `model.pt` in any of the layouts MONAI bundles use: a bare state dict, or a
    checkpoint dict holding it under `model` (MONAI's CheckpointSaver), `state_dict`,
    `model_state_dict` or `network`; a DataParallel `module.` prefix is removed."""
    import torch

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CurationError(f"{path}: not a PyTorch state dict ({type(e).__name__}: {e}); TorchScript files are not supported here".replace("\n", " ")) from e
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict", "network"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CurationError(f"{path}: expected a state dict (parameter name → tensor), got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _check_keys(path: Path, wanted: Any, found: Any) -> None:
    missing, unexpected = sorted(set(wanted) - set(found)), sorted(set(found) - set(wanted))
    if missing or unexpected:
        raise CurationError(
            f"{path}: weights do not fit the bundle's `network_def` — missing {len(missing)} "
            f"(e.g. {missing[:3]}), unexpected {len(unexpected)} (e.g. {unexpected[:3]})"
        )


def _parser(config_file: Path, root: Path) -> Any:
    import_monai()
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    try:
        parser.read_config(str(config_file))
    except Exception as e:
        raise CurationError(f"{config_file}: not a readable bundle config: {e}".replace("\n", " ")) from e
    parser["bundle_root"] = str(root)
    return parser


_MISSING = object()


def _resolve(parser: Any, config_file: Path, id: str, default: Any = _MISSING) -> Any:
    if id not in parser:
        if default is _MISSING:
            raise CurationError(f"{config_file}: missing key `{id}`")
        return default
    try:
        return parser.get_parsed_content(id)
    except Exception as e:
        raise CurationError(f"{config_file}: cannot read `{id}`: {type(e).__name__}: {e}".replace("\n", " ")) from e


def _first(metadata: dict[str, Any], section: str, preferred: str, metadata_file: Path) -> dict[str, Any]:
    part = metadata.get("network_data_format", {}).get(section, {})
    if not isinstance(part, dict) or not part:
        raise CurationError(f"{metadata_file}: missing `network_data_format.{section}`")
    return part.get(preferred) or next(iter(part.values()))


def _channel_def(part: dict[str, Any], metadata_file: Path) -> dict[int, str]:
    try:
        return {int(k): str(v) for k, v in part.get("channel_def", {}).items()}
    except ValueError as e:
        raise CurationError(f"{metadata_file}: `channel_def` keys must be integers ({e})") from e


def _transform_list_id(parser: Any, base: str) -> str | None:
    """The config id of a list of transforms: `preprocessing#transforms`, or what a
    `"$@name"` string there refers to, or `preprocessing_transforms`."""
    raw = parser.get(base)
    if isinstance(raw, dict):
        transforms = raw.get("transforms")
        if isinstance(transforms, list):
            return f"{base}#transforms"
        if isinstance(transforms, str) and (m := _REFERENCE.match(transforms)):
            return m.group(1)
    if isinstance(raw, list):
        return base
    return f"{base}_transforms" if isinstance(parser.get(f"{base}_transforms"), list) else None


def _preprocessing(parser: Any, config_file: Path, image_key: str) -> tuple[list[TransformStep], list[str]]:
    list_id = _transform_list_id(parser, "preprocessing")
    if list_id is None:
        return [], []
    steps: list[TransformStep] = []
    ignored: list[str] = []
    for i, raw in enumerate(parser.get(list_id)):
        if not isinstance(raw, dict) or "_target_" not in raw:
            ignored.append(f"{list_id}#{i}")
            continue
        name = str(raw["_target_"]).rsplit(".", 1)[-1]
        where = f"{list_id}#{i}"
        if str(_resolve(parser, config_file, f"{where}#_disabled_", False)).lower() == "true" or name in HANDLED:
            continue
        keys = _resolve(parser, config_file, f"{where}#keys", image_key)
        keys = [keys] if isinstance(keys, str) else list(keys)
        if image_key not in keys:
            continue  # acts on labels or other keys only
        if name not in HONOURED:
            ignored.append(name)
            continue
        if name == "CropForegroundd" and _resolve(parser, config_file, f"{where}#source_key", image_key) != image_key:
            ignored.append(f"{name} (source_key)")
            continue
        args: dict[str, Any] = {}
        for arg in raw if HONOURED[name] else ():  # a marker's arguments are the runner's business
            if arg in HONOURED[name]:
                value = _resolve(parser, config_file, f"{where}#{arg}")
                if isinstance(value, (list, tuple)) and arg == "mode":
                    value = value[keys.index(image_key)]
                args[arg] = value
            elif arg not in _QUIET_ARGS:
                ignored.append(f"{name}.{arg}")
        steps.append(TransformStep(name, args))
    return steps, ignored


def _activation(parser: Any) -> str:
    """`sigmoid` when the postprocessing applies a sigmoid and no argmax, else `softmax`."""
    list_id = _transform_list_id(parser, "postprocessing")
    sigmoid = argmax = False
    for raw in parser.get(list_id) if list_id else []:
        if not isinstance(raw, dict):
            continue
        name = str(raw.get("_target_", "")).rsplit(".", 1)[-1]
        sigmoid |= name in ("Activationsd", "Activations") and raw.get("sigmoid") is True
        argmax |= name in ("AsDiscreted", "AsDiscrete") and raw.get("argmax") is True
    return "sigmoid" if sigmoid and not argmax else "softmax"


def warn_ignored(bundle: Bundle, expert: str) -> None:
    """Say once, on the worker, which parts of the bundle's preprocessing are not applied."""
    if bundle.ignored:
        warnings.warn(f"expert {expert}: bundle {bundle.root} preprocessing not applied: {', '.join(bundle.ignored)}", stacklevel=2)
