"""How many CPUs this process may use: the one count every pool of processes or threads sizes
itself by.

`os.cpu_count()` is the host's, and even the affinity mask ignores a container's CPU quota
(`docker run --cpus 2` on a 64-core host): a pool sized by either would start far more workers
than the process can run at once.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" in µs, or "max <period>"


def available_cpus(cpu_max: Path = CPU_MAX) -> int:
    """CPUs this process may run on: its affinity, capped by the cgroup's CPU quota.

    >>> available_cpus() >= 1
    True
    """
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = cpu_max.read_text().split()
        if quota != "max":
            n = min(n, max(1, int(quota) // int(period)))
    return n
