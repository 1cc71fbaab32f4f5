"""`m3-curate build` and `m3-curate render`: the build as one Ray Data program, and the same
rows again from the cache alone.

    index (driver) → plan (driver) → per lane: load (CPU tasks) → expert pools (actors) ─┐
                                      union of the lanes ◄────────────────────────────────┘
                                      → render (CPU tasks) → shard writer (driver) → ledger, dataset card

Where it runs (`curation.build.cluster`): with no address, an embedded local Ray that the build
starts and stops; with `--address` or `RAY_ADDRESS` (set by `ray job submit` for its
entrypoint), that cluster; a process that already called `ray.init()` keeps its session.

Memory stays bounded however large the archive: the driver holds the plan (a small record per
item), Ray Data streams blocks of a few items with backpressure (`curation.build.cluster`), and the
writer holds only rows that arrived ahead of their shard's cursor (`curation.store.shards`).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from curation.store.cache import FindingsCache, content_hash, expert_infos_from_cache
from curation.store.card import Tally, build_ledger, code_version, dataset_card
from curation.store.readme import write_dataset_card
from curation.store.layout import Layout
from curation.build.cluster import Placement, pipeline_dataset, place_experts, ray_session
from curation.errors import CurationError
from curation.build.scan import scan_index
from curation.ingest.index import write_table
from curation.items import LedgerEntry, StudyItem
from curation.manifest import BuildSpec, load_manifest, manifest_hash
from curation.preflight import preflight
from curation.build.plan import ItemPlan, Plan, make_plan, runner_spec, spec_json
from curation.expert_info import ExpertInfo
from curation.build.progress import Progress, summary
from curation.store.shards import ShardWriter
from curation.build.stages import (
    RENDERER,
    BuildContext,
    Report,
    load_renderer,
    render_item,
    table_from_bytes,
)

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
    """The manifest's hash for provenance: the resolved manifest less its `output` section, so
    the same recipe built into two folders makes the same rows."""
    return manifest_hash(spec.model_copy(update={"output": type(spec.output)()}))


def index_items(spec: BuildSpec, layout: Layout, limit: int | None) -> tuple[list[StudyItem], list[LedgerEntry], set[str]]:
    found, ledger, _ = scan_index(spec, layout)  # writes layout.index; Ray tasks when Ray is up, else local cores
    items = found if limit is None else found[: max(limit, 0)]
    limited = {i.item_id for i in found[len(items):]}
    return items, ledger, limited


def check_templates(renderer: Any) -> None:
    check = getattr(renderer, "check", None)
    if check is not None:
        check()

# -- the driver ----------------------------------------------------------------------------------


@dataclass
class _Run:
    """State shared by build and render: the plan, the writer, the accounts."""

    spec: BuildSpec
    layout: Layout
    plan: Plan
    tally: Tally
    writer: ShardWriter
    progress: Progress
    by_id: dict[str, ItemPlan] = field(default_factory=dict)

    def take(self, item_id: str, rows: pa.Table | None, report: Report) -> None:
        plan = self.by_id[item_id]
        if rows is not None and rows.num_rows:
            self.writer.add(plan.split, rows)
        self.writer.resolve(plan.split, [(u.shard, u.pos) for u in plan.units])
        self.tally.record(plan, report, rows)
        self.progress.update(rows=rows.num_rows if rows is not None else 0, runs=sum(report.runs.values()),
                             set_aside=sum(1 for u in report.units if u[2] != "used"))


def _start(spec: BuildSpec, layout: Layout, plan: Plan, label: str, show: bool) -> _Run:
    layout.card.unlink(missing_ok=True)  # the card marks a finished build: none while this one runs
    run = _Run(spec=spec, layout=layout, plan=plan, tally=Tally(plan=plan, spec=spec),
               writer=ShardWriter(layout.data, plan.shards),
               progress=Progress(len(plan.working), label=label, enabled=show))
    run.by_id = {p.item.item_id: p for p in plan.items}
    for p in plan.items:
        if not p.units:
            run.tally.record(p, Report(), None)
    return run


def _finish(run: _Run, prep: _Prepared, wall: dict[str, float], placements: dict[str, Placement], t0: float) -> BuildResult:
    run.progress.close()
    started = time.perf_counter()
    shards = run.writer.finish()
    table = build_ledger(prep.ledger, run.tally, prep.limited)
    write_table(table, run.layout.ledger)
    wall["write"] = time.perf_counter() - started
    wall["total"] = time.perf_counter() - t0
    card = dataset_card(spec=run.spec, plan=run.plan, tally=run.tally, ledger=table, shards=shards, out=run.layout.dataset,
                        manifest_hash=prep.ctx.manifest_hash, code=prep.ctx.code_version, wall=wall,
                        actors={n: p.to_json() for n, p in placements.items()})
    card["timing"]["peak_rows_held"] = run.writer.peak_rows
    write_dataset_card(card, run.layout)
    return BuildResult(out=run.layout.out, layout=run.layout, card=card, shards=shards, summary=summary(card, run.layout))


@dataclass
class _Prepared:
    spec: BuildSpec
    layout: Layout
    plan: Plan
    ledger: list[LedgerEntry]
    limited: set[str]
    ctx: BuildContext
    wall: dict[str, float]


def _prepare(spec: BuildSpec, layout: Layout, *, limit: int | None, from_cache: bool) -> _Prepared:
    """Index, experts' fingerprints, template check, plan: everything decided on the driver."""
    wall: dict[str, float] = {}
    t = time.perf_counter()
    cache = FindingsCache(layout.cache)
    items, ledger, limited = index_items(spec, layout, limit)
    wall["index"] = time.perf_counter() - t
    t = time.perf_counter()
    if from_cache:
        infos = expert_infos_from_cache(spec, cache)
    else:
        from expert_runners.base import describe_experts

        log.info("checking %d expert(s) on the driver (options, weights, fingerprints)", len(spec.experts))
        infos = describe_experts(spec)
    check_templates(load_renderer(RENDERER, spec, infos))
    if not from_cache:
        cache.register([{"spec": i.spec, "fingerprint": i.fingerprint, "info": i.to_json()} for i in infos.values()])
    plan = make_plan(spec, items, infos)
    ctx = BuildContext(spec=spec, cache_root=str(cache.root), fingerprints={n: i.fingerprint for n, i in infos.items()},
                       manifest_hash=build_hash(spec), code_version=code_version(), experts=infos)
    wall["plan"] = time.perf_counter() - t
    return _Prepared(spec=spec, layout=layout, plan=plan, ledger=ledger, limited=limited, ctx=ctx, wall=wall)


