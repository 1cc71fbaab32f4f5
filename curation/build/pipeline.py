"""`m3-curate build` and `m3-curate render`: the build as one Ray Data program, and the same
rows again from the cache alone.

    index (driver) → plan (driver) → per lane: load (CPU tasks) → expert pools (actors) ─┐
                                      union of the lanes ◄────────────────────────────────┘
                                      → render (CPU tasks) → shard writer (driver) → ledger, dataset card

A build whose findings are all cached takes the `render` path: no Ray, no expert actor, no
runner constructed (the fingerprints a build recorded still hold while the experts'
configuration, the code and the weight files are unchanged: `curation.build.fingerprints`).

Where it runs (`curation.build.cluster`): with no address, an embedded local Ray that the build
starts and stops; with `--address` or `RAY_ADDRESS` (set by `ray job submit` for its
entrypoint), that cluster; a process that already called `ray.init()` keeps its session.

The output folder (`curation.store.output`): a build holds its lock while it writes, writes
the new dataset beside the old one and swaps it in whole when it is complete; `--limit` does
not replace a complete build without `--force`.

Memory stays bounded however large the archive: the driver holds the plan (a small record per
item), Ray Data streams blocks of a few items with backpressure (`curation.build.cluster`), and
the writer holds a fixed budget of rows waiting for their shard and spills the rest to disk
(`curation.store.shards`).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import shutil
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa

from curation.atomic import write_parquet
from curation.build import fingerprints
from curation.build.cluster import (
    NodeLimits,
    Placement,
    hosts_placement,
    item_bytes_limit,
    own_pools,
    pipeline_dataset,
    place_experts,
    ray_session,
    refuse_without_cpus,
    task_cpus,
    write_lane_inputs,
)
from curation.build.node_watch import HeadProbe, NodeFault, NodeWatch
from curation.build.plan import ItemPlan, Plan, make_plan
from curation.build.progress import BuildProgress, summary, through_experts
from curation.build.scan import scan_index
from curation.build.shared import check_every_node
from curation.build.stages import BuildContext, WorkItem, look_up, render_item, table_from_bytes, work_items
from curation.cpus import available_cpus
from curation.errors import CurationError, user_error
from curation.expert_info import ExpertInfo
from curation.ingest import readers_for
from curation.items import LedgerEntry, StudyItem
from curation.manifest import BuildSpec, load_manifest, manifest_hash
from curation.preflight import ExpertsFrom, check_templates, preflight
from curation.ray_address import cluster_address
from curation.store.cache import FindingsCache, expert_infos_from_cache
from curation.store.card import ExpertEntry, Tally, build_ledger, code_version, dataset_card
from curation.store.layout import Layout
from curation.store.output import OutputLock, complete_card, publish, recover
from curation.store.readme import write_dataset_card
from curation.store.report import ItemReport
from curation.store.shards import ShardWriter

log = logging.getLogger(__name__)


@dataclass
class BuildResult:
    out: Path
    layout: Layout
    card: dict[str, Any]
    shards: list[Path]
    summary: str


# -- inputs and the plan -------------------------------------------------------------------------


def build_hash(spec: BuildSpec) -> str:
    """The manifest's hash for provenance: the resolved manifest less its `output` section and
    its experts' placement keys (`actors`, `gpus`, …: they place the work and never change a
    row), so the same recipe built into two folders, or sized for another cluster, makes the
    same rows."""
    experts = [e.without_placement() for e in spec.experts]
    return manifest_hash(spec.model_copy(update={"output": type(spec.output)(), "experts": experts}))


def index_items(spec: BuildSpec, layout: Layout, limit: int | None) -> tuple[list[StudyItem], list[LedgerEntry], set[str]]:
    found, ledger, _ = scan_index(spec, layout)  # writes layout.index; Ray tasks when Ray is up, else local cores
    items = found if limit is None else found[: max(limit, 0)]
    limited = {i.item_id for i in found[len(items):]}
    return items, ledger, limited


@dataclass
class _Prepared:
    """Everything decided on the driver before any item is processed."""

    spec: BuildSpec
    layout: Layout
    plan: Plan
    ledger: list[LedgerEntry]
    limited: set[str]
    ctx: BuildContext
    limit: int | None
    wall: dict[str, float] = field(default_factory=dict)


def _prepare(spec: BuildSpec, layout: Layout, *, limit: int | None, infos: dict[str, ExpertInfo] | None,
             origin: str = "") -> _Prepared:
    """Index, the experts' fingerprints (`infos`, or from constructed runners), template
    check (`origin` names the manifest in its error), plan."""
    t = time.perf_counter()
    cache, code = FindingsCache(layout.cache), code_version()
    items, ledger, limited = index_items(spec, layout, limit)
    wall = {"index": time.perf_counter() - t}
    t = time.perf_counter()
    if infos is None:
        infos = fingerprints.from_runners(spec, cache, code)
    check_templates(spec, infos, origin)  # the infos say what each expert gives and takes: no runner needed
    plan = make_plan(spec, items, infos)
    ctx = BuildContext(spec=spec, cache_root=str(cache.root), fingerprints={n: i.fingerprint for n, i in infos.items()},
                       manifest_hash=build_hash(spec), code_version=code, experts=infos)
    wall["plan"] = time.perf_counter() - t
    return _Prepared(spec=spec, layout=layout, plan=plan, ledger=ledger, limited=limited, ctx=ctx, limit=limit, wall=wall)


# -- the driver ----------------------------------------------------------------------------------


@dataclass
class _Collector:
    """Takes each item's rows and report as they stream in: into the shards and the accounts."""

    writer: ShardWriter
    tally: Tally
    progress: BuildProgress

    def collect(self, plan: ItemPlan, rows: pa.Table | None, report: ItemReport) -> None:
        if rows is not None and rows.num_rows:
            self.writer.add(plan.split, rows)
        self.writer.resolve(plan.split, plan.places())
        self.tally.record(plan.entry(), report, rows)
        self.progress.update(rows=rows.num_rows if rows is not None else 0, runs=sum(report.runs.values()),
                             set_aside=len(report.set_aside()))


