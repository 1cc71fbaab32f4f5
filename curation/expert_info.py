"""An expert as the rest of the build sees it, without its runner: plain data.

The build constructs each runner once on the driver (validating its options, hashing its
weights) and hands everything else an `ExpertInfo`: the plan (which items it takes), `m3-curate
render` and `preview` (read back from the cache, no runner built) and the renderer (what its
findings hold, which names it would report). Render never imports a runner, torch or Ray.

>>> info = ExpertInfo(name="CT", runner="ct_tissue", fingerprint="f", spec={}, modalities=("CT",), kinds=("dicom",),
...                   provides=("structures", "overlay"), vocabularies={"everything": ("bone", "fat")})
>>> info.vocabulary("everything"), info.vocabulary("lung"), info.gives({"overlay"})
(['bone', 'fat'], [], True)
>>> ExpertInfo.from_json(info.to_json()) == info
True
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from curation.expert_args import canonical_arg
from curation.items import StudyItem

# What a runner's findings can hold; a template's `needs:` names some of these.
NEEDS = ("structures", "classes", "key_slice", "overlay", "sequence")


def refusal(name: str, modalities: Iterable[str], kinds: Iterable[str], item: StudyItem) -> str | None:
    """None if an expert taking these modalities (empty: any) and item kinds takes the item,
    else why not. The one rule behind `ExpertRunner.accepts` and `ExpertInfo.accepts`.

    >>> it = StudyItem("i", "p", "s", "x", "image2d", "CR", [4, 4], [1.0, 1.0], 1, ["a.png"])
    >>> refusal("CT", ("CT",), ("dicom",), it)
    'CT takes CT, not CR'
    """
    modalities, kinds = tuple(modalities), tuple(kinds)
    if modalities and item.modality not in modalities:
        return f"{name} takes {'/'.join(modalities)}, not {item.modality}"
    if kinds and item.kind not in kinds:
        return f"{name} takes {'/'.join(kinds)} items, not {item.kind}"
    return None


@dataclass(slots=True, frozen=True)
class ExpertInfo:
    """What the plan, `m3-curate render`, `preview` and the renderer need to know of an expert.

    - `fingerprint`: the cache key of its findings; `spec`: its manifest entry as JSON,
      placement keys at their defaults (how a build's record is found again);
    - `modalities`, `kinds`: the items it takes (empty: any); `weights`: it has weight files
      (it gets a GPU where the cluster has them);
    - `provides`: what its findings hold (`NEEDS`), None when the runner does not say (a
      plug-in), so a template's needs cannot be checked;
    - `vocabularies`: per argument (`canonical_arg`), the structure names it reports when they are present, so a
      name listed here but missing from the findings is truly absent (empty when unknown);
    - `family`: the built-in runner it is (a plug-in subclass of `ct_tissue` is `ct_tissue`),
      whose model card it gets when it has none of its own.
    """

    name: str
    runner: str
    fingerprint: str
    spec: dict[str, Any]
    modalities: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()
    weights: bool = False
    provides: tuple[str, ...] | None = None
    vocabularies: dict[str, tuple[str, ...]] = field(default_factory=dict)
    family: str = ""

    def accepts(self, item: StudyItem) -> str | None:
        """None if the expert takes the item, else why not."""
        return refusal(self.name, self.modalities, self.kinds, item)

    def gives(self, needs: Iterable[str]) -> bool | None:
        """Whether its findings hold all of `needs`; None when it does not say what it gives."""
        return None if self.provides is None else set(needs) <= set(self.provides)

    def vocabulary(self, arg: str) -> list[str]:
        """Names it reports for this argument when present (empty: unknown)."""
        return list(self.vocabularies.get(canonical_arg(arg), ()))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["modalities"], d["kinds"] = list(self.modalities), list(self.kinds)
        d["provides"] = None if self.provides is None else list(self.provides)
        d["vocabularies"] = {k: list(v) for k, v in self.vocabularies.items()}
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ExpertInfo:
        """The info `to_json` wrote, by this or an earlier version: a key no field holds any
        more (a build's cache outlives the code that wrote it) is left out."""
        provides = d.get("provides")
        d = {k: v for k, v in d.items() if k in FIELDS}
        return cls(**{**d, "modalities": tuple(d.get("modalities", ())), "kinds": tuple(d.get("kinds", ())),
                      "provides": None if provides is None else tuple(provides),
                      "vocabularies": {k: tuple(v) for k, v in (d.get("vocabularies") or {}).items()}})


FIELDS = frozenset(f.name for f in fields(ExpertInfo))