def build(manifest: str | Path, *, out: str | Path | None = None, address: str | None = None, limit: int | None = None,
          progress: bool = True) -> BuildResult:
    """The whole pipeline. See the module docstring. Ray starts (or connects) while the driver
    indexes and plans, so its start-up overlaps the index."""
    t0 = time.perf_counter()
    spec = load_manifest(manifest)
    preflight(spec, manifest, out=out, rows=True, experts="describe")
    layout = Layout.of(spec, out)
    wants_ray = bool(spec.tasks) and (limit is None or limit > 0)
    placements: dict[str, Placement] = {}
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prepare") as pool:
        preparing = pool.submit(_prepare, spec, layout, limit=limit, from_cache=False)
        if wants_ray:
            log.info("starting Ray (%s) while the archive is indexed", address or os.environ.get("RAY_ADDRESS") or "a local Ray for this build")
        with (ray_session(address) if wants_ray else nullcontext("no Ray (nothing to run)")) as where:
            ray_ready = time.perf_counter() - t0
            prep = preparing.result()
            wall = {**prep.wall, "ray_start": ray_ready} if wants_ray else dict(prep.wall)
            run = _start(prep.spec, layout, prep.plan, "build", progress)
            if prep.plan.working:
                import ray

                placements = place_experts(spec, prep.plan, ray.cluster_resources())
                log.info("building %d items on %s; expert pools: %s", len(prep.plan.working), where,
                         ", ".join(f"{n} in load tasks" if p.tasks else f"{n} {p.actors}×(cpu {p.cpus}, gpu {p.gpus})"
                                   for n, p in placements.items()) or "none")
                pools = [f"{n} ×{p.actors}" for n, p in placements.items() if not p.tasks]
                if pools:
                    log.info("waiting for expert actors to start (%s): each loads its model before its first item", ", ".join(pools))
                t = time.perf_counter()
                ds = pipeline_dataset(prep.plan, prep.ctx, placements)
                for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                    for item_id, rows, report in zip(batch["item_id"].to_pylist(), batch["rows"].to_pylist(), batch["report"].to_pylist()):
                        run.take(item_id, table_from_bytes(rows), Report.from_json(report))
                wall["pipeline"] = time.perf_counter() - t
    return _finish(run, prep, wall, placements, t0)


def render(manifest: str | Path, *, out: str | Path | None = None, progress: bool = True) -> BuildResult:
    """Every shard again from cached findings only: no Ray, no expert is constructed."""
    from curation.ingest import readers_for

    t0 = time.perf_counter()
    spec = load_manifest(manifest)
    preflight(spec, manifest, out=out, rows=True, experts="cached")
    layout = Layout.of(spec, out)
    prep = _prepare(spec, layout, limit=None, from_cache=True)
    wall = dict(prep.wall)
    run = _start(spec, layout, prep.plan, "render", progress)
    readers = readers_for(spec)

    def hashed(p: ItemPlan) -> tuple[ItemPlan, str | None, Report]:
        report = Report()
        try:
            return p, content_hash(p.item, readers[p.item.source].root), report
        except OSError as e:
            report.errors["load"] = f"cannot read the item's files: {type(e).__name__}: {e}"
            return p, None, report

    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for p, content, report in pool.map(hashed, prep.plan.working):
            run.take(p.item.item_id, render_item(p, content, prep.ctx, report, count_cached=True), report)
    wall["render"] = time.perf_counter() - t
    return _finish(run, prep, wall, {}, t0)


# -- command line --------------------------------------------------------------------------------


def build_command(args: argparse.Namespace) -> None:
    result = build(args.manifest, out=args.out, address=args.address, limit=args.limit, progress=not args.quiet)
    print(result.summary)


def render_command(args: argparse.Namespace) -> None:
    result = render(args.manifest, out=args.out, progress=not args.quiet)
    print(result.summary)