def _start(prep: _Prepared, label: str, show: bool) -> _Collector:
    staged = prep.layout.staged()
    collector = _Collector(writer=ShardWriter(staged.data, prep.plan.shards, spill=prep.layout.spill), tally=Tally(),
                           progress=BuildProgress(prep.plan.working_count, label=label, enabled=show))
    for p in prep.plan.iter_items():
        if not p.conversations:
            collector.tally.record(p.entry(), ItemReport(), None)
    return collector


def _finish(collector: _Collector, prep: _Prepared, wall: dict[str, float], placements: dict[str, Placement], t0: float) -> BuildResult:
    """Shards, ledger and card into the staged dataset, then swapped in whole."""
    collector.progress.close()
    layout, staged, started = prep.layout, prep.layout.staged(), time.perf_counter()
    shards = collector.writer.finish()
    table = build_ledger(prep.ledger, collector.tally, prep.limited)
    write_parquet(table, layout.ledger)
    wall["write"] = time.perf_counter() - started
    wall["total"] = time.perf_counter() - t0
    experts = {n: ExpertEntry(runner=i.runner, fingerprint=i.fingerprint) for n, i in prep.plan.experts.items()}
    card = dataset_card(spec=prep.spec, indexed=prep.plan.indexed, planned_rows=prep.plan.planned_rows(), experts=experts,
                        tally=collector.tally, ledger=table, shards=shards, out=staged.dataset, manifest_hash=prep.ctx.manifest_hash,
                        code=prep.ctx.code_version, wall=wall, actors={n: p.to_json() for n, p in placements.items()})
    card["limit"] = prep.limit
    card["timing"]["peak_rows_held"] = collector.writer.peak_rows
    card["timing"]["rows_spilled"] = collector.writer.spilled_rows
    write_dataset_card(card, staged)  # README.md, then dataset_card.json last: a dataset folder with a card is complete
    publish(layout)
    final = [layout.dataset / p.relative_to(staged.dataset) for p in shards]
    return BuildResult(out=layout.out, layout=layout, card=card, shards=final, summary=summary(card, layout))


