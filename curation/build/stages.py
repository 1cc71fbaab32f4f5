"""The build's stages, each a thin Ray Data callable over one pure per-item function.

    load (CPU task, with the weight-free experts)  →  expert (actor, one pool per expert)  →  …  →  render (CPU task)

Between stages an item travels as one `WorkItem` (its plan, its report, its content hash, the
expert results still missing and, only while an expert still needs them, its voxels), pickled
into the `work` column of a block (`WORK_SCHEMA`). Expert actors write findings to the cache
the moment they have them, so a build killed at any point keeps every finished result; render
reads the cache, exactly as `m3-curate render` does, so a build and a later render make the
same rows.

Per-item failures never raise: they become cache error entries and report entries, and the
item's other conversations go on. A worker process that dies (out of memory, a crash in native
code) is retried by Ray; the cache's run marks (`FindingsCache.running`) bound the retries per
item and per expert set-up, after which the item is set aside with the reason. An exception
that escapes is a bug and fails the build.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.build.plan import ItemPlan, PlannedConversation, runner_spec, task_name
from curation.build.progress import PassedCount
from curation.errors import CurationError, ItemError
from curation.findings import without_timing
from curation.items import StudyItem, Volume
from curation.manifest import BuildSpec
from curation.rows import ROW_SCHEMA, Conversation, row_id
from curation.store.cache import DamagedEntry, DiedHere, FindingsCache, content_hash
from curation.store.report import ConversationOutcome, ItemReport

if TYPE_CHECKING:
    from curation.ingest import SourceReader
    from curation.render.renderer import Renderer

WORK_SCHEMA = pa.schema([("item_id", pa.string()), ("work", pa.large_binary())])
RESULT_SCHEMA = pa.schema([("item_id", pa.string()), ("work", pa.large_binary()), ("rows", pa.large_binary())])
# Rows as they travel to the writer: the shard row plus where it goes.
PLACED_SCHEMA = ROW_SCHEMA.append(pa.field("_shard", pa.int64())).append(pa.field("_pos", pa.int64()))

RUN_TRIES = 2  # worker deaths while loading, running or rendering one item before it is set aside
BATCH_TRIES = 3  # deaths of an expert actor while an item is in its batch (outside a run) before it is set aside
SETUP_TRIES = 3  # deaths of one expert actor while it sets up before its items are set aside
LOADING, RENDERING, SETUP = "_load", "_render", "_setup"  # the cache's folders for run marks


@dataclass(slots=True, frozen=True)
class BuildContext:
    """Everything a stage needs, shipped once per task or actor (small: no items, no arrays)."""

    spec: BuildSpec
    cache_root: str
    fingerprints: dict[str, str]
    manifest_hash: str
    code_version: str
    experts: dict[str, Any] = field(default_factory=dict)  # name → ExpertInfo, for the renderer
    # An item whose voxels (from its header) exceed this many bytes is set aside instead of
    # loaded: no node could hold it (a tiny file may claim a huge volume). None: no limit.
    item_bytes_limit: float | None = None
    # Per-process memos (readers, renderer, weight-free experts) are kept for one build: a
    # worker that serves the next build — the same recipe into another folder, with another
    # cache or image size — builds its own.
    build_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Where each process that runs a lane's last expert stage keeps its count of the items it
    # passed, for the driver's progress line (`curation.build.progress.PassedCount`). None: not counted.
    progress_dir: str | None = None

    def cache(self) -> FindingsCache:
        return FindingsCache(Path(self.cache_root))


@dataclass(slots=True)
class WorkItem:
    """One item on its way through the stages."""

    plan: ItemPlan
    report: ItemReport = field(default_factory=ItemReport)
    content: str | None = None  # hash of the item's files; None: they could not be read
    missing: dict[str, list[str]] = field(default_factory=dict)  # expert → arguments without cached findings
    volume: tuple[Volume, Volume | None] | None = None  # voxels and labels, while an expert needs them


def work_table(items: list[WorkItem]) -> pa.Table:
    return pa.table({"item_id": [w.plan.item.item_id for w in items],
                     "work": [pickle.dumps(w, protocol=5) for w in items]}, schema=WORK_SCHEMA)


def work_items(batch: pa.Table) -> list[WorkItem]:
    return [pickle.loads(b) for b in batch.column("work").to_pylist()]


def voxel_bytes(item: StudyItem) -> int:
    """Bytes of the item's voxels as float32, from its header's shape (all channels)."""
    return math.prod(item.shape) * max(1, len(item.channels)) * 4


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


# Readers and the renderer are imported where they are used: an expert actor needs neither, and
# each import costs every actor's start-up (pydicom, nibabel, Jinja).


def reader(ctx: BuildContext, source: str) -> SourceReader:
    from curation.ingest import readers_for

    return per_build(ctx, ("readers",), lambda: readers_for(ctx.spec))[source]  # type: ignore[no-any-return]


def renderer(ctx: BuildContext) -> Renderer:
    from curation.render.renderer import Renderer

    return per_build(ctx, ("renderer",), lambda: Renderer(ctx.spec, experts=ctx.experts))  # type: ignore[no-any-return]


# -- load ----------------------------------------------------------------------------------------


class TransientItemError(ItemError):
    """An item this cluster could not process this time (a worker died on it, too little
    memory): recorded as transient, so the next build tries it again."""


def _transient(error: BaseException) -> bool:
    """A failure of the environment rather than the expert's verdict on the item: out of
    memory, in the host or on the GPU."""
    cause = error.__cause__ or error
    if isinstance(error, TransientItemError) or isinstance(cause, MemoryError):
        return True
    torch = sys.modules.get("torch")  # only an expert that uses torch can run out of GPU memory
    return torch is not None and isinstance(cause, torch.cuda.OutOfMemoryError)


def missing_findings(plan: ItemPlan, content: str, ctx: BuildContext, cache: FindingsCache, report: ItemReport) -> dict[str, list[str]]:
    """Expert → arguments without a settled result: no findings, and no failure that running
    again would repeat (a transient one is tried again); cache hits are counted in
    `report.cached`."""
    missing: dict[str, list[str]] = {}
    for expert, args in plan.needs(ctx.spec).items():
        for arg in args:
            if cache.has(content, ctx.fingerprints[expert], arg):
                report.count(report.cached, expert)
            elif not cache.settled(content, ctx.fingerprints[expert], arg):
                missing.setdefault(expert, []).append(arg)
    return missing


def look_up(work: WorkItem, root: Path, ctx: BuildContext, cache: FindingsCache) -> None:
    """The item's content hash and the expert results it still lacks (cache hits counted)."""
    try:
        work.content = content_hash(work.plan.item, root)
    except OSError as e:
        work.report.errors["load"] = f"cannot read the item's files: {type(e).__name__}: {e.strerror or e}"  # the ledger names the item
    else:
        work.missing = missing_findings(work.plan, work.content, ctx, cache, work.report)


