"""Where and how the build runs on Ray: the session (embedded, a cluster, or a job's), the
actor pools' placement, and the Ray Data program itself.

    per lane:  from_blocks(blocks of item plans)
                 → map_batches(load_batch)             CPU tasks, `memory` reserved per task
                 → map_batches(expert_batch)           weight-free experts, fused into the load task
                 → map_batches(ExpertStage) per expert  actor pool: ActorPoolStrategy(size=…),
                                                        num_gpus per actor on GPU clusters
    union of the lanes → map_batches(render_batch)      CPU tasks, one operator for every lane
                       → the driver's iterator

Ray Data streams it: blocks of a few items flow through every operator at once, each
operator's output is throttled by Ray Data's backpressure (object-store budgets per operator),
voxels exist only between load and the lane's last expert, and a load task reserves the
memory of the largest item of its lane, so Ray never starts more loads than the node holds.

No reservation exceeds what the cluster has (`NodeLimits`, read from `ray.nodes()`): Ray
never schedules a task or actor that asks for more than any node offers, and the build would
wait forever. A pool that cannot fit is a `CurationError` before anything starts; a load
reservation is capped at what the largest node has left beside the actors; an item whose
header claims more voxels than a node holds is set aside at load, not reserved for.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from curation.build.plan import Plan
from curation.build.stages import WORK_SCHEMA, BuildContext, WorkItem, voxel_bytes, work_table
from curation.errors import CurationError
from curation.manifest import BuildSpec

BLOCK_ITEMS = 16  # items per input block at most ...
BLOCK_BYTES = 64 << 20  # ... and voxels per input block at most (estimated from the index)


@dataclass(slots=True)
class Placement:
    """How an expert's actor pool is placed."""

    actors: int
    gpus: float
    cpus: float
    batch_size: int
    pools: int = 1  # lanes that use the expert: each has its own pool
    memory: float | None = None  # bytes each actor reserves (None: nothing, Ray's default)
    tasks: bool = False  # no actors: runs in the lane's load tasks (a weight-free expert)

    def to_json(self) -> dict[str, Any]:
        return {"actors": self.actors, "gpus_per_actor": self.gpus, "cpus_per_actor": self.cpus, "batch_size": self.batch_size,
                "pools": self.pools, "memory_per_actor": self.memory, "in_load_tasks": self.tasks}


@dataclass(slots=True, frozen=True)
class NodeLimits:
    """What the largest node of the cluster offers: no single task or actor may ask for more."""

    cpus: float
    gpus: float
    memory: float  # bytes Ray may reserve on it
    count: int = 1  # nodes in the cluster

    @classmethod
    def of_cluster(cls) -> NodeLimits:
        import ray

        alive = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        return cls(cpus=max((r.get("CPU", 0.0) for r in alive), default=0.0), gpus=max((r.get("GPU", 0.0) for r in alive), default=0.0),
                   memory=max((r.get("memory", 0.0) for r in alive), default=0.0), count=max(1, len(alive)))


def task_cpus(cpus_total: float, nodes: int) -> float:
    """CPUs each load and render task reserves: one, or half a node's share on a cluster
    too small for that to leave room for the actors.

    >>> task_cpus(2, 1), task_cpus(8, 2), task_cpus(1, 1)
    (1.0, 1.0, 0.5)
    """
    return min(1.0, cpus_total / (2 * nodes))


def _quiet_ray_logs() -> None:
    """Ray's own chatter off the terminal (warnings stay; Ray Data's INFO lines still go to
    its ray-data.log in the session folder). The local session's token-auth notice is
    dropped: token authentication stays on."""
    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def _quiet_ray_data_console() -> None:
    import ray.data  # noqa: F401  (configures the "ray.data" logger on import)

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(logging.WARNING)
    # "Progress bars disabled": ours replace them
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