def _look_up(plan: ItemPlan, ctx: BuildContext, roots: dict[str, Path], cache: FindingsCache) -> WorkItem:
    """An item's content hash and the expert results it still lacks (cache hits counted)."""
    work = WorkItem(plan=plan)
    look_up(work, roots[plan.item.source], ctx, cache)
    return work


def _looked_up(prep: _Prepared, *, chunk: int = 256) -> Iterator[WorkItem]:
    """`_look_up` for every working item, in plan order, a chunk at a time on a few threads
    (hashing reads every file)."""
    roots = {name: r.root for name, r in readers_for(prep.spec).items()}
    cache, working = prep.ctx.cache(), prep.plan.iter_working()
    with ThreadPoolExecutor(max_workers=min(8, available_cpus())) as pool:
        while block := list(itertools.islice(working, chunk)):
            yield from pool.map(lambda p: _look_up(p, prep.ctx, roots, cache), block)


@dataclass(slots=True, frozen=True)
class _Found:
    """What the look-up found of one working item: its content hash (None: its files could not
    be read, `error` says why) and its cache hits per expert, so the render that follows
    neither reads the files nor looks a result up again."""

    content: str | None
    error: str | None
    cached: tuple[tuple[str, int], ...]


def _all_cached(prep: _Prepared) -> list[_Found] | None:
    """What `_looked_up` found of each working item, in build order, if no expert result is
    missing; None at the first miss. Only these are kept: the items' plans are made again for
    rendering (`_again`)."""
    found = []
    for work in _looked_up(prep):
        if work.missing:
            return None
        found.append(_Found(work.content, work.report.errors.get("load"), tuple(work.report.cached.items())))
    return found


def _again(prep: _Prepared, looked_up: list[_Found]) -> Iterator[WorkItem]:
    """The work items `_all_cached` looked up, with what it found: no file is read and no
    result looked up again."""
    for plan, found in zip(prep.plan.iter_working(), looked_up):
        work = WorkItem(plan=plan, content=found.content)
        if found.content is None:
            work.report.errors["load"] = found.error or "the item's files could not be read"
        work.report.cached.update(found.cached)
        yield work


def _render_from_cache(prep: _Prepared, looked_up: Iterable[WorkItem], label: str, show: bool, t0: float) -> BuildResult:
    """Rows of every item from cached findings, in this process: no Ray, no expert."""
    collector = _start(prep, label, show)
    t = time.perf_counter()
    with collector.progress:
        for work in looked_up:
            collector.collect(work.plan, render_item(work.plan, work.content, prep.ctx, work.report), work.report)
    wall = {**prep.wall, "render": time.perf_counter() - t}
    return _finish(collector, prep, wall, {}, t0)


def _on_ray(spec: BuildSpec, layout: Layout, *, address: str | None, limit: int | None, prep: _Prepared | None,
            show: bool, t0: float, origin: str = "") -> BuildResult:
    """The build on Ray. Ray starts (or connects) while the driver indexes and plans, so its
    start-up overlaps theirs; a cluster's address is checked before either begins."""
    address = cluster_address(address)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as pool:
        preparing = pool.submit(_prepare, spec, layout, limit=limit, infos=None, origin=origin) if prep is None else None
        log.info("starting Ray (%s)%s", address or "a local Ray for this build", " while the archive is indexed" if prep is None else "")
        with ray_session(address) as where:
            ray_ready = time.perf_counter() - t0
            prep = prep or preparing.result()  # type: ignore[union-attr]
            wall = {**prep.wall, "ray_start": ray_ready}
            collector = _start(prep, "build", show)
            with collector.progress:  # its clock stops however the pipeline ends
                placements = _run_pipeline(prep, collector, where, wall)
    return _finish(collector, prep, wall, placements, t0)