def load_item(work: WorkItem, ctx: BuildContext) -> WorkItem:
    """Hash the item's files; load its voxels only if some expert result is not cached."""
    started = time.perf_counter()
    plan, report, cache = work.plan, work.report, ctx.cache()
    src = reader(ctx, plan.item.source)
    look_up(work, src.root, ctx, cache)
    if work.missing:
        try:
            work.volume = _voxels(plan, src, work.content, ctx, cache)
        except ItemError as e:
            reason = f"load failed: {e.reason}"  # the ledger names the item
            report.errors["load"] = reason
            for expert, args in work.missing.items():
                for arg in args:
                    cache.put_error(work.content, ctx.fingerprints[expert], reason, arg, transient=_transient(e))
            work.missing = {}
    report.add_seconds("load", time.perf_counter() - started)
    return work


def _voxels(plan: ItemPlan, src: SourceReader, content: str, ctx: BuildContext, cache: FindingsCache) -> tuple[Volume, Volume | None]:
    """The item's voxels and labels. An item that declares more voxels than any node holds is
    an `ItemError`, and so is one whose loading killed processes of this build `RUN_TRIES`
    times (a decoder crash, the out-of-memory killer; Ray retries the task)."""
    size = voxel_bytes(plan.item)
    if ctx.item_bytes_limit is not None and size > ctx.item_bytes_limit:
        raise TransientItemError(plan.item.item_id, f"its header declares {plan.item.shape} voxels ({size / 2**30:.1f} GiB as float32), "
                                           f"more than a worker of this cluster can hold ({ctx.item_bytes_limit / 2**30:.1f} GiB)")
    try:
        with cache.running(content, LOADING, ctx.build_id, tries=RUN_TRIES):
            volume = src.load(plan.item)
            labels = src.load_labels(plan.item) if plan.item.label_uri else None
            return volume, labels
    except DiedHere as e:
        raise TransientItemError(plan.item.item_id, f"loading it killed the worker process {e.deaths} times (out of memory, "
                                                    "or a crash in native code)") from None


