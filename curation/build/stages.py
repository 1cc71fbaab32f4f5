"""The build's stages, each a thin Ray Data callable over one pure per-item function.

    load (CPU task, with the weight-free experts)  →  expert (actor, one pool per expert)  →  …  →  render (CPU task)

Rows between stages follow `WORK_SCHEMA`: the item's plan as JSON, its content hash, which
expert results are still missing, the voxels (pickled, only while an expert still needs
them) and a small JSON report (errors, seconds, runs). Expert actors write findings to the
cache the moment they have them, so a build killed at any point keeps every finished result;
render reads the cache, exactly as `m3-curate render` does, so a build and a later render
make the same rows.

Per-item failures never raise: they become cache error entries and report entries, and the
item's other conversations go on. (Ray Data drops a failed block when errors are tolerated;
we never rely on that.) An exception that escapes is a bug and fails the build.
"""

from __future__ import annotations

import importlib
import io
import json
import pickle
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from curation.store.cache import DiedHere, FindingsCache, content_hash
from curation.errors import ItemError
from curation.ingest import SourceReader, readers_for
from curation.manifest import BuildSpec
from curation.build.plan import ItemPlan, Unit, runner_spec, task_name
from curation.rows import ROW_SCHEMA, Conversation, row_id

WORK_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("plan", pa.string()),
        ("content", pa.string()),
        ("missing", pa.string()),  # JSON: expert → arguments without cached findings
        ("volume", pa.large_binary()),  # pickled (Volume, labels Volume | None), or null
        ("report", pa.string()),
    ]
)
RESULT_SCHEMA = pa.schema([("item_id", pa.string()), ("rows", pa.large_binary()), ("report", pa.string())])
# Rows as they travel to the writer: the shard row plus where it goes.
PLACED_SCHEMA = ROW_SCHEMA.append(pa.field("_shard", pa.int64())).append(pa.field("_pos", pa.int64()))
RENDERER = "curation.render.renderer:Renderer"


@dataclass(slots=True, frozen=True)
class BuildContext:
    """Everything a stage needs, shipped once per task or actor (small: no items, no arrays)."""

    spec: BuildSpec
    cache_root: str
    fingerprints: dict[str, str]
    manifest_hash: str
    code_version: str
    renderer: str = RENDERER
    experts: dict[str, Any] = field(default_factory=dict)  # name → ExpertInfo, for the renderer
    # Per-process memos (readers, renderer, weight-free experts) are kept for one build: a
    # worker that serves the next build — the same recipe into another folder, with another
    # cache or image size — builds its own.
    build_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def cache(self) -> FindingsCache:
        return FindingsCache(Path(self.cache_root))


@dataclass(slots=True)
class Report:
    """What became of one item in the stages; travels as JSON beside the item."""

    errors: dict[str, str] = field(default_factory=dict)  # stage or expert → reason
    seconds: dict[str, float] = field(default_factory=dict)  # stage → seconds spent on this item
    runs: dict[str, int] = field(default_factory=dict)  # expert → runs made for this item
    cached: dict[str, int] = field(default_factory=dict)  # expert → results found in the cache
    units: list[list[Any]] = field(default_factory=list)  # [task, variant, status, reason]
    templates: dict[str, str] = field(default_factory=dict)  # template → hash

    def add_seconds(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + seconds, 6)

    def to_json(self) -> str:
        return json.dumps({k: getattr(self, k) for k in self.__slots__}, sort_keys=True)  # type: ignore[attr-defined]

    @classmethod
    def from_json(cls, text: str | None) -> Report:
        return cls(**json.loads(text)) if text else cls()


# -- per-process memos (a Ray worker runs many tasks) --------------------------------------------

_MEMO: dict[tuple[Any, ...], Any] = {}


def per_build(ctx: BuildContext, key: tuple[Any, ...], make: Any) -> Any:
    """`make()`, built once per worker process and build (readers, the renderer, weight-free
    experts); dropped when the worker serves another build."""
    full = (ctx.build_id, *key)
    found = _MEMO.get(full)
    if found is None:
        if any(k[0] != ctx.build_id for k in _MEMO):
            _MEMO.clear()
        found = _MEMO[full] = make()
    return found