def _run_pipeline(prep: _Prepared, collector: _Collector, where: str, wall: dict[str, float]) -> dict[str, Placement]:
    import ray

    node, resources = NodeLimits.of_cluster(), ray.cluster_resources()
    refuse_without_cpus(node)
    placements = place_experts(prep.spec, prep.plan, resources, node)
    limit = item_bytes_limit(node, placements)
    inputs = write_lane_inputs(prep.plan, prep.layout.plan_inputs, limit)
    progress_dir = prep.layout.plan_inputs / f"progress-{prep.ctx.build_id}"  # removed with the input blocks
    progress_dir.mkdir()
    check, nodes = check_every_node(prep.plan, progress_dir, Path(prep.ctx.cache_root), prep.layout.out, prep.ctx.build_id)
    ctx = replace(prep.ctx, item_bytes_limit=limit, progress_dir=str(progress_dir))
    collector.progress.watch({k: i.items for k, i in inputs.items() if prep.plan.lanes[k].experts},
                             lambda: through_experts(progress_dir))
    log.info("building %d items on %s; experts: %s", prep.plan.working_count, where, _where_experts_run(placements))
    hosts = hosts_placement(placements)
    pools = [f"{n} ×{p.actors}" for n, p in own_pools(placements).items()] + ([f"expert hosts ×{hosts.actors}"] if hosts else [])
    if pools:
        log.info("waiting for expert actors to start (%s): each loads its model before its first item", ", ".join(pools))
    t = time.perf_counter()
    watch = NodeWatch(lambda: (collector.progress.done, tuple(sorted(through_experts(progress_dir).items()))), nodes, joined=check,
                      head=HeadProbe.of_session())
    try:
        try:
            cpus = task_cpus(float(resources.get("CPU", 1.0)), node.count)
            dataset = pipeline_dataset(inputs, prep.plan, ctx, placements, cpus=cpus, store=float(resources.get("object_store_memory", 0.0)))
            for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                for work, rows in zip(work_items(batch), batch.column("rows").to_pylist()):
                    collector.collect(work.plan, table_from_bytes(rows), work.report)
        finally:
            watch.stop()  # inside the outer try: a NodeFault raised meanwhile is still caught
            check.close()
    except NodeFault:
        raise CurationError(watch.reason or "the Ray cluster's nodes changed") from None
    except Exception as e:  # noqa: BLE001  (a CurationError raised in a worker comes back wrapped by Ray)
        cause = user_error(e)
        if cause is None:
            raise
        raise CurationError(str(cause.args[0] if cause.args else cause)) from None
    wall["pipeline"] = time.perf_counter() - t
    shutil.rmtree(prep.layout.plan_inputs, ignore_errors=True)
    return placements


def _where_experts_run(placements: dict[str, Placement]) -> str:
    parts = [f"{n} in load tasks" if p.tasks else f"{n} {p.actors}×(cpu {p.cpus}, gpu {p.gpus})"
             for n, p in placements.items() if not p.hosted]
    hosts = hosts_placement(placements)
    if hosts:
        hosted = ", ".join(n for n, p in placements.items() if p.hosted)
        parts.append(f"{hosted} in {hosts.actors} expert host{'s' if hosts.actors > 1 else ''} "
                     f"({hosts.threads} items at once, cpu {hosts.cpus} each)")
    return "; ".join(parts) or "none"


def _refuse_partial_over_complete(layout: Layout, limit: int | None, force: bool) -> None:
    card = complete_card(layout)
    if limit is not None and not force and card is not None and card.get("limit") is None:
        rows = card.get("counts", {}).get("rows", {}).get("total", "?")
        raise CurationError(f"{layout.dataset} holds a complete build ({rows} rows); --limit {limit} would replace it with a partial "
                            "one: give the trial its own --out, or add --force")


