"""Where and how the build runs on Ray: the session (embedded, a cluster, or a job's), the
actor pools' placement, and the Ray Data program itself.

    per lane:  from_blocks(blocks of item plans)
                 → map_batches(load_batch)             CPU tasks, `memory` reserved per task
                 → map_batches(expert_batch)           weight-free experts, fused into the load task
                 → map_batches(ExpertStage) per expert  a pool of its own (GPU experts, or `actors`
                                                        in the manifest): ActorPoolStrategy(size=…)
    union of the lanes with CPU experts
                 → map_batches(ExpertStage)            the expert hosts: every CPU expert with weights
                                                        in each actor, `threads` items at once
    union of all lanes → map_batches(render_batch)      CPU tasks, one operator for every lane
                       → the driver's iterator

Ray Data streams it: blocks of a few items flow through every operator at once, each
operator's output is throttled by Ray Data's backpressure (object-store budgets per operator),
voxels exist only between load and the item's last expert, and a load task reserves the
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
from curation.local_ray import start_local_ray, stop_local_ray
from curation.manifest import BuildSpec
from curation.ray_address import join

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
    hosted: bool = False  # runs in the build's expert hosts (`actors` of them), beside the other CPU experts
    threads: int = 1  # items each actor runs at once (an expert host: one per CPU it stands for)

    def to_json(self) -> dict[str, Any]:
        return {"actors": self.actors, "gpus_per_actor": self.gpus, "cpus_per_actor": self.cpus, "batch_size": self.batch_size,
                "pools": self.pools, "memory_per_actor": self.memory, "in_load_tasks": self.tasks, "in_expert_hosts": self.hosted,
                "threads_per_actor": self.threads}


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


def refuse_without_cpus(node: NodeLimits) -> None:
    """Every load and render task reserves part of a CPU: on a cluster whose nodes have none
    (a head started with `--num-cpus=0` before any worker joined) Ray Data would wait for
    them without end."""
    if node.cpus <= 0:
        raise CurationError(f"the Ray cluster has no CPU on any of its {node.count} node(s), and the build's load and render "
                            "tasks each need part of one: start a worker node (`ray start --address=HEAD:6379`) or give the "
                            "head CPUs (`ray start --head --num-cpus=N`); on an autoscaling cluster, build once a worker has joined")


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


class _TaskFailureLines(logging.Filter):
    """Ray Data's two console lines when a task of the build fails, each with advice on Ray Data's
    settings: the build says what failed in a line of its own (a `CurationError`) or with a
    traceback (a bug). Both stay in Ray Data's log file."""

    SAID = ("An exception was raised from a task of operator", "Exception occurred in user code")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.SAID)


def _quiet_ray_data_console() -> None:
    import ray.data  # noqa: F401  (configures the "ray.data" logger on import)

    for handler in logging.getLogger("ray.data").handlers:
        if not isinstance(handler, logging.FileHandler) and "File" not in type(handler).__name__:
            handler.setLevel(logging.WARNING)
            if not any(isinstance(f, _TaskFailureLines) for f in handler.filters):
                handler.addFilter(_TaskFailureLines())
    # "Progress bars disabled": ours replace them
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


