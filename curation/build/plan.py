"""The work plan: which conversations each item makes, where each row goes, which expert runs
each item needs — decided on the driver before anything runs, from the manifest and the index
alone.

Deciding it all up front is what makes the output deterministic while the work streams in any
order: every `PlannedConversation` has its shard and its position before the build starts, so
a rerun writes the same rows to the same places, whatever order the work finishes in.

Items are grouped into *lanes*: the sources that share one chain of experts (one Ray Data
branch each). Rows are not: within a split, every task's rows form a *stream* (the task's
conversations, items in a keyed-hash order: a stable shuffle), and the streams are
interleaved evenly (`interleaved_position`), so any window of a shard holds a mix of sources
and tasks close to the whole split's, and an item's rows sit near each other. The shard writer
spills rows that arrive ahead of a slower lane's to disk (`curation.store.shards`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curation.errors import CurationError
from curation.items import StudyItem
from curation.keys import Keyer, resolve_secret
from curation.expert_info import ExpertInfo
from curation.manifest import BuildSpec, ExpertSpec, TaskSpec
from curation.build.mixture import expert_arg, variants
from curation.build.split import SPLITS, assign_splits
from curation.store.report import ItemEntry


def runner_spec(spec: ExpertSpec) -> ExpertSpec:
    """The spec a runner is built from (`ExpertSpec.without_placement`)."""
    return spec.without_placement()


def spec_json(spec: ExpertSpec) -> dict[str, Any]:
    return runner_spec(spec).model_dump(mode="json")


@dataclass(slots=True, frozen=True)
class PlannedConversation:
    """One conversation the build will try to make: task `task` (index into the manifest's
    tasks), variant `variant`, expert argument `arg`; its row goes to shard `shard` of the
    item's split, at position `pos` of that split (the row's order in the split's shards)."""

    task: int
    variant: int
    arg: str
    shard: int
    pos: int


@dataclass(slots=True)
class ItemPlan:
    """An item and the conversations planned for it."""

    item: StudyItem
    split: str
    lane: int
    conversations: list[PlannedConversation] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # tasks left out for this item, and why

    def needs(self, spec: BuildSpec) -> dict[str, list[str]]:
        """Expert name → the distinct arguments this item needs, in first-use order."""
        out: dict[str, list[str]] = {}
        for c in self.conversations:
            expert = spec.tasks[c.task].expert
            if expert is not None and c.arg not in out.setdefault(expert, []):
                out[expert].append(c.arg)
        return out

    def places(self) -> list[tuple[int, int]]:
        """(shard, position) of every planned conversation."""
        return [(c.shard, c.pos) for c in self.conversations]

    def entry(self) -> ItemEntry:
        """The item as the accounts see it."""
        return ItemEntry(item_id=self.item.item_id, split=self.split, patient_key=self.item.patient_key,
                         planned=len(self.conversations), notes=tuple(self.notes))


@dataclass(slots=True)
class Lane:
    """Sources that share a chain of experts: one Ray Data branch."""

    sources: tuple[str, ...]
    experts: tuple[str, ...]