def reader(ctx: BuildContext, source: str) -> SourceReader:
    return per_build(ctx, ("readers",), lambda: readers_for(ctx.spec))[source]  # type: ignore[no-any-return]


def load_renderer(path: str, spec: BuildSpec, experts: dict[str, Any] | None = None) -> Any:
    """The renderer class at `module:Class`, constructed with the manifest and the experts'
    descriptions (`ExpertInfo`)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)(spec, experts=experts or {})


def renderer(ctx: BuildContext) -> Any:
    return per_build(ctx, ("renderer", ctx.renderer), lambda: load_renderer(ctx.renderer, ctx.spec, ctx.experts))


# -- load ----------------------------------------------------------------------------------------


def missing_findings(plan: ItemPlan, content: str, ctx: BuildContext, cache: FindingsCache, report: Report) -> dict[str, list[str]]:
    """Expert → arguments with no cached findings (failures recorded earlier count as missing:
    a build tries them again)."""
    missing: dict[str, list[str]] = {}
    for expert, args in plan.needs(ctx.spec).items():
        for arg in args:
            if cache.has(content, ctx.fingerprints[expert], arg):
                report.cached[expert] = report.cached.get(expert, 0) + 1
            else:
                missing.setdefault(expert, []).append(arg)
    return missing


def load_item(row: dict[str, Any], ctx: BuildContext) -> dict[str, Any]:
    """Hash the item's files; load its voxels only if some expert result is not cached."""
    started = time.perf_counter()
    plan = ItemPlan.from_json(row["plan"])
    report = Report()
    cache = ctx.cache()
    out: dict[str, Any] = {"item_id": plan.item.item_id, "plan": row["plan"], "content": None, "missing": "{}", "volume": None}
    src = reader(ctx, plan.item.source)
    try:
        content = content_hash(plan.item, src.root)
    except OSError as e:
        report.errors["load"] = f"cannot read the item's files: {type(e).__name__}: {e}"
    else:
        out["content"] = content
        missing = missing_findings(plan, content, ctx, cache, report)
        if missing:
            try:
                out["volume"] = _voxels(plan, src, content, ctx, cache)
                out["missing"] = json.dumps(missing, sort_keys=True)
            except ItemError as e:
                reason = f"load failed: {e}"
                report.errors["load"] = reason
                for expert, args in missing.items():
                    for arg in args:
                        cache.put_error(content, ctx.fingerprints[expert], reason, arg)
    report.add_seconds("load", time.perf_counter() - started)
    out["report"] = report.to_json()
    return out


LOADING = "_load"  # the cache's folder for marks of items being loaded


def _voxels(plan: ItemPlan, src: SourceReader, content: str, ctx: BuildContext, cache: FindingsCache) -> bytes:
    """The item's voxels and labels, pickled. An item whose loading killed a process of this
    build before (a decoder crash, the out-of-memory killer; Ray retries the task) is an
    `ItemError`, not the next crash."""
    try:
        with cache.running(content, LOADING, ctx.build_id):
            volume = src.load(plan.item)
            labels = src.load_labels(plan.item) if plan.item.label_uri else None
            return pickle.dumps((volume, labels), protocol=5)
    except DiedHere:
        raise ItemError(plan.item.item_id, "loading it killed the worker process (out of memory, or a crash in native code)") from None


def load_batch(batch: pa.Table, ctx: BuildContext) -> pa.Table:
    return pa.Table.from_pylist([load_item(r, ctx) for r in batch.to_pylist()], schema=WORK_SCHEMA)


# -- experts -------------------------------------------------------------------------------------