def load_batch(batch: pa.Table, ctx: BuildContext) -> pa.Table:
    return work_table([load_item(w, ctx) for w in work_items(batch)])


def read_blocks(batch: pa.Table, path: str) -> pa.Table:
    """The input blocks (row groups of a lane's input file, `cluster.write_lane_inputs`) that a
    batch of block numbers names. A node that cannot open the file does not share `--out` (one
    that joined the cluster after the build checked its nodes, `curation.build.shared`): the
    build stops naming it, rather than with pyarrow's traceback."""
    try:
        f = pq.ParquetFile(path)
    except OSError as e:
        from curation.build.shared import RERUN_WITH_THE_NODE, SHARED_RULE, this_node

        why = os.strerror(e.errno) if e.errno else str(e)  # pyarrow's own strerror repeats the path
        raise CurationError(f"node {this_node()} cannot read this build's input blocks ({path}: {why}). {SHARED_RULE}. "
                            f"{RERUN_WITH_THE_NODE}") from None
    return pa.concat_tables([f.read_row_group(k) for k in batch.column("block").to_pylist()])


def load_planned(batch: pa.Table, ctx: BuildContext, path: str) -> pa.Table:
    """`load_batch` over the input blocks a batch of block numbers names."""
    return load_batch(read_blocks(batch, path), ctx)


# -- experts -------------------------------------------------------------------------------------


def _setup_key(expert: str) -> str:
    """Whose set-up a mark counts: the actor (Ray keeps an actor's id across its restarts),
    else the expert on this node (a weight-free expert set up in a load task)."""
    try:
        import ray

        context = ray.get_runtime_context() if ray.is_initialized() else None
    except ImportError:
        context = None
    if context is None:
        return f"{expert}-local"
    return f"{expert}-{context.get_actor_id() or 'tasks-' + context.get_node_id()}"