@dataclass(slots=True)
class Plan:
    """Every indexed item's plan, held compactly: the build order, each item's split and how
    many variants each task makes of it, and the streams' totals (a few dozen bytes per
    item, beside the index's own items, which are not copied). `ItemPlan`s with their places
    are made on demand, in build order (`iter_items`), so a build never holds them all."""

    spec: BuildSpec
    lanes: list[Lane]
    experts: dict[str, ExpertInfo]
    shards: dict[tuple[str, int], tuple[int, int]]  # (split, shard) → (first position, planned rows)
    source: Sequence[StudyItem]  # the index's items
    order: np.ndarray  # indices into `source`, in build order
    splits: np.ndarray  # per item in build order: its split, as an index into SPLITS
    counts: np.ndarray  # per item in build order and task: conversations planned
    totals: dict[str, list[int]]  # split → rows of each task's stream
    per_shard: int

    def iter_items(self) -> Iterator[ItemPlan]:
        """Every item's plan, in build order; places follow from the running count of each
        stream and `interleaved_position`."""
        lane_of = {s: i for i, lane in enumerate(self.lanes) for s in lane.sources}
        seen: Counter[tuple[str, int]] = Counter()  # (split, task) → rows of that stream so far
        for k, index in enumerate(self.order.tolist()):
            item, split = self.source[index], SPLITS[self.splits[k]]
            plan = ItemPlan(item=item, split=split, lane=lane_of.get(item.source, -1))
            if plan.lane < 0:
                plan.notes.append(f"no task uses source {item.source!r}")
            for t, n in enumerate(self.counts[k].tolist()):
                task = self.spec.tasks[t]
                if task.source != item.source:
                    continue
                why = self.experts[task.expert].accepts(item) if task.expert is not None else None
                if why or n == 0:
                    plan.notes.append(f"{task_name(task)}: {why or f'not drawn at weight {task.weight}'}")
                for v in range(n):
                    pos = interleaved_position(seen[(split, t)], t, self.totals[split])
                    seen[(split, t)] += 1
                    arg = expert_arg(task, v) if task.expert is not None else ""
                    plan.conversations.append(PlannedConversation(task=t, variant=v, arg=arg, shard=pos // self.per_shard, pos=pos))
            yield plan

    def iter_working(self) -> Iterator[ItemPlan]:
        """Items with at least one planned conversation: the ones the pipeline processes."""
        return (p for p in self.iter_items() if p.conversations)

    @property
    def items(self) -> list[ItemPlan]:
        """Every item's plan as a list (for small plans and tests; a build iterates)."""
        return list(self.iter_items())

    @property
    def working(self) -> list[ItemPlan]:
        return list(self.iter_working())

    @property
    def indexed(self) -> int:
        return len(self.order)

    @property
    def working_count(self) -> int:
        return int(np.count_nonzero(self.counts.sum(axis=1))) if len(self.counts) else 0

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


def interleaved_position(index: int, stream: int, totals: Sequence[int]) -> int:
    """Where row `index` of stream `stream` goes when streams of `totals` rows are interleaved
    evenly: row i of a stream of n rows sits at fraction (i + ½) / n of the whole; rows at the
    same fraction go in stream order. A pure function of its arguments (no table of positions
    is kept), and a bijection onto range(sum(totals)).

    >>> [[interleaved_position(i, s, [2, 4]) for i in range(n)] for s, n in enumerate([2, 4])]
    [[1, 4], [0, 2, 3, 5]]
    >>> sorted(interleaved_position(i, s, [3, 0, 5, 1]) for s, n in enumerate([3, 0, 5, 1]) for i in range(n))
    [0, 1, 2, 3, 4, 5, 6, 7, 8]
    """
    n = totals[stream]
    before = index
    for other, m in enumerate(totals):
        if other == stream or m == 0:
            continue
        x = (2 * index + 1) * m  # rows j of `other` with (2j + 1) * n < x come first (<= when `other` is earlier)
        before += min(m, max(0, ((x if other < stream else x - 1) // n + 1) // 2))
    return before


def shard_sizes(total: int, per_shard: int) -> list[tuple[int, int]]:
    """(first position, rows) of each shard of a split of `total` rows: shard k holds positions
    [k * per_shard, (k + 1) * per_shard), so a row's shard is `pos // per_shard`.

    >>> shard_sizes(5, 2), shard_sizes(0, 2)
    ([(0, 2), (2, 2), (4, 1)], [])
    """
    return [(start, min(per_shard, total - start)) for start in range(0, total, per_shard)]


def _variant_counts(spec: BuildSpec, item: StudyItem, experts: dict[str, ExpertInfo], keyer: Keyer) -> list[int]:
    """Conversations each task makes of the item (0: not its source, an expert that does not
    take it, or not drawn at its weight)."""
    out = []
    for task in spec.tasks:
        if task.source != item.source or (task.expert is not None and experts[task.expert].accepts(item)):
            out.append(0)
        else:
            out.append(variants(task, item.item_id, keyer, spec.seed))
    return out


def make_plan(spec: BuildSpec, items: Sequence[StudyItem], experts: dict[str, ExpertInfo], *, rows_per_shard: int | None = None) -> Plan:
    """Split and variants of every item, items in keyed-hash order, each task's rows a stream
    of its split, streams interleaved, shards cut every `rows_per_shard` positions. One pass
    over the items, keeping a few numbers per item (`Plan`)."""
    _check_tasks(spec)
    keyer = Keyer(resolve_secret(spec.key))
    per_shard = rows_per_shard or spec.output.rows_per_shard
    keys = [(keyer("order", spec.seed, it.item_id), it.item_id) for it in items]
    order = np.array(sorted(range(len(items)), key=keys.__getitem__), dtype=np.int64)
    del keys
    splits = np.zeros(len(items), dtype=np.int8)
    counts = np.zeros((len(items), len(spec.tasks)), dtype=np.uint16)
    split_of_patient = assign_splits(((it.source, it.patient_key) for it in items), spec.split, keyer, spec.seed)
    for k, index in enumerate(order.tolist()):
        item = items[index]
        split = split_of_patient[item.patient_key]
        splits[k] = SPLITS.index(split)
        counts[k] = _variant_counts(spec, item, experts, keyer)
    totals = {split: [int(n) for n in counts[splits == i].sum(axis=0)] if len(counts) else [0] * len(spec.tasks)
              for i, split in enumerate(SPLITS)}
    shards = {(split, k): place for split in SPLITS for k, place in enumerate(shard_sizes(sum(totals[split]), per_shard))}
    return Plan(spec=spec, lanes=lanes_of(spec), experts=experts, shards=shards, source=items, order=order, splits=splits,
                counts=counts, totals=totals, per_shard=per_shard)
