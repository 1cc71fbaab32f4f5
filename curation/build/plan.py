"""The work plan: which conversations each item makes, where each row goes, which expert runs
each item needs — decided on the driver before anything runs, from the manifest and the index
alone.

Deciding it all up front is what makes the output deterministic while the work streams in any
order: every planned conversation (a `Unit`) has its shard and its position in that shard
before the build starts, so the shard writer needs no global sort and a rerun writes the same
rows to the same places.

Rows are grouped into *lanes*: the sources that share one chain of experts (one Ray Data
branch each). A shard holds rows of one lane and one split, in a keyed-hash order of the items
(a stable shuffle), so a fast lane (chest X-rays) never waits on a slow one (CT through
VISTA3D), and the writer buffers only the few shards whose items are in flight.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from curation.errors import CurationError
from curation.items import StudyItem
from curation.keys import Keyer, resolve_secret
from curation.expert_info import ExpertInfo
from curation.manifest import BuildSpec, ExpertSpec, TaskSpec
from curation.build.mixture import expert_arg, variants
from curation.build.split import SPLITS, assign_splits


def runner_spec(spec: ExpertSpec) -> ExpertSpec:
    """The spec a runner is built from (`ExpertSpec.without_placement`)."""
    return spec.without_placement()


def spec_json(spec: ExpertSpec) -> dict[str, Any]:
    return runner_spec(spec).model_dump(mode="json")


@dataclass(slots=True, frozen=True)
class Unit:
    """One planned conversation: task `task` (index into the manifest's tasks), variant
    `variant`, expert argument `arg`; its row goes to shard `shard` of the item's split at
    position `pos` (the order within the shard)."""

    task: int
    variant: int
    arg: str
    shard: int
    pos: int


@dataclass(slots=True)
class ItemPlan:
    item: StudyItem
    split: str
    lane: int
    units: list[Unit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # tasks left out for this item, and why

    def needs(self, spec: BuildSpec) -> dict[str, list[str]]:
        """Expert name → the distinct arguments this item needs, in first-use order."""
        out: dict[str, list[str]] = {}
        for u in self.units:
            expert = spec.tasks[u.task].expert
            if expert is not None and u.arg not in out.setdefault(expert, []):
                out[expert].append(u.arg)
        return out

    def to_json(self) -> str:
        return json.dumps({"item": self.item.to_row(), "split": self.split, "lane": self.lane,
                           "units": [asdict(u) for u in self.units], "notes": self.notes}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ItemPlan:
        d = json.loads(text)
        return cls(item=StudyItem.from_row(d["item"]), split=d["split"], lane=d["lane"],
                   units=[Unit(**u) for u in d["units"]], notes=list(d["notes"]))


@dataclass(slots=True)
class Lane:
    """Sources that share a chain of experts: one Ray Data branch."""

    sources: tuple[str, ...]
    experts: tuple[str, ...]


@dataclass(slots=True)
class Plan:
    items: list[ItemPlan]  # every indexed item, in build order
    lanes: list[Lane]
    experts: dict[str, ExpertInfo]
    shards: dict[tuple[str, int], tuple[int, int]]  # (split, shard) → (first position, planned rows)

    @property
    def working(self) -> list[ItemPlan]:
        """Items with at least one planned conversation: the ones the pipeline processes."""
        return [p for p in self.items if p.units]

    def planned_rows(self) -> int:
        return sum(n for _, n in self.shards.values())


def task_name(task: TaskSpec) -> str:
    """A task's name in rows and ids: its template path."""
    return task.template


def _check_tasks(spec: BuildSpec) -> None:
    seen: dict[tuple[str, str], int] = {}
    for i, task in enumerate(spec.tasks):
        key = (task_name(task), task.source)
        if key in seen:
            raise CurationError(
                f"tasks[{seen[key]}] and tasks[{i}] both render {task.template!r} over source {task.source!r}: their "
                "rows would get the same ids; merge them into one task (list both arguments in `args`)"
            )
        seen[key] = i


def lanes_of(spec: BuildSpec) -> list[Lane]:
    """Sources grouped by the experts their tasks call (in manifest order), sources without
    tasks left out."""
    order = [e.name for e in spec.experts]
    chains: dict[tuple[str, ...], list[str]] = {}
    for source in spec.sources:
        tasks = [t for t in spec.tasks if t.source == source.name]
        if not tasks:
            continue
        chain = tuple(sorted({t.expert for t in tasks if t.expert is not None}, key=order.index))
        chains.setdefault(chain, []).append(source.name)
    return [Lane(sources=tuple(s), experts=chain) for chain, s in chains.items()]


def make_plan(spec: BuildSpec, items: list[StudyItem], experts: dict[str, ExpertInfo], *, rows_per_shard: int | None = None) -> Plan:
    """Split, variants, expert arguments and row places for every item."""
    _check_tasks(spec)
    keyer = Keyer(resolve_secret(spec.key))
    per_shard = rows_per_shard or spec.output.rows_per_shard
    lanes = lanes_of(spec)
    lane_of = {s: i for i, lane in enumerate(lanes) for s in lane.sources}
    ordered = sorted(items, key=lambda it: (keyer("order", spec.seed, it.item_id), it.item_id))
    plans: list[ItemPlan] = []
    next_pos: Counter[tuple[str, int]] = Counter()  # (split, lane) → rows planned so far
    split_of_patient = assign_splits(((it.source, it.patient_key) for it in items), spec.split, keyer, spec.seed)
    for item in ordered:
        split = split_of_patient[item.patient_key]
        plan = ItemPlan(item=item, split=split, lane=lane_of.get(item.source, -1))
        if plan.lane < 0:
            plan.notes.append(f"no task uses source {item.source!r}")
        for t, task in enumerate(spec.tasks):
            if task.source != item.source:
                continue
            if task.expert is not None:
                why = experts[task.expert].accepts(item)
                if why:
                    plan.notes.append(f"{task_name(task)}: {why}")
                    continue
            n = variants(task, item.item_id, keyer, spec.seed)
            if n == 0:
                plan.notes.append(f"{task_name(task)}: not drawn at weight {task.weight}")
            for v in range(n):
                arg = expert_arg(task, v) if task.expert is not None else ""
                plan.units.append(Unit(task=t, variant=v, arg=arg, shard=0, pos=next_pos[(split, plan.lane)]))
                next_pos[(split, plan.lane)] += 1
        plans.append(plan)
    # Shards: within a split, lanes take consecutive shard numbers in lane order; a shard holds
    # the consecutive positions [k * per_shard, (k + 1) * per_shard) of its lane.
    offsets: dict[tuple[str, int], int] = {}
    shards: dict[tuple[str, int], tuple[int, int]] = {}
    for split in SPLITS:
        start = 0
        for lane in range(len(lanes)):
            offsets[(split, lane)] = start
            total = next_pos[(split, lane)]
            for k in range(-(-total // per_shard)):
                shards[(split, start + k)] = (k * per_shard, min(per_shard, total - k * per_shard))
            start += -(-total // per_shard)
    for plan in plans:
        for i, u in enumerate(plan.units):
            shard = offsets[(plan.split, plan.lane)] + u.pos // per_shard
            plan.units[i] = Unit(task=u.task, variant=u.variant, arg=u.arg, shard=shard, pos=u.pos)
    return Plan(items=plans, lanes=lanes, experts=experts, shards=shards)
