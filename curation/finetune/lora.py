"""LoRA for any image-text-to-text model, its parts found from the model's own structure.

Families name their parts differently: the text model is `language_model` (LLaVA, Qwen2-VL,
Gemma 3) or `text_model` (Idefics3, SmolVLM); the vision-to-text projector is
`multi_modal_projector` (LLaVA, Gemma 3), `connector` (Idefics3) or `visual.merger`, inside the
vision encoder (Qwen2-VL, Qwen2.5-VL). So nothing here matches names; `model_parts` finds:

- the **language model**: the module that owns the text input embeddings
  (`get_input_embeddings()`); LoRA adapts every `nn.Linear` inside it (attention and MLP
  projections, whatever they are called), never the vision encoder or the LM head;
- the **vision encoder**: the outermost module built from `config.vision_config`;
- the **projector**, trained fully (`modules_to_save`): the parameter-holding modules beside
  those two under their common parent; where there are none, the projector lives inside the
  vision encoder, and it is the encoder's parameter-holding children registered after its layer
  stack (its largest `ModuleList`), such as Qwen2-VL's `merger`.

A model in which a part cannot be found is refused with the reason, before training starts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from curation.errors import CurationError


@dataclass(frozen=True, slots=True)
class ModelParts:
    """Qualified module names of a vision-language model's parts."""

    language_model: str
    vision: str
    projector: tuple[str, ...]
    linear_names: tuple[str, ...]  # the leaf names of the language model's nn.Linear modules

    def lora_targets(self) -> str:
        """A regex (peft matches it against whole module names) for the language model's
        linear layers."""
        leaves = "|".join(re.escape(n) for n in self.linear_names)
        return rf"{re.escape(self.language_model)}\.(?:.*\.)?(?:{leaves})"


def _name_of(model: torch.nn.Module, target: torch.nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if m is target), None)


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _child(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name) if name else model


def _projector_in_vision(model: torch.nn.Module, vision: str) -> tuple[str, ...]:
    """The vision encoder's children after its layer stack (where Qwen-VL keeps its merger)."""
    children = [(n, c) for n, c in _child(model, vision).named_children()]
    stacks = [(i, _params(c)) for i, (_, c) in enumerate(children) if isinstance(c, torch.nn.ModuleList)]
    if not stacks:
        return ()
    last = max(stacks, key=lambda s: s[1])[0]
    return tuple(f"{vision}.{n}" for n, c in children[last + 1 :] if _params(c))


def model_parts(model: Any, *, name: str = "the model") -> ModelParts:
    """The language model, vision encoder and projector of `model` (see the module docstring)."""
    embeddings = model.get_input_embeddings()
    emb_name = _name_of(model, embeddings)
    if not emb_name or "." not in emb_name:
        raise CurationError(f"{name}: its text embeddings are not inside a language model, so LoRA cannot find where to adapt")
    lm = emb_name.rsplit(".", 1)[0]
    vision_config = getattr(model.config, "vision_config", None)
    vision = next((n for n, m in model.named_modules() if vision_config is not None and getattr(m, "config", None) is vision_config), None)
    if vision is None:
        raise CurationError(f"{name}: no module is built from its config.vision_config, so its vision encoder cannot be told from its projector")
    parent = _common_parent(lm, vision)
    beside = tuple(
        f"{parent}.{n}" if parent else n
        for n, c in _child(model, parent).named_children()
        if (f"{parent}.{n}" if parent else n) not in (lm, vision) and _params(c) and c is not model.get_output_embeddings()
    )
    projector = beside or _projector_in_vision(model, vision)
    if not projector:
        raise CurationError(
            f"{name}: no vision-to-text projector found (nothing beside the language model {lm!r} and the vision encoder "
            f"{vision!r}, nor after the encoder's layers); --lora would leave it frozen, so it is refused"
        )
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in _child(model, lm).named_modules() if isinstance(m, torch.nn.Linear)})
    if not linear:
        raise CurationError(f"{name}: its language model {lm!r} has no nn.Linear layers for LoRA to adapt")
    return ModelParts(lm, vision, projector, tuple(linear))


def _common_parent(a: str, b: str) -> str:
    pa, pb = a.split("."), b.split(".")
    common = []
    for x, y in zip(pa, pb):
        if x != y:
            break
        common.append(x)
    return ".".join(common)


def lora_config(model: Any, *, rank: int, alpha: int | None, dropout: float, targets: str | None, name: str) -> Any:
    """A peft `LoraConfig` for `model`: adapters on its language model's linear layers (or on
    `targets`, a regex over module names), its projector trained fully."""
    from peft import LoraConfig

    parts = model_parts(model, name=name)
    return LoraConfig(
        r=rank, lora_alpha=alpha or 2 * rank, lora_dropout=dropout, target_modules=targets or parts.lora_targets(),
        modules_to_save=list(parts.projector), task_type="CAUSAL_LM",
    )