class _KeyLocks:
    """A lock per key, made when a thread first asks for it and dropped when no thread holds or
    waits for it: an expert host's threads may be handed two items with the same files at once
    (two lanes that read one picture), and the second must wait for the first's result in the
    cache instead of running the expert again."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[tuple[str, str], tuple[threading.Lock, list[int]]] = {}

    @contextmanager
    def hold(self, key: tuple[str, str]) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.setdefault(key, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._guard:
                users[0] -= 1
                if not users[0]:
                    del self._locks[key]


class _Expert:
    """One expert inside a stage: its runner built and set up once, then run on the items that
    still lack its findings, which go to the cache. A runner that cannot be set up (an
    exception, or a process that died `SETUP_TRIES` times setting up) leaves it `broken`: its
    items are set aside with the reason, the build goes on."""

    def __init__(self, ctx: BuildContext, name: str, gpus: float):
        from expert_runners.base import make_runner, pick_device, thread_safe

        started = time.perf_counter()
        spec = next(e for e in ctx.spec.experts if e.name == name)
        self.ctx, self.name, self.fingerprint, self.cache = ctx, name, ctx.fingerprints[name], ctx.cache()
        self.broken: str | None = None
        self.one_at_a_time: threading.Lock | nullcontext[None] = nullcontext()
        self.running = _KeyLocks()  # (content, argument): one run of each at a time
        try:
            with self.cache.running(_setup_key(name), SETUP, ctx.build_id, tries=SETUP_TRIES):
                self.runner = make_runner(runner_spec(spec), image_max_side=ctx.spec.output.image_max_side)
                self.runner.setup(pick_device(gpus))
            if not thread_safe(self.runner):  # a runner that did not declare itself safe in threads runs one item at a time
                self.one_at_a_time = threading.Lock()
        except DiedHere as e:
            self.broken = f"the expert's worker died {e.deaths} times while setting up (out of memory, or a crash in native code)"
        except Exception as e:  # noqa: BLE001  (any failure to set up is the reason its items are set aside)
            self.broken = f"setting up the expert failed: {type(e).__name__}: {e}".replace("\n", " ")
        self.setup_seconds: list[float] = [time.perf_counter() - started]  # reported with the first item (popped once, in any thread)

    def run_item(self, work: WorkItem) -> None:
        args = work.missing.get(self.name)
        try:
            work.report.add_seconds(f"setup:{self.name}", self.setup_seconds.pop())
        except IndexError:
            pass
        if not args or work.volume is None or work.content is None:
            return
        try:
            with self.cache.running(work.content, f"_batch-{self.fingerprint}", self.ctx.build_id, tries=BATCH_TRIES):
                self._run_all(work, args)
        except DiedHere as e:
            self._set_aside(work, args, f"the expert's process died {e.deaths} times with this item in its batch "
                                        "(out of memory, or a crash in native code)")

    def _run_all(self, work: WorkItem, args: list[str]) -> None:
        from expert_runners.base import ExpertInput

        if self.broken is not None:
            self._set_aside(work, args, self.broken)
            return
        volume, labels = work.volume  # type: ignore[misc]
        inp = ExpertInput(item=work.plan.item, volume=volume, labels=labels)
        for arg in args:
            self._run_one(inp, work.content, arg, work.report)  # type: ignore[arg-type]

    def _set_aside(self, work: WorkItem, args: list[str], reason: str) -> None:
        """Every run of the item by this expert failed for the environment's reason."""
        for arg in args:
            work.report.errors[f"{self.name}({arg})"] = reason
            self.cache.put_error(work.content, self.fingerprint, reason, arg, transient=True)  # type: ignore[arg-type]

    def _run_one(self, inp: Any, content: str, arg: str, report: ItemReport) -> None:
        """One run, its findings or its failure written to the cache. An item whose run killed
        processes of this build `RUN_TRIES` times (Ray retries the batch on a restarted worker)
        is set aside instead of killing the next one too."""
        with self.running.hold((content, arg)):
            self._run_unless_cached(inp, content, arg, report)

    def _run_unless_cached(self, inp: Any, content: str, arg: str, report: ItemReport) -> None:
        if self.cache.has(content, self.fingerprint, arg):
            # made since this item was loaded: by another item with the same files (a qa set's
            # questions share their images, two sources may name one picture) or before a
            # crash, when Ray retries the batch
            report.count(report.cached, self.name)
            return
        started = time.perf_counter()
        try:
            with self.cache.running(content, self.fingerprint, self.ctx.build_id, arg, tries=RUN_TRIES), self.one_at_a_time:
                findings = self.runner.run(inp, arg)
        except DiedHere as e:
            reason = f"the expert's process died {e.deaths} times while running on this item (out of memory, or a crash in native code)"
            report.errors[f"{self.name}({arg})"] = reason
            self.cache.put_error(content, self.fingerprint, reason, arg, transient=True)
            return
        except ItemError as e:
            report.errors[f"{self.name}({arg})"] = e.reason
            self.cache.put_error(content, self.fingerprint, e.reason, arg, transient=_transient(e))
        else:
            self.cache.put(content, self.fingerprint, findings, arg)
        report.add_seconds(f"expert:{self.name}", time.perf_counter() - started)
        report.count(report.runs, self.name)


