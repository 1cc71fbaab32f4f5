"""Loading a model's processor on a machine without torchvision.

transformers 5.x builds the video processor of Qwen2-VL, Qwen2.5-VL (and other families that
take video) only with torchvision, and it class-checks that sub-processor even when no video is
ever passed: `AutoProcessor.from_pretrained` then fails ("Can't load video processor" /
`VIDEO_PROCESSOR_MAPPING`), and so does `Qwen2VLProcessor(..., video_processor=None)`. PyPI's
torchvision wheels for x86_64 Linux are built against CUDA torch (their `_C.so` links
`libtorch_cuda.so`), so beside a CPU torch they fail to import ("operator torchvision::nms does
not exist"), and PyPI has no torchvision source release to build one.

Shards hold images only, so here the processor is built without its video processor:
`image_only(cls)` is the family's own processor class with `video_processor` left out of its
constructor (transformers derives a processor's parts from that signature), and everything else
— the image processor (its PIL backend), tokenizer, chat template, image-token expansion — is
the family's own. Saved, it writes the same files as the full processor minus the video part;
`save_processor` copies the base model's video config beside it, so a machine with torchvision
loads the output with plain `AutoProcessor`.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from curation.errors import CurationError

log = logging.getLogger(__name__)

VIDEO_CONFIGS = ("video_preprocessor_config.json",)


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


@functools.cache
def image_only(cls: type) -> type:
    """`cls` (a processor class) without its video processor; `cls` itself if it takes none."""
    if "video_processor" not in inspect.signature(cls.__init__).parameters:
        return cls

    def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any) -> None:
        cls.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    # the same name, so that what it saves names the family's class
    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__, "__doc__": cls.__doc__})


def _processor_class(path: Path) -> type | None:
    """The processor class a model folder names (processor or preprocessor config), else the
    one transformers maps its model type to, if any."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    found = None
    for name in ("processor_config.json", "preprocessor_config.json"):
        if not found and (path / name).exists():
            found = json.loads((path / name).read_text()).get("processor_class")
    if not found and (path / "config.json").exists():
        found = PROCESSOR_MAPPING_NAMES.get(json.loads((path / "config.json").read_text()).get("model_type", ""))
    return getattr(transformers, found, None) if isinstance(found, str) else None


def load_processor(model: str | Path) -> Any:
    """The model folder's processor: `AutoProcessor`, or without torchvision the family's
    processor without its video part."""
    from transformers import AutoProcessor

    path = Path(model)
    cls = None if has_torchvision() else _processor_class(path)
    if cls is not None and image_only(cls) is not cls:
        log.info("%s: %s without its video processor (no torchvision here; images only)", path, cls.__name__)
        return image_only(cls).from_pretrained(path)
    try:
        return AutoProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError, AttributeError, ImportError) as e:
        raise CurationError(f"{path}: its processor cannot be loaded ({type(e).__name__}: {e})") from e


def save_processor(processor: Any, out: Path, *, base: str | Path | None = None) -> None:
    """`processor.save_pretrained(out)`, plus the base model's video processor config when the
    processor was loaded without it."""
    processor.save_pretrained(out)
    if base is None:
        return
    for name in VIDEO_CONFIGS:
        if (Path(base) / name).exists() and not (out / name).exists():
            shutil.copy2(Path(base) / name, out / name)