@contextmanager
def ray_session(address: str | None) -> Iterator[str]:
    """Connect to the cluster at `address` (or `RAY_ADDRESS`), or start a local Ray for this
    build and stop it afterwards; a session this process already has is used as it is.
    Yields a description of where the build runs."""
    import ray

    if ray.is_initialized():
        yield "the Ray session of this process"
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith(("http://", "https://")):
        raise CurationError(
            f"Ray address {address!r} is the dashboard (jobs API) address: submit with "
            f"`ray job submit --address {address} --working-dir . -- python -m curation build MANIFEST`, "
            "or give `--address` the cluster's GCS address (HOST:6379)"
        )
    _quiet_ray_logs()
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        where = f"the Ray cluster at {address}"
    else:
        ray.init(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        where = "a local Ray started for this build"
    try:
        yield where
    finally:
        ray.shutdown()


def place_experts(spec: BuildSpec, plan: Plan, resources: dict[str, float], node: NodeLimits | None = None) -> dict[str, Placement]:
    """Actor pools: `actors` from the manifest, else one per GPU share (GPU clusters) or one;
    a GPU each for runners with weights when the cluster has GPUs, shared fractionally when
    the pools outnumber the GPUs, and CPUs shared fractionally when the actors would leave
    none for loading and rendering: every pool can start, so the build cannot stall waiting
    for resources (`resources`: the cluster's totals; `node`: its largest node, by default
    the whole cluster as one). A runner without weights and without `actors`/`gpus` in the
    manifest gets no pool: it has nothing to load once, so it runs inside the lane's load
    tasks (no actor process to start, no extra hop for the voxels)."""
    gpus_total = float(resources.get("GPU", 0.0))
    cpus_total = float(resources.get("CPU", 1.0))
    node = node or NodeLimits(cpus=cpus_total, gpus=gpus_total, memory=float(resources.get("memory", 0.0)) or math.inf)
    pools = {e.name: sum(e.name in lane.experts for lane in plan.lanes) for e in spec.experts}
    used = [e for e in spec.experts if pools[e.name]]
    auto_gpu = [e for e in used if e.gpus is None and gpus_total > 0 and plan.experts[e.name].weights]
    out: dict[str, Placement] = {}
    share_pools = sum(pools[e.name] for e in auto_gpu)
    for e in used:
        if not plan.experts[e.name].weights and e.actors is None and not e.gpus:
            out[e.name] = Placement(actors=0, gpus=0.0, cpus=1.0, batch_size=e.batch_size, pools=pools[e.name], tasks=True)
            continue
        if e in auto_gpu:
            per_pool = gpus_total / share_pools
            actors = e.actors or max(1, math.floor(per_pool))
            gpus = _share(per_pool / actors)
        else:
            actors, gpus = e.actors or 1, float(e.gpus or 0.0)
        memory = None if e.memory_gb is None else e.memory_gb * (1 << 30)
        out[e.name] = Placement(actors=actors, gpus=gpus, cpus=1.0, batch_size=e.batch_size, pools=pools[e.name], memory=memory)
    _check_fits(spec, out, gpus_total, float(resources.get("memory", 0.0)) or math.inf, node)
    # Actors take at most the CPUs that leave one task's worth per node: then, wherever Ray puts
    # them, some node has room for a load or render task (the free CPUs average at least that).
    actors = sum(p.actors * p.pools for p in out.values())
    budget = cpus_total - node.count * task_cpus(cpus_total, node.count)
    if actors > budget:
        for p in out.values():
            p.cpus = _share(budget / actors)
    return out


def _check_fits(spec: BuildSpec, out: dict[str, Placement], gpus_total: float, memory_total: float, node: NodeLimits) -> None:
    """Every actor fits the largest node, and all of them the cluster; else one error that
    names the experts and the fix."""
    index = {e.name: i for i, e in enumerate(spec.experts)}
    need_gpus = sum(p.actors * p.gpus * p.pools for p in out.values())
    if need_gpus > gpus_total + 1e-9:
        names = [f"experts[{index[n]}] ({n}): {p.actors} actors × {p.gpus} GPUs" for n, p in out.items() if p.gpus]
        raise CurationError(f"the expert pools need {need_gpus:g} GPUs and the cluster has {gpus_total:g}: {'; '.join(names)}; "
                            "lower `actors` or `gpus` (a fraction shares a GPU)")
    for n, p in out.items():
        if p.gpus > node.gpus + 1e-9:
            raise CurationError(f"experts[{index[n]}] ({n}): gpus: {p.gpus:g} per actor, but no node has more than {node.gpus:g}; "
                                "lower `gpus`")
        if p.memory and p.memory > node.memory:
            raise CurationError(f"experts[{index[n]}] ({n}): memory_gb: {p.memory / 2**30:g} per actor, but no node offers more "
                                f"than {node.memory / 2**30:.1f} GiB; lower `memory_gb`")
    reserved = sum((p.memory or 0.0) * p.actors * p.pools for p in out.values())
    if reserved > memory_total:
        raise CurationError(f"the expert pools reserve {reserved / 2**30:.1f} GiB and the cluster offers {memory_total / 2**30:.1f} GiB; "
                            "lower `actors` or `memory_gb`")


def _share(fraction: float) -> float:
    """A resource share Ray accepts: at most 1, rounded down to 1/100, never 0."""
    return max(0.01, math.floor(min(1.0, fraction) * 100) / 100)


@dataclass(slots=True)
class LaneInput:
    """A lane's working items as input blocks: row group k of `path` is block k (`WORK_SCHEMA`)."""

    path: Path
    blocks: int = 0
    largest: int = 0  # voxel bytes of the largest item a load task may hold (items over the limit are set aside)
    runs: int = 0  # expert runs its items need (at most: some may be cached)


def write_lane_inputs(plan: Plan, folder: Path, limit: float) -> dict[int, LaneInput]:
    """Each lane's working items, in build order, grouped into blocks of at most BLOCK_ITEMS
    items and BLOCK_BYTES of voxels (a CT series is a block of its own; chest X-rays travel
    by 16), written as row groups of one Parquet file per lane. The driver holds one block
    per lane at a time; Ray Data reads the blocks as it streams (`read_blocks`), so neither
    the driver nor the object store holds the archive's plan."""
    folder.mkdir(parents=True, exist_ok=True)
    inputs: dict[int, LaneInput] = {}
    writers: dict[int, pq.ParquetWriter] = {}
    pending: dict[int, tuple[list[WorkItem], int]] = {}

    def flush(lane: int) -> None:
        block, _ = pending.pop(lane)
        writers[lane].write_table(work_table(block), row_group_size=len(block))
        inputs[lane].blocks += 1

    for p in plan.iter_working():
        if p.lane not in inputs:
            inputs[p.lane] = LaneInput(path=folder / f"lane-{p.lane}.parquet")
            writers[p.lane] = pq.ParquetWriter(inputs[p.lane].path, WORK_SCHEMA)
        voxels = voxel_bytes(p.item)
        block, size = pending.get(p.lane, ([], 0))
        if block and (len(block) >= BLOCK_ITEMS or size + voxels > BLOCK_BYTES):
            flush(p.lane)
            block, size = [], 0
        pending[p.lane] = ([*block, WorkItem(plan=p)], size + voxels)
        inputs[p.lane].runs += sum(len(args) for args in p.needs(plan.spec).values())
        if voxels <= limit:
            inputs[p.lane].largest = max(inputs[p.lane].largest, voxels)
    for lane in list(pending):
        flush(lane)
    for w in writers.values():
        w.close()
    return inputs


WORKER_BASE_MEMORY = 384 << 20  # a load worker with numpy, pyarrow, pydicom, nibabel, torch, MONAI loaded (measured: 404 MiB peak on a CT item of 8 MB)
COPIES = 3  # copies of an item's voxels a load task holds at once: file bytes, decoded voxels, the pickled work item


def item_bytes_limit(node: NodeLimits, placements: dict[str, Placement]) -> float:
    """The largest item (voxels as float32) a load task can hold on the largest node beside
    the expert actors' reservations: bigger ones are set aside at load."""
    actors = sum((p.memory or 0.0) * p.actors * p.pools for p in placements.values())
    return max(0.0, (node.memory - actors - WORKER_BASE_MEMORY) / COPIES)


def load_memory(largest: int) -> float:
    """Bytes a load task reserves: the worker itself plus COPIES of the lane's largest item
    that can be loaded at all (items over the limit are set aside, never reserved for)."""
    return float(WORKER_BASE_MEMORY + COPIES * largest)


def pipeline_dataset(inputs: dict[int, LaneInput], plan: Plan, ctx: BuildContext, placements: dict[str, Placement], *,
                     cpus: float = 1.0) -> Any:
    """The whole build as one Ray Data dataset: one branch per lane up to its last expert,
    unioned, then rendering. One render operator, not one per lane: Ray Data reserves each
    operator at least one task's CPUs, and on a node with few CPUs per-lane render operators
    leave too few for the lanes to stream at once. `inputs`: each lane's blocks
    (`write_lane_inputs`); `cpus`: what each load and render task reserves (`task_cpus`)."""
    import ray.data

    from curation.build.stages import load_planned, render_batch

    _quiet_ray_data_console()
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False  # ours is in curation.build.progress
    branches = []
    # the lane with the most expert runs first: Ray Data breaks ties between operators in
    # topological order, so at the start that lane's experts get their first items soonest
    for lane_index in sorted(inputs, key=lambda k: -inputs[k].runs):
        lane, given = plan.lanes[lane_index], inputs[lane_index]
        # block numbers only: each load task reads its block from the lane's input file. from_blocks,
        # not from_arrow: from_arrow runs a Ray task per block for its metadata and waits for them all
        ds = ray.data.from_blocks([pa.table({"block": [k]}) for k in range(given.blocks)])
        # `memory` also keeps Ray Data from fusing loading into the expert actors (different
        # resources): loading must overlap the experts' work, not run inside their actors.
        # Experts that run in load tasks come first, with the same resources: Ray Data fuses
        # them into the load task.
        load_args = {"num_cpus": cpus, "memory": load_memory(given.largest)}
        ds = ds.map_batches(load_planned, fn_kwargs={"ctx": ctx, "path": str(given.path)}, batch_size=None, batch_format="pyarrow",
                            **load_args)
        for expert, last in _lane_experts(lane.experts, placements):
            ds = _expert_stage(ds, ctx, expert, last, placements[expert], load_args)
        branches.append(ds)
    ds = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
    return ds.map_batches(render_batch, fn_kwargs={"ctx": ctx}, batch_size=None, batch_format="pyarrow", num_cpus=cpus)


def _lane_experts(experts: tuple[str, ...], placements: dict[str, Placement]) -> list[tuple[str, bool]]:
    """(expert, is the lane's last) in running order: those in load tasks first."""
    ordered = sorted(experts, key=lambda name: not placements[name].tasks)
    return [(name, k == len(ordered) - 1) for k, name in enumerate(ordered)]


def _expert_stage(ds: Any, ctx: BuildContext, expert: str, last: bool, p: Placement, load_args: dict[str, Any]) -> Any:
    import ray.data

    from curation.build.stages import ExpertStage, expert_batch

    if p.tasks:
        return ds.map_batches(expert_batch, fn_kwargs={"ctx": ctx, "expert": expert, "last": last}, batch_size=None,
                              batch_format="pyarrow", **load_args)
    return ds.map_batches(
        ExpertStage,
        fn_constructor_kwargs={"ctx": ctx, "expert": expert, "gpus": p.gpus, "last": last},
        batch_size=p.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=p.actors), num_cpus=p.cpus, num_gpus=p.gpus or None,
        **({"memory": p.memory} if p.memory else {}),
    )