class ExpertStage:
    """An actor of an expert pool (`experts`: one name), or an expert host (several: every
    CPU expert of a build, `cluster.place_experts`): each expert is set up once when the actor
    starts, then every item runs through the experts it still lacks, in order. `last`: the
    item's voxels are dropped afterwards (no later stage needs them). `threads`: batches
    Ray Data hands this actor at once, each in its own thread; torch then computes on one
    thread per call, so the calls, not torch's intra-op pool, fill the CPUs."""

    def __init__(self, ctx: BuildContext, experts: tuple[str, ...], *, gpus: float, last: bool, threads: int = 1):
        self.experts = [_Expert(ctx, name, gpus) for name in experts]
        self.last = last
        self.passed = PassedCount.of_process(ctx.progress_dir) if last and ctx.progress_dir else None
        torch = sys.modules.get("torch")
        if threads > 1 and torch is not None:
            torch.set_num_threads(1)

    def run_item(self, work: WorkItem) -> WorkItem:
        for expert in self.experts:
            expert.run_item(work)
        if self.last:
            work.volume = None
        return work

    def __call__(self, batch: pa.Table) -> pa.Table:
        done = [self.run_item(w) for w in work_items(batch)]
        if self.passed is not None:
            for w in done:  # the item's expert seconds of every stage so far: its report travels with it
                self.passed.add(w.plan.lane, 1, sum(s for k, s in w.report.seconds.items() if k.startswith("expert:")))
        return work_table(done)


def expert_batch(batch: pa.Table, ctx: BuildContext, expert: str, last: bool) -> pa.Table:
    """A weight-free expert in a CPU task (fused by Ray Data into the load task): its runner is
    built once per worker process, as an actor builds it once."""
    stage = per_build(ctx, ("expert", expert, last), lambda: ExpertStage(ctx, (expert,), gpus=0.0, last=last))
    return stage(batch)  # type: ignore[no-any-return]


# -- render --------------------------------------------------------------------------------------


def findings_json(data: dict[str, Any] | None) -> str | None:
    """The expert output a template saw (`Findings.to_dict`), as the row's `findings` (run
    timings left out: they differ between runs and are not findings)."""
    if data is None:
        return None
    return json.dumps(without_timing(data), sort_keys=True)


def make_row(ctx: BuildContext, plan: ItemPlan, planned: PlannedConversation, conv: Conversation, findings: str | None) -> dict[str, Any]:
    """The shard row of a conversation; `findings` is its `findings_json`."""
    item, task = plan.item, ctx.spec.tasks[planned.task]
    rid = row_id(item.item_id, task_name(task), planned.variant)
    messages = [
        {"role": m["role"], "content": [{"type": p["type"], "text": p.get("text")} for p in m["content"]]}
        for m in conv.messages
    ]
    return {
        "id": rid, "dataset": ctx.spec.name, "source": item.source, "task": task_name(task), "split": plan.split,
        "item_id": item.item_id, "patient_key": item.patient_key, "modality": item.modality, "expert": conv.expert,
        "images": [{"bytes": png, "path": f"{rid}-{k}.png"} for k, png in enumerate(conv.images)],
        "messages": messages,
        "findings": findings,
        "meta": json.dumps(conv.meta, sort_keys=True),
        "provenance": {
            "expert_fingerprint": ctx.fingerprints.get(task.expert) if task.expert else None,
            "template_hash": conv.template_hash, "manifest_hash": ctx.manifest_hash, "code_version": ctx.code_version,
        },
        "_shard": planned.shard, "_pos": planned.pos,
    }


@dataclass(slots=True)
class _Result:
    """One expert result of an item, as every conversation that uses it gets it: its findings
    (None without an expert), or the outcome (`status`, `reason`) that sets those
    conversations aside; `text`, its `findings_json`, once a row has needed it."""

    findings: Any = None
    status: str = ""
    reason: str = ""
    text: str | None = None


