"""The data templates draw on besides findings: phrasing banks and model cards.

- Phrasing banks are YAML files under `<prompts>/phrasings/`: a key maps to a list of
  alternatives (nested mappings make dotted keys: `vista3d_target.organs`), each a string with
  `{field}` placeholders that are plain names (no attribute or index access: `{x.__class__}`
  is refused when the file is read).
- The model card is `<prompts>/model_card.j2` filled from `<prompts>/model_cards.yaml`, one card
  per manifest expert, by its name, else by its runner.

What an expert's findings hold and which names it reports come from the build as plain
`curation.expert_info.ExpertInfo`: render knows nothing of runners.
"""

from __future__ import annotations

import hashlib
import logging
import re
import string
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from curation.errors import CurationError
from curation.manifest import ExpertSpec

log = logging.getLogger(__name__)

# --- phrasings -----------------------------------------------------------------------------

FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_phrasing(text: str, where: str) -> None:
    if "\x00" in text:
        raise CurationError(f"{where}: {text!r} holds a NUL character")
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise CurationError(f"{where}: {text!r} is not a valid phrasing ({e}); write {{{{ and }}}} for literal braces") from e
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        if not FIELD.match(field) or conversion or (spec and "{" in spec):
            raise CurationError(f"{where}: {text!r}: placeholder {{{field}}} must be a plain name such as {{structure}}")


def _flatten(data: Any, prefix: str, where: str, out: dict[str, tuple[str, ...]], origin: dict[str, str]) -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), where, out, origin)
        return
    values = [data] if isinstance(data, str) else data
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v.strip() for v in values):
        raise CurationError(f"{where}: {prefix!r} must be a non-empty list of phrasings (strings)")
    for v in values:
        check_phrasing(v, f"{where}: {prefix}")
    if prefix in out:
        raise CurationError(f"{where}: phrasing {prefix!r} is also defined in {origin[prefix]}; keep one")
    out[prefix] = tuple(values)
    origin[prefix] = where


def load_phrasings(roots: list[Path]) -> tuple[dict[str, tuple[str, ...]], str]:
    """All phrasing banks (key → alternatives) and a digest of them. A key in an earlier folder
    replaces the same key in a later one (manifest folders come before the built-in one)."""
    banks: dict[str, tuple[str, ...]] = {}
    h = hashlib.sha256()
    for root in roots:
        mine: dict[str, tuple[str, ...]] = {}
        origin: dict[str, str] = {}
        for path in sorted((root / "phrasings").glob("*.yaml")):
            try:
                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (yaml.YAMLError, UnicodeDecodeError) as e:
                raise CurationError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from e
            if not isinstance(data, dict):
                raise CurationError(f"{path}: a phrasing file maps keys to lists of phrasings")
            _flatten(data, "", str(path), mine, origin)
        for key, values in mine.items():
            banks.setdefault(key, values)
    for key in sorted(banks):
        h.update(repr((key, banks[key])).encode())
    return banks, h.hexdigest()[:16]


# --- model card ----------------------------------------------------------------------------

CARD_FIELDS = ("modality", "task", "overview", "accuracy", "args")


def load_cards(roots: list[Path]) -> dict[str, dict[str, dict[str, str]]]:
    """`model_cards.yaml` of every folder merged: {"experts": {name: card}, "runners": {runner:
    card}}; earlier folders win per name."""
    merged: dict[str, dict[str, dict[str, str]]] = {"experts": {}, "runners": {}}
    for root in roots:
        path = root / "model_cards.yaml"
        if not path.is_file():
            continue
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise CurationError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from e
        unknown = sorted(set(data) - set(merged)) if isinstance(data, dict) else ["(not a mapping)"]
        if unknown:
            raise CurationError(f"{path}: top-level keys are 'experts' and 'runners', got {unknown}")
        for section, known in merged.items():
            for name, card in (data.get(section) or {}).items():
                if not isinstance(card, dict) or sorted(card) != sorted(CARD_FIELDS):
                    raise CurationError(f"{path}: {section}.{name} needs exactly the keys {list(CARD_FIELDS)}")
                known.setdefault(str(name), {k: str(v) for k, v in card.items()})
    return merged


@cache  # once per process: the driver makes more than one renderer
def _say_no_card(name: str, runner: str) -> None:
    log.info("expert %s (runner %s) has no model card, so it is not listed in the model card", name, runner)


def expert_cards(experts: list[ExpertSpec], cards: dict[str, dict[str, dict[str, str]]],
                 called: set[str] | None = None, families: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The cards of the manifest's experts that some task calls (all of them when `called` is
    None), by the expert's name, else by its runner, else by the built-in runner it derives from
    (`families`: expert name → `ExpertInfo.family`), in the order the cards file lists them
    (VILA-M3's order: BRATS, VISTA3D, CXR, then ours), manifest order among equals. An expert
    with no card (ground truth standing in for findings, say) is not on the model card:
    conversations may use its findings but never call it; nor is one no task calls, so the
    card offers only what the data teaches the model to use."""
    order = {("experts", name): i for i, name in enumerate(cards["experts"])}
    order |= {("runners", name): len(order) + i for i, name in enumerate(cards["runners"])}
    out = []
    for position, e in enumerate(experts):
        family = (families or {}).get(e.name, "")
        found = (("experts", e.name) if e.name in cards["experts"] else ("runners", e.runner) if e.runner in cards["runners"]
                 else ("runners", family) if family in cards["runners"] else None)
        if found is None:
            _say_no_card(e.name, e.runner)
            continue
        if called is not None and e.name not in called:
            continue
        out.append((order[found], position, {"name": e.name, **cards[found[0]][found[1]]}))
    return [card for _, _, card in sorted(out, key=lambda x: x[:2])]
