"""Defaults for the machine a run is on: how many torch threads a CPU process uses.

torch's own default is the machine's physical cores, whatever the process may use: in a
container limited to a few CPUs it oversubscribes, and on a busy machine its threads wait for
cores other work holds, which stalls every operation.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def available_cpus() -> int:
    """CPUs this process may run on: its affinity, capped by a cgroup CPU quota (a container's
    `--cpus`), which `os.cpu_count()` and torch's default both ignore."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    return n


def idle_cpus() -> int:
    """CPUs this process may use that other work is not keeping busy (the one-minute load
    average), at least 1. Threads that wait for a busy core stall every operation: on this
    2-core machine under a load of 4, two threads ran the tiny model at 6–46 rows/s, one
    thread at 30–33."""
    available = available_cpus()
    with contextlib.suppress(OSError, AttributeError):
        return max(1, min(available, round((os.cpu_count() or available) - os.getloadavg()[0])))
    return available


def cpu_threads(requested: int | None) -> int:
    """torch threads for a training process on CPU: `--cpu-threads`, else `OMP_NUM_THREADS`
    (Ray sets it to a worker's CPUs), else the idle CPUs this process may use."""
    if requested:
        return requested
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else idle_cpus()
