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
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from curation.errors import CurationError
from curation.manifest import BuildSpec
from curation.build.plan import ItemPlan, Plan
from curation.build.stages import BuildContext

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


def place_experts(spec: BuildSpec, plan: Plan, resources: dict[str, float]) -> dict[str, Placement]:
    """Actor pools: `actors` from the manifest, else one per GPU share (GPU clusters) or one;
    a GPU each for runners with weights when the cluster has GPUs, shared fractionally when
    the pools outnumber the GPUs, and CPUs shared fractionally when the actors would leave
    none for loading and rendering: every pool can start, so the build cannot stall waiting
    for resources. A runner without weights and without `actors`/`gpus` in the manifest gets
    no pool: it has nothing to load once, so it runs inside the lane's load tasks (no actor
    process to start, no extra hop for the voxels)."""
    gpus_total = float(resources.get("GPU", 0.0))
    cpus_total = float(resources.get("CPU", 1.0))
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
    need_gpus = sum(p.actors * p.gpus * p.pools for p in out.values())
    if need_gpus > gpus_total + 1e-9:
        names = [f"experts[{i}] ({e.name}): {out[e.name].actors} actors × {out[e.name].gpus} GPUs"
                 for i, e in enumerate(spec.experts) if e.name in out and out[e.name].gpus]
        raise CurationError(f"the expert pools need {need_gpus:g} GPUs and the cluster has {gpus_total:g}: {'; '.join(names)}; "
                            "lower `actors` or `gpus` (a fraction shares a GPU)")
    actors = sum(p.actors * p.pools for p in out.values())
    budget = max(cpus_total - 1.0, cpus_total / 2)  # at least one CPU (or half) left for load and render tasks
    if actors > budget:
        for p in out.values():
            p.cpus = _share(budget / actors)
    return out


def _share(fraction: float) -> float:
    """A resource share Ray accepts: at most 1, rounded down to 1/100, never 0."""
    return max(0.01, math.floor(min(1.0, fraction) * 100) / 100)


def _blocks(plans: list[ItemPlan]) -> list[pa.Table]:
    """Consecutive items grouped into input blocks of at most BLOCK_ITEMS items and
    BLOCK_BYTES of voxels (a CT series is a block of its own; chest X-rays travel by 16)."""
    blocks, current, size = [], [], 0
    for p in plans:
        voxels = math.prod(p.item.shape) * max(1, len(p.item.channels)) * 4
        if current and (len(current) >= BLOCK_ITEMS or size + voxels > BLOCK_BYTES):
            blocks.append(current)
            current, size = [], 0
        current.append(p)
        size += voxels
    if current:
        blocks.append(current)
    return [pa.table({"item_id": [p.item.item_id for p in b], "plan": [p.to_json() for p in b]}) for b in blocks]


WORKER_BASE_MEMORY = 384 << 20  # a load worker with numpy, pyarrow, pydicom, nibabel, torch, MONAI loaded (measured: 404 MiB peak on a CT item of 8 MB)


def load_memory(plans: list[ItemPlan]) -> float:
    """Bytes a load task reserves: the worker itself plus three copies of the lane's largest
    item (file bytes, decoded voxels, the pickled row)."""
    largest = max(math.prod(p.item.shape) * max(1, len(p.item.channels)) * 4 for p in plans)
    return float(WORKER_BASE_MEMORY + 3 * largest)


def pipeline_dataset(plan: Plan, ctx: BuildContext, placements: dict[str, Placement]) -> Any:
    """The whole build as one Ray Data dataset: one branch per lane up to its last expert,
    unioned, then rendering. One render operator, not one per lane: Ray Data reserves each
    operator at least one task's CPUs, and on a node with few CPUs the per-lane render
    operators left too few for the lanes to stream at once, so experts idled
    (bench/pipeline.py, 2 CPUs, experts that sleep 0.3 s a run: 61 s → 45 s)."""
    import ray.data

    from curation.build.stages import ExpertStage, expert_batch, load_batch, render_batch

    _quiet_ray_data_console()
    data_ctx = ray.data.DataContext.get_current()
    data_ctx.enable_progress_bars = False  # ours is in curation.build.progress
    branches = []
    for lane_index, lane in enumerate(plan.lanes):
        plans = [p for p in plan.working if p.lane == lane_index]
        if not plans:
            continue
        # from_blocks, not from_arrow: from_arrow runs a Ray task per block for its metadata and
        # waits for them all before anything streams (one per CT series on a large archive)
        ds = ray.data.from_blocks(_blocks(plans))
        # `memory` also keeps Ray Data from fusing loading into the expert actors (different
        # resources): loading must overlap the experts' work, not run inside their actors.
        # Experts that run in load tasks come first, with the same resources: Ray Data fuses
        # them into the load task.
        load_args = {"num_cpus": 1, "memory": load_memory(plans)}
        ds = ds.map_batches(load_batch, fn_kwargs={"ctx": ctx}, batch_size=None, batch_format="pyarrow", **load_args)
        experts = sorted(lane.experts, key=lambda name: not placements[name].tasks)
        for k, expert in enumerate(experts):
            p, last = placements[expert], k == len(experts) - 1
            if p.tasks:
                ds = ds.map_batches(expert_batch, fn_kwargs={"ctx": ctx, "expert": expert, "last": last}, batch_size=None,
                                    batch_format="pyarrow", **load_args)
                continue
            ds = ds.map_batches(
                ExpertStage,
                fn_constructor_kwargs={"ctx": ctx, "expert": expert, "gpus": p.gpus, "last": last},
                batch_size=p.batch_size, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=p.actors), num_cpus=p.cpus, num_gpus=p.gpus or None,
                **({"memory": p.memory} if p.memory else {}),
            )
        branches.append(ds)
    ds = branches[0].union(*branches[1:]) if len(branches) > 1 else branches[0]
    return ds.map_batches(render_batch, fn_kwargs={"ctx": ctx}, batch_size=None, batch_format="pyarrow", num_cpus=1)
