"""`m3-curate finetune --workers N [--use-gpu]`: the training loop of `train.py` on Ray Train.

Each worker runs `train()` with its rank and world size: the model is wrapped for distributed
data parallelism by `ray.train.torch.prepare_model` (NCCL on GPUs, Gloo on CPUs), each worker
streams its own share of the shards' row groups, and rank 0 writes checkpoints and the final
model to `--out`. On several machines `--out` must be storage every node sees (NFS, a mounted
bucket), since any worker may be placed anywhere and resume reads the newest checkpoint there;
Ray Train's own run folder goes to `OUT/ray` for the same reason.

With no `--address` and no `RAY_ADDRESS`, a local Ray is started for the run; inside
`ray job submit` the job's cluster is used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from curation.errors import CurationError, user_error
from curation.finetune.train import TrainConfig

log = logging.getLogger(__name__)


def _worker_loop(loop_config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from curation.finetune.train import train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    ctx = ray.train.get_context()
    config = TrainConfig(**loop_config["config"])

    def wrap(model):
        # batches without images leave the vision tower unused on that step
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})

    train(
        config,
        rank=ctx.get_world_rank(),
        world_size=ctx.get_world_size(),
        device=ray.train.torch.get_device(),
        wrap=wrap,
        report=lambda metrics: ray.train.report(metrics),
    )


def check_room(workers: int, use_gpu: bool, resources: dict[str, float]) -> None:
    """Refuse more workers than the cluster can place: Ray Train would wait for them without
    end (it gives up starting the group after a minute, and starts again)."""
    kind = "GPU" if use_gpu else "CPU"  # what ScalingConfig reserves per worker: 1 GPU, or 1 CPU
    have = resources.get(kind, 0.0)
    if have >= workers:
        return
    if have >= 1:
        fix = f"give --workers {int(have)} or fewer, or add nodes"
    else:
        fix = "drop --use-gpu, or join a cluster with GPUs (--address)" if use_gpu else "add nodes with CPUs"
    flags = f"--workers {workers}" + (" --use-gpu" if use_gpu else "")
    raise CurationError(f"{flags}: each Ray Train worker takes one {kind} and the Ray cluster has {have:g}: {fix}")


def _lost_workers(error: Exception) -> list[str]:
    """What took each failed Ray Train worker away, where it was its process or node (killed,
    out of memory, a node lost) or it stopped answering; empty when no worker was lost, only
    failed in the training code itself. Ray Train reports both as `WorkerGroupError`, its
    failures by rank. Where one of several workers is lost, the others fail in their next
    collective (Gloo's "Connection closed by peer", NCCL's abort): that is the loss, not a
    second fault, so they are named as stopped with it."""
    from ray.exceptions import RayActorError

    lost, with_it = [], []
    for rank, failure in sorted(getattr(error, "worker_failures", {}).items()):
        cause = getattr(failure, "health_check_failure", None)  # Ray Train's WorkerHealthCheckFailedError
        if isinstance(cause, RayActorError):
            said = [line.strip() for line in str(cause).splitlines() if line.strip().startswith(("The actor is dead", "The actor died because"))]
            why = said[0].split(" Some common causes")[0].rstrip(".") if said else "its process died"  # Ray's advice on OOM follows
            lost.append(f"Ray Train's worker {rank} was lost (killed, out of memory, a crash, or its node gone): {why}")
        elif type(failure).__name__ == "WorkerHealthCheckTimeoutError":
            lost.append(f"Ray Train's worker {rank} stopped answering its health checks")
        else:
            with_it.append(str(rank))
    if lost and with_it:
        lost.append(f"worker{'s' * (len(with_it) > 1)} {', '.join(with_it)} stopped with it (a training step needs every worker)")
    return lost


def _trainer(**kwargs: Any) -> Any:
    """A `TorchTrainer` that leaves Ctrl-C to the command (`curation.signals`): the one `fit`
    makes puts a SIGINT handler of its own in place for the rest of the process, which aborts
    the run and ends the command with status 1 after Ray's log line, not the command's one line
    and 130. Without it the interrupt leaves `fit` as a `KeyboardInterrupt`; the local Ray, or
    the driver's connection to the cluster, ends with the command and takes the run's actors."""
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller: Any) -> None:
            pass

    return Trainer(**kwargs)


def _resume_hint(out: Path) -> str:
    from curation.finetune.train import checkpoints

    done = checkpoints(out)
    if not done:
        return "No checkpoint was written yet: run the same command again"
    return f"The newest checkpoint is {done[-1]}: the same command with --resume goes on from it"


def train_on_ray(config: TrainConfig, *, workers: int, use_gpu: bool = False, address: str | None = None) -> dict[str, Any]:
    """Run `train(config)` on `workers` Ray Train workers (one GPU each with `use_gpu`) and
    return the summary rank 0 wrote."""
    import ray
    from ray.train import RunConfig, ScalingConfig

    from curation.local_ray import start_local_ray, stop_local_ray
    from curation.ray_address import cluster_address, join

    if workers < 1:
        raise CurationError(f"--workers {workers}: must be at least 1")
    started = False
    if not ray.is_initialized():
        address = cluster_address(address)
        join(address) if address else start_local_ray()  # with the dashboard: Ray Train's cleanup queries the state API
        started = not address
    try:
        check_room(workers, use_gpu, ray.cluster_resources())
        out = Path(config.out).resolve()
        config.out, config.data = str(out), str(Path(config.data).resolve())
        if Path(config.model).exists():
            config.model = str(Path(config.model).resolve())
        trainer = _trainer(
            train_loop_per_worker=_worker_loop,
            train_loop_config={"config": asdict(config)},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
            run_config=RunConfig(name="finetune", storage_path=str(out / "ray")),
        )
        try:
            trainer.fit()
        except ray.train.WorkerGroupError as e:
            lost = _lost_workers(e)
            if lost:
                raise CurationError(f"--workers {workers}: {'; '.join(lost)}. {_resume_hint(out)}") from None
            said = user_error(e)  # a worker's CurationError (a damaged shard), or None: a bug keeps its traceback
            if said is None:
                raise
            raise said from None
    finally:
        if started:
            stop_local_ray()
    summary_path = out / "train_summary.json"
    if not summary_path.exists():
        raise CurationError(f"Ray Train finished without {summary_path}; see the workers' logs above")
    return json.loads(summary_path.read_text())