@contextmanager
def ray_session(address: str | None) -> Iterator[str]:
    """Join the cluster at `address` (what `curation.ray_address.cluster_address` returned), or
    with None start a local Ray for this build and stop it afterwards; a session this process
    already has is used as it is. Yields a description of where the build runs."""
    import ray

    if ray.is_initialized():
        yield "the Ray session of this process"
        return
    _quiet_ray_logs()
    if address:
        join(address, logging_level=logging.WARNING)
        where = f"the Ray cluster at {address}"
    else:
        start_local_ray(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
        where = "a local Ray started for this build"
    try:
        yield where
    finally:
        if address:
            ray.shutdown()
        else:
            stop_local_ray()


def place_experts(spec: BuildSpec, plan: Plan, resources: dict[str, float], node: NodeLimits | None = None) -> dict[str, Placement]:
    """Where each expert runs (`resources`: the cluster's totals; `node`: its largest node, by
    default the whole cluster as one):

    - a runner without weights, and without `actors`/`gpus` in the manifest, runs inside the
      lane's load tasks: it has nothing to load once (no actor to start, no hop for the voxels);
    - a runner with weights gets a GPU share when the cluster has GPUs (shared fractionally when
      the pools outnumber the GPUs) and an actor pool of its own, as does any expert the
      manifest gives `actors` or `gpus`;
    - the other runners with weights run on CPUs, all of them in the build's *expert hosts*
      (`expert_hosts`): actors that each set up every CPU expert once and run whichever an
      item needs, several items at once on threads (torch releases the GIL while it
      computes). Per-expert pools gave the busiest expert one actor however many cores
      waited, and each pool, once per lane, imported torch and MONAI (about 7 CPU-s each)
      and loaded its model: on 2 CPUs the build lost to a one-item-at-a-time loop.

    Actors share CPUs fractionally when they would leave none for loading and rendering:
    every pool can start, so the build cannot stall waiting for resources."""
    gpus_total = float(resources.get("GPU", 0.0))
    cpus_total = float(resources.get("CPU", 1.0))
    memory_total = float(resources.get("memory", 0.0)) or math.inf
    node = node or NodeLimits(cpus=cpus_total, gpus=gpus_total, memory=memory_total)
    pools = {e.name: sum(e.name in lane.experts for lane in plan.lanes) for e in spec.experts}
    used = [e for e in spec.experts if pools[e.name]]
    auto_gpu = [e for e in used if e.gpus is None and gpus_total > 0 and plan.experts[e.name].weights]
    out: dict[str, Placement] = {}
    share_pools = sum(pools[e.name] for e in auto_gpu)
    for e in used:
        memory = None if e.memory_gb is None else e.memory_gb * (1 << 30)
        if e.actors is None and not e.gpus and e not in auto_gpu:
            hosted = plan.experts[e.name].weights
            out[e.name] = Placement(actors=0, gpus=0.0, cpus=1.0, batch_size=e.batch_size, pools=1 if hosted else pools[e.name],
                                    memory=memory if hosted else None, tasks=not hosted, hosted=hosted)
            continue
        if e in auto_gpu:
            per_pool = gpus_total / share_pools
            actors = e.actors or max(1, math.floor(per_pool))
            gpus = _share(per_pool / actors)
        else:
            actors, gpus = e.actors or 1, float(e.gpus or 0.0)
        out[e.name] = Placement(actors=actors, gpus=gpus, cpus=1.0, batch_size=e.batch_size, pools=pools[e.name], memory=memory)
    hosts, threads = expert_hosts(out, cpus_total, memory_total, node)
    for p in out.values():
        if p.hosted:
            p.actors, p.threads, p.cpus = hosts, threads, float(threads)
    _check_fits(spec, out, gpus_total, memory_total, node)
    # Actors take at most the CPUs that leave one task's worth per node: then, wherever Ray puts
    # them, some node has room for a load or render task (the free CPUs average at least that).
    wanted = actor_cpus(out)
    budget = cpus_total - node.count * task_cpus(cpus_total, node.count)
    if wanted > budget:
        for p in out.values():
            if not p.tasks:
                p.cpus = _share(p.cpus * budget / wanted, most=node.cpus)
    return out


def hosts_placement(placements: dict[str, Placement]) -> Placement | None:
    """The expert hosts' placement (every hosted expert carries the same: hosts, threads,
    CPUs), or None when no expert is hosted."""
    return next((p for p in placements.values() if p.hosted), None)


def host_memory(placements: dict[str, Placement]) -> float:
    """Bytes an expert host reserves: the sum of its experts' `memory_gb`."""
    return sum(p.memory or 0.0 for p in placements.values() if p.hosted)


HOST_THREADS = 8  # items an expert host runs at once at most: more CPUs get more hosts, not more threads


def expert_hosts(placements: dict[str, Placement], cpus_total: float, memory_total: float, node: NodeLimits) -> tuple[int, int]:
    """(hosts, threads each): a thread per CPU of a node, up to HOST_THREADS (the runners'
    Python parts — measuring, drawing — hold the GIL, so one process cannot use many cores),
    and hosts for the cluster's CPUs, as many as half the memory the other pools leave can
    hold (the other half stays for loading); at least one. (0, 0): no expert is hosted.

    >>> hosted = {"V": Placement(0, 0.0, 1.0, 1, memory=2**30, hosted=True), "B": Placement(0, 0.0, 1.0, 1, memory=2**30, hosted=True)}
    >>> two = NodeLimits(cpus=2, gpus=0, memory=2**34)
    >>> expert_hosts(hosted, 2, 2**34, two), expert_hosts(hosted, 4, 2**35, NodeLimits(cpus=2, gpus=0, memory=2**34, count=2))
    ((1, 2), (2, 2))
    >>> expert_hosts(hosted, 64, 2**38, NodeLimits(cpus=64, gpus=0, memory=2**38)), expert_hosts(hosted, 64, 2**33, NodeLimits(cpus=64, gpus=0, memory=2**33))
    ((8, 8), (2, 8))
    """
    if not any(p.hosted for p in placements.values()):
        return 0, 0
    threads = max(1, min(HOST_THREADS, math.floor(node.cpus)))
    hosts = max(1, math.floor(cpus_total / threads))
    each = host_memory(placements)
    if each and not math.isinf(memory_total):
        others = sum((p.memory or 0.0) * p.actors * p.pools for p in placements.values() if not p.hosted)
        hosts = max(1, min(hosts, math.floor((memory_total / 2 - others) / each)))
    return hosts, threads


def own_pools(placements: dict[str, Placement]) -> dict[str, Placement]:
    """The experts with actor pools of their own (`pools` of them, one per lane): neither in
    the expert hosts nor in the load tasks."""
    return {n: p for n, p in placements.items() if not p.hosted and not p.tasks}


def actor_cpus(placements: dict[str, Placement]) -> float:
    """CPUs the build's actors reserve: every pool's, and the expert hosts' once."""
    hosts = hosts_placement(placements)
    return (hosts.actors * hosts.cpus if hosts else 0.0) + sum(p.actors * p.pools * p.cpus for p in own_pools(placements).values())


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
    if host_memory(out) > node.memory:
        names = ", ".join(f"experts[{index[n]}] ({n}) {p.memory / 2**30:g}" for n, p in out.items() if p.hosted and p.memory)
        raise CurationError(f"an expert host runs every CPU expert and reserves their memory_gb together ({names}: "
                            f"{host_memory(out) / 2**30:g} GiB), but no node offers more than {node.memory / 2**30:.1f} GiB; "
                            "lower `memory_gb`, or give an expert `actors` for a pool of its own")
    reserved = sum((p.memory or 0.0) * p.actors * p.pools for p in out.values())
    if reserved > memory_total:
        raise CurationError(f"the expert pools reserve {reserved / 2**30:.1f} GiB and the cluster offers {memory_total / 2**30:.1f} GiB; "
                            "lower `actors` or `memory_gb`")


def _share(fraction: float, most: float = 1.0) -> float:
    """A resource share Ray accepts: at most `most`, rounded down to 1/100, never 0."""
    return max(0.01, math.floor(min(most, fraction) * 100) / 100)


@dataclass(slots=True)
class LaneInput:
    """A lane's working items as input blocks: row group k of `path` is block k (`WORK_SCHEMA`)."""

    path: Path
    blocks: int = 0
    largest: int = 0  # voxel bytes of the largest item a load task may hold (items over the limit are set aside)
    runs: int = 0  # expert runs its items need (at most: some may be cached)
    items: int = 0  # its working items
    block_bytes: int = 0  # voxel bytes of its largest block


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
        block, size = pending.pop(lane)
        writers[lane].write_table(work_table(block), row_group_size=len(block))
        inputs[lane].blocks += 1
        inputs[lane].block_bytes = max(inputs[lane].block_bytes, size)

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
        inputs[p.lane].items += 1
        inputs[p.lane].runs += sum(len(args) for args in p.needs(plan.spec).values())
        if voxels <= limit:
            inputs[p.lane].largest = max(inputs[p.lane].largest, voxels)
    for lane in list(pending):
        flush(lane)
    for w in writers.values():
        w.close()
    return inputs


# A load worker's own memory, with the 25 % headroom over its measured peak that Ray Data's
# memory check asks of a reservation (it warns at the end of a build otherwise, "Found 1
# issues", recommending a `memory=` the user cannot set): measured 404 MiB RSS on a CT item of
# 8 MB, USS up to 330 MiB on demo-24, and 420 MiB on the large demo archive, in the CT lane's
# load tasks that also run its weight-free experts (512 MiB was under 1.25 × that).
WORKER_BASE_MEMORY = 640 << 20
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


# The share of the cluster's object store the build's blocks may fill (Ray Data's default: half),
# raised where the plan's blocks need more (`store_fraction`). Loading outruns the experts, so
# the load operators' finished blocks (voxels) queue for them until this budget stops new loads:
# at half, a 736-item CPU build on the 2-CPU machine held 730 MiB of queued voxels at its peak and
# the build's peak grew with the archive; at 0.1, 470 MiB. At 0.05 the large build's peak fell by
# another 200-300 MiB, but demo-24 builds took 42.0 s instead of 37.9 (medians of five alternated
# pairs, slower in every pair): loading stalled the expert host. Ray Data keeps the pipeline live
# below one block's size (a demo build with a 4 MB budget writes the same shards).
STORE_FRACTION = 0.1
BLOCKS_PER_SLOT = 2  # input blocks the budget holds for each expert slot at least: one running, one ready


def store_fraction(inputs: dict[int, LaneInput], placements: dict[str, Placement], store_bytes: float) -> float:
    """The share of the object store (`store_bytes`) the build's blocks may fill: STORE_FRACTION,
    raised where that would not hold BLOCKS_PER_SLOT of the largest input block for every
    expert slot (a pool's actor, a host's thread), so no expert waits on a load the budget held
    back: a full-size CT is a block of 300+ MB; at most Ray Data's default, half.

    >>> hosts = {"V": Placement(1, 0.0, 2.0, 1, hosted=True, threads=2)}
    >>> small, large = {0: LaneInput(Path("l"), block_bytes=64 << 20)}, {0: LaneInput(Path("l"), block_bytes=315 << 20)}
    >>> store_fraction(small, hosts, 7.5e9), round(store_fraction(large, hosts, 4e9), 2), store_fraction(large, hosts, 1e9)
    (0.1, 0.33, 0.5)
    """
    hosts = hosts_placement(placements)
    slots = (hosts.actors * hosts.threads if hosts else 0) + sum(p.actors * p.pools for p in own_pools(placements).values())
    largest = max((i.block_bytes for i in inputs.values()), default=0)
    return min(0.5, max(STORE_FRACTION, BLOCKS_PER_SLOT * max(1, slots) * largest / max(store_bytes, 1.0)))


def pipeline_dataset(inputs: dict[int, LaneInput], plan: Plan, ctx: BuildContext, placements: dict[str, Placement], *,
                     store: float, cpus: float = 1.0) -> Any:
    """The whole build as one Ray Data dataset: one branch per lane up to its own experts; the
    lanes with CPU experts unioned into the expert hosts; then every lane unioned into
    rendering. One render operator, not one per lane: Ray Data reserves each operator at least
    one task's CPUs, and on a node with few CPUs per-lane render operators leave too few for
    the lanes to stream at once. `inputs`: each lane's blocks (`write_lane_inputs`); `cpus`:
    what each load and render task reserves (`task_cpus`); `store`: the cluster's object store
    in bytes (`store_fraction`)."""
    import ray.data

    from curation.build.stages import load_planned, render_batch

    _quiet_ray_data_console()
    # Ray Data's usage collection: a thread that asks Prometheus for the cluster's metrics every
    # 10 s, and an actor made at the end of each execution, even a failed one (where the head is
    # lost, that waits for the head until Ray ends the driver). A user may set it to 0.
    os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False  # ours is in curation.build.progress
    data_ctx.override_object_store_memory_limit_fraction = store_fraction(inputs, placements, store)
    hosted = tuple(name for name, p in placements.items() if p.hosted)
    to_hosts, past_hosts = [], []
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
        to_host = any(name in hosted for name in lane.experts)
        for expert, last in _lane_experts(lane.experts, placements, voxels_after=to_host):
            ds = _expert_stage(ds, ctx, expert, last, placements[expert], load_args)
        (to_hosts if to_host else past_hosts).append(ds)
    if to_hosts:
        past_hosts.insert(0, _hosts_stage(_union(to_hosts), ctx, {n: placements[n] for n in hosted}))
    return _union(past_hosts).map_batches(render_batch, fn_kwargs={"ctx": ctx}, batch_size=None, batch_format="pyarrow", num_cpus=cpus)


def _union(branches: list[Any]) -> Any:
    return branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]