class ExpertStage:
    """One actor of an expert's pool: builds and sets up the runner once, then runs it on every
    item that still lacks its findings and writes them to the cache."""

    def __init__(self, ctx: BuildContext, expert: str, *, gpus: float, last: bool):
        from expert_runners.base import make_runner, pick_device

        started = time.perf_counter()
        spec = next(e for e in ctx.spec.experts if e.name == expert)
        self.ctx, self.expert, self.last = ctx, expert, last
        self.fingerprint = ctx.fingerprints[expert]
        self.cache = ctx.cache()
        self.runner = make_runner(runner_spec(spec), image_max_side=ctx.spec.output.image_max_side)
        self.runner.setup(pick_device(gpus))
        self.setup_seconds: float | None = time.perf_counter() - started  # reported with the first item

    def run_item(self, row: dict[str, Any]) -> dict[str, Any]:
        from expert_runners.base import ExpertInput

        args = json.loads(row["missing"]).get(self.expert)
        if self.setup_seconds is not None:
            report = Report.from_json(row["report"])
            report.add_seconds(f"setup:{self.expert}", self.setup_seconds)
            row, self.setup_seconds = {**row, "report": report.to_json()}, None
        if args and row["volume"] is not None:
            report = Report.from_json(row["report"])
            plan = ItemPlan.from_json(row["plan"])
            volume, labels = pickle.loads(row["volume"])
            inp = ExpertInput(item=plan.item, volume=volume, labels=labels)
            for arg in args:
                self._run_one(inp, row["content"], arg, report)
            row = {**row, "report": report.to_json()}
        if self.last:
            row = {**row, "volume": None}
        return row

    def _run_one(self, inp: Any, content: str, arg: str, report: Report) -> None:
        """One run, its findings or its failure written to the cache. An item whose run killed
        a process of this build before (Ray retries the batch on a restarted worker) is set
        aside instead of killing the next one too."""
        if self.cache.has(content, self.fingerprint, arg):
            # made since this item was loaded: by another item with the same files (a qa set's
            # questions share their images) or before a crash, when Ray retries the batch
            report.cached[self.expert] = report.cached.get(self.expert, 0) + 1
            return
        started = time.perf_counter()
        try:
            with self.cache.running(content, self.fingerprint, self.ctx.build_id, arg):
                findings = self.runner.run(inp, arg)
        except DiedHere:
            reason = "the expert's process died while running on this item (out of memory, or a crash in native code)"
            report.errors[f"{self.expert}({arg})"] = reason
            self.cache.put_error(content, self.fingerprint, reason, arg)
            return
        except ItemError as e:
            report.errors[f"{self.expert}({arg})"] = e.reason
            self.cache.put_error(content, self.fingerprint, e.reason, arg)
        else:
            self.cache.put(content, self.fingerprint, findings, arg)
        report.add_seconds(f"expert:{self.expert}", time.perf_counter() - started)
        report.runs[self.expert] = report.runs.get(self.expert, 0) + 1

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist([self.run_item(r) for r in batch.to_pylist()], schema=WORK_SCHEMA)


def expert_batch(batch: pa.Table, ctx: BuildContext, expert: str, last: bool) -> pa.Table:
    """A weight-free expert in a CPU task (fused by Ray Data into the load task): its runner is
    built once per worker process, as an actor builds it once."""
    stage = per_build(ctx, ("expert", expert, last), lambda: ExpertStage(ctx, expert, gpus=0.0, last=last))
    return stage(batch)  # type: ignore[no-any-return]


# -- render --------------------------------------------------------------------------------------


def findings_json(findings: Any) -> str | None:
    """The expert output a template saw, as the row's `findings` (run timings left out: they
    differ between runs and are not findings)."""
    if findings is None:
        return None
    d = findings.to_dict()
    d.pop("timing", None)
    return json.dumps(d, sort_keys=True)