def _cached_result(expert: str, arg: str, content: str | None, ctx: BuildContext, cache: FindingsCache, report: ItemReport) -> _Result:
    """An expert result of the item, read from the cache (or why there is none)."""
    if content is None:
        return _Result(status="quarantined", reason=report.errors.get("load", "the item could not be read"))
    call = f"{expert}({arg})"
    try:
        findings = cache.get(content, ctx.fingerprints[expert], arg)
    except DamagedEntry as e:
        return _Result(status="quarantined", reason=f"{call}: its cached findings did not read ({e}) and were moved aside: the "
                                                     f"next build runs {expert} again")
    if findings is not None:
        return _Result(findings=findings)
    error = cache.get_error(content, ctx.fingerprints[expert], arg)
    if error is None:
        return _Result(status="quarantined", reason=f"no cached findings of {call}: run `m3-curate build`")
    return _Result(status=error[0], reason=f"{call}: {error[1]}")


def render_item(plan: ItemPlan, content: str | None, ctx: BuildContext, report: ItemReport) -> pa.Table:
    """Every planned conversation of an item from cached findings: the rows that could be
    made (as `PLACED_SCHEMA`), and an outcome per planned conversation in `report.outcomes`.
    Each expert result is read from the cache and serialised once for the item, however many
    conversations use it, and handed to the renderer as one object (its memo is by identity)."""
    from curation.render.renderer import TemplateSkip

    started = time.perf_counter()
    cache, made, results = ctx.cache(), [], {}
    render = renderer(ctx)
    for planned in plan.conversations:
        task = ctx.spec.tasks[planned.task]
        if task.expert is None:
            got = _Result()
        elif (got := results.get((task.expert, planned.arg))) is None:
            got = results[(task.expert, planned.arg)] = _cached_result(task.expert, planned.arg, content, ctx, cache, report)
        if got.reason:
            report.outcomes.append(ConversationOutcome(planned.task, planned.variant, got.status, got.reason))
            continue
        try:
            conv = render.render(task, plan.item, got.findings, variant=planned.variant)
            if conv.image_parts() != len(conv.images):
                raise ItemError(plan.item.item_id, f"{conv.image_parts()} image parts but {len(conv.images)} images")
        except ItemError as e:  # TemplateError and its TemplateSkip among them
            reason = e.reason if e.reason.startswith("template ") else f"template {task.template}: {e.reason}"
            status = "skipped" if isinstance(e, TemplateSkip) else "quarantined"
            report.outcomes.append(ConversationOutcome(planned.task, planned.variant, status, reason))
            continue
        if got.text is None and got.findings is not None:
            got.text = findings_json(render.findings_data(got.findings, plan.item))
        report.templates[task.template] = conv.template_hash
        report.outcomes.append(ConversationOutcome(planned.task, planned.variant, "used"))
        made.append(make_row(ctx, plan, planned, conv, got.text))
    report.add_seconds("render", time.perf_counter() - started)
    return pa.Table.from_pylist(made, schema=PLACED_SCHEMA)


def table_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def table_from_bytes(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(data).read_all()


def render_guarded(work: WorkItem, ctx: BuildContext, cache: FindingsCache) -> pa.Table:
    """`render_item`, unless rendering this item killed workers of this build `RUN_TRIES`
    times before (an image that crashes the decoder or fills the memory; Ray retries the
    task): then its conversations are quarantined."""
    plan = work.plan
    try:
        with cache.running(plan.item.item_id, RENDERING, ctx.build_id, tries=RUN_TRIES):
            return render_item(plan, work.content, ctx, work.report)
    except DiedHere as e:
        reason = f"rendering it killed the worker process {e.deaths} times (out of memory, or a crash in native code)"
        work.report.outcomes = [ConversationOutcome(c.task, c.variant, "quarantined", reason) for c in plan.conversations]
        return PLACED_SCHEMA.empty_table()


def render_batch(batch: pa.Table, ctx: BuildContext) -> pa.Table:
    """Each item's rows (Arrow IPC bytes) and its work record (its plan and report, no voxels)."""
    cache, out = ctx.cache(), []
    for work in work_items(batch):
        rows = render_guarded(work, ctx, cache)
        out.append({"item_id": work.plan.item.item_id, "work": pickle.dumps(replace(work, volume=None), protocol=5),
                    "rows": table_bytes(rows)})
    return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)