def _lane_experts(experts: tuple[str, ...], placements: dict[str, Placement], *, voxels_after: bool) -> list[tuple[str, bool]]:
    """The lane's own expert stages as (expert, is the last to need the voxels), in running
    order: those in load tasks first, then the pools; hosted experts are not the lane's
    (`voxels_after`: the lane goes on to the expert hosts, which need the voxels)."""
    ordered = sorted((name for name in experts if not placements[name].hosted), key=lambda name: not placements[name].tasks)
    return [(name, k == len(ordered) - 1 and not voxels_after) for k, name in enumerate(ordered)]


def _expert_stage(ds: Any, ctx: BuildContext, expert: str, last: bool, p: Placement, load_args: dict[str, Any]) -> Any:
    import ray.data

    from curation.build.stages import ExpertStage, expert_batch

    if p.tasks:
        return ds.map_batches(expert_batch, fn_kwargs={"ctx": ctx, "expert": expert, "last": last}, batch_size=None,
                              batch_format="pyarrow", **load_args)
    return ds.map_batches(
        ExpertStage,
        fn_constructor_kwargs={"ctx": ctx, "experts": (expert,), "gpus": p.gpus, "last": last},
        batch_size=p.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=p.actors), num_cpus=p.cpus, num_gpus=p.gpus or None,
        **({"memory": p.memory} if p.memory else {}),
    )


def _hosts_stage(ds: Any, ctx: BuildContext, hosted: dict[str, Placement]) -> Any:
    """The expert hosts (`place_experts`): each actor sets up every hosted expert and runs the
    ones an item lacks on `threads` items at once, then drops their voxels. Ray Data creates every
    actor pool's actors with its default strategy, SPREAD (`DataContext.scheduling_strategy`):
    the hosts go to different nodes where their reservations fit, best effort."""
    import ray.data

    from curation.build.stages import ExpertStage

    first = hosts_placement(hosted)
    assert first is not None
    memory = host_memory(hosted)
    return ds.map_batches(
        ExpertStage,
        fn_constructor_kwargs={"ctx": ctx, "experts": tuple(hosted), "gpus": 0.0, "last": True, "threads": first.threads},
        batch_size=min(p.batch_size for p in hosted.values()), batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=first.actors, max_concurrent_calls_per_actor=first.threads,
                                           enable_true_multi_threading=True),
        num_cpus=first.cpus,
        **({"memory": memory} if memory else {}),
    )