def make_row(ctx: BuildContext, plan: ItemPlan, unit: Unit, conv: Conversation, findings: Any) -> dict[str, Any]:
    item, task = plan.item, ctx.spec.tasks[unit.task]
    rid = row_id(item.item_id, task_name(task), unit.variant)
    messages = [
        {"role": m["role"], "content": [{"type": p["type"], "text": p.get("text")} for p in m["content"]]}
        for m in conv.messages
    ]
    return {
        "id": rid, "dataset": ctx.spec.name, "source": item.source, "task": task_name(task), "split": plan.split,
        "item_id": item.item_id, "patient_key": item.patient_key, "modality": item.modality, "expert": conv.expert,
        "images": [{"bytes": png, "path": f"{rid}-{k}.png"} for k, png in enumerate(conv.images)],
        "messages": messages,
        "findings": findings_json(findings),
        "meta": json.dumps(conv.meta, sort_keys=True),
        "provenance": {
            "expert_fingerprint": ctx.fingerprints.get(task.expert) if task.expert else None,
            "template_hash": conv.template_hash, "manifest_hash": ctx.manifest_hash, "code_version": ctx.code_version,
        },
        "_shard": unit.shard, "_pos": unit.pos,
    }


def render_item(plan: ItemPlan, content: str | None, ctx: BuildContext, report: Report, *, count_cached: bool = False) -> pa.Table:
    """Every planned conversation of an item from cached findings: the rows that could be
    made (as `PLACED_SCHEMA`), and an entry per unit in `report.units` (`count_cached`: count
    the cache hits in `report.cached`, for `m3-curate render`; a build counts them at load)."""
    started = time.perf_counter()
    cache, made = ctx.cache(), []
    render = renderer(ctx)
    for unit in plan.units:
        task = ctx.spec.tasks[unit.task]
        findings = None
        if task.expert is not None:
            call = f"{task.expert}({unit.arg})"
            if content is None:
                report.units.append([unit.task, unit.variant, "quarantined", report.errors.get("load", "the item could not be read")])
                continue
            findings = cache.get(content, ctx.fingerprints[task.expert], unit.arg)
            if findings is not None and count_cached:
                report.cached[task.expert] = report.cached.get(task.expert, 0) + 1
            if findings is None:
                error = cache.get_error(content, ctx.fingerprints[task.expert], unit.arg)
                status, reason = error or ("quarantined", f"no cached findings of {call}: run `m3-curate build`")
                report.units.append([unit.task, unit.variant, status, f"{call}: {reason}" if error else reason])
                continue
        try:
            conv = render.render(task, plan.item, findings, variant=unit.variant)
            if conv.image_parts() != len(conv.images):
                raise ItemError(plan.item.item_id, f"{conv.image_parts()} image parts but {len(conv.images)} images")
        except ItemError as e:  # TemplateError and its TemplateSkip among them
            reason = e.reason if e.reason.startswith("template ") else f"template {task.template}: {e.reason}"
            report.units.append([unit.task, unit.variant, _template_status(e), reason])
            continue
        report.templates[task.template] = conv.template_hash
        report.units.append([unit.task, unit.variant, "used", ""])
        made.append(make_row(ctx, plan, unit, conv, findings))
    report.add_seconds("render", time.perf_counter() - started)
    return pa.Table.from_pylist(made, schema=PLACED_SCHEMA)


def _template_status(e: ItemError) -> str:
    """`skipped` when the template chose to skip the item (`TemplateSkip`), else `quarantined`."""
    return "skipped" if any(c.__name__ == "TemplateSkip" for c in type(e).__mro__) else "quarantined"


def table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def table_from_bytes(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


RENDERING = "_render"  # the cache's folder for marks of items being rendered


def render_batch(batch: pa.Table, ctx: BuildContext) -> pa.Table:
    """`render_item` for each item; an item whose rendering killed a worker of this build
    before (an image that crashes the decoder or fills the memory; Ray retries the task) has
    its conversations quarantined instead."""
    out, cache = [], ctx.cache()
    for row in batch.to_pylist():
        plan = ItemPlan.from_json(row["plan"])
        report = Report.from_json(row["report"])
        try:
            with cache.running(plan.item.item_id, RENDERING, ctx.build_id):
                rows = render_item(plan, row["content"], ctx, report)
        except DiedHere:
            reason = "rendering it killed the worker process (out of memory, or a crash in native code)"
            report.units = [[u.task, u.variant, "quarantined", reason] for u in plan.units]
            rows = PLACED_SCHEMA.empty_table()
        out.append({"item_id": row["item_id"], "rows": table_bytes(rows), "report": report.to_json()})
    return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)
