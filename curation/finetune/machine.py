"""Defaults for the machine a run is on: how many torch threads a CPU process uses.

torch's own default is the machine's physical cores, whatever the process may use: in a
container limited to a few CPUs it oversubscribes, and on a busy machine its threads wait for
cores other work holds, which stalls every operation.
"""

from __future__ import annotations

import contextlib
import os

from curation.cpus import available_cpus


def idle_cpus() -> int:
    """CPUs this process may use that other work is not keeping busy (the one-minute load
    average), at least 1: threads that wait for a busy core stall every operation."""
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
