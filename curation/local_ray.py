"""A Ray this process started for itself (the build's embedded Ray, the fine-tune's), and how
it ends. Apart from `curation.build.cluster` because the fine-tune uses it too and must not
depend on the build."""

from __future__ import annotations

from typing import Any


def start_local_ray(**init: Any) -> None:
    """`ray.init(**init)` for a Ray of this process's own, with SIGTERM handled as Ctrl-C
    again afterwards: `ray.init` puts its own handler in (`curation.signals`)."""
    import ray

    from curation.signals import stop_on_sigterm

    ray.init(**init)
    stop_on_sigterm()


def stop_local_ray() -> None:
    """`ray.shutdown()` of a Ray this process started, without its one-second wait for the
    autoscaler monitor. Shutdown stops Ray's GCS before the monitor; the monitor's SIGTERM
    handler then tries to report its own end to that GCS until shutdown gives up after a second
    and kills it (1.0-1.7 s of a demo build's last 2 s, measured). A local session has no
    autoscaler to stop gracefully, so the monitor is killed first. Ray keeps the handle in a
    private attribute: without it, this is plain `ray.shutdown()`."""
    import ray
    from ray._private import ray_constants, worker

    node = getattr(worker, "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    for info in processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):
        info.process.kill()
    ray.shutdown()