@contextmanager
def _owning(layout: Layout, command: str) -> Iterator[None]:
    """The output folder's lock, with a crash's leftovers cleared first and a failure's
    after: no staged dataset or spilled rows are left behind."""
    with OutputLock(layout, command):
        recover(layout)
        FindingsCache(layout.cache).sweep_tmp()
        try:
            yield
        except BaseException:
            for scratch in (layout.staged().dataset, layout.spill, layout.plan_inputs):
                shutil.rmtree(scratch, ignore_errors=True)
            raise


def _load(manifest: str | Path, out: str | Path | None, *, checked: bool, experts: ExpertsFrom) -> tuple[BuildSpec, Layout]:
    """The manifest, checked unless the caller did (`preflight`, with what the command learns
    of its experts from), and its output layout."""
    spec = load_manifest(manifest)
    if not checked:
        preflight(spec, manifest, out=out, rows=True, experts=experts)
    return spec, Layout.of(spec, out)


def build(manifest: str | Path, *, out: str | Path | None = None, address: str | None = None, limit: int | None = None,
          force: bool = False, progress: bool = True, checked: bool = False) -> BuildResult:
    """The whole pipeline. See the module docstring. `checked`: the caller has run this
    build's `preflight` (the CLI does, before importing this module)."""
    t0 = time.perf_counter()
    spec, layout = _load(manifest, out, checked=checked, experts="cached_or_build")
    with _owning(layout, "build"):
        _refuse_partial_over_complete(layout, limit, force)
        return _build(spec, layout, address=address, limit=limit, show=progress, t0=t0, origin=f"{manifest}: ")


def _build(spec: BuildSpec, layout: Layout, *, address: str | None, limit: int | None, show: bool, t0: float,
           origin: str = "") -> BuildResult:
    """The render path when nothing needs an expert (no task, `--limit 0`, or every result
    settled in the cache), else Ray. With a cache that has never seen these experts, Ray
    starts at once, while the driver indexes and plans."""
    cache = FindingsCache(layout.cache)
    infos = fingerprints.recorded(spec, cache, code_version())
    if not spec.tasks or limit == 0:
        prep = _prepare(spec, layout, limit=limit, infos=infos, origin=origin)
        return _render_from_cache(prep, [], "build", show, t0)
    if infos is None and not fingerprints.seen(spec, cache):  # a new cache: Ray is needed, start it at once
        return _on_ray(spec, layout, address=address, limit=limit, prep=None, show=show, t0=t0, origin=origin)
    prep = _prepare(spec, layout, limit=limit, infos=infos, origin=origin)  # infos None: the code or weights changed, runners say
    t = time.perf_counter()
    cached = _all_cached(prep)
    prep.wall["cache_check"] = time.perf_counter() - t
    if cached is not None:
        log.info("every expert result is cached: rendering %d items without Ray", len(cached))
        return _render_from_cache(prep, _again(prep, cached), "build", show, t0)
    return _on_ray(spec, layout, address=address, limit=limit, prep=prep, show=show, t0=t0)


def render(manifest: str | Path, *, out: str | Path | None = None, progress: bool = True, checked: bool = False) -> BuildResult:
    """Every shard again from cached findings only: no Ray, no expert is constructed
    (`checked` as for `build`)."""
    t0 = time.perf_counter()
    spec, layout = _load(manifest, out, checked=checked, experts="cached")
    with _owning(layout, "render"):
        prep = _prepare(spec, layout, limit=None, infos=expert_infos_from_cache(spec, FindingsCache(layout.cache)))
        return _render_from_cache(prep, _looked_up(prep), "render", progress, t0)


# -- command line --------------------------------------------------------------------------------


def build_command(args: argparse.Namespace) -> None:
    result = build(args.manifest, out=args.out, address=args.address, limit=args.limit, force=args.force, progress=not args.quiet,
                   checked=True)  # the CLI checked it before importing the build (`cli._check_build`)
    print(result.summary)


def render_command(args: argparse.Namespace) -> None:
    result = render(args.manifest, out=args.out, progress=not args.quiet, checked=True)  # `cli._check_render`
    print(result.summary)
