"""SIGTERM ends a command the way Ctrl-C does.

A scheduler stops a job with SIGTERM: `kill PID`, Kubernetes, `docker stop`, `ray job stop`,
Slurm's `scancel` (to every process of the job). Python's default for it ends the process on
the spot: no `finally`, no exit handler. With Ray joined it was worse: `ray.init` installs a
handler of its own, so a build printed Ray's crash report (`*** SIGTERM received … PC: @ …`)
and ended with status 15, or with SIGABRT when the signal reached Ray's workers too.

Here SIGTERM raises `Terminated`, a `KeyboardInterrupt`, in the main thread: every `with` and
`finally` on the way out runs as for Ctrl-C (the build's staged files removed, a local Ray
stopped), and the command line prints one line and exits with 143 (128 + SIGTERM, `EXIT_CODE`). Ray puts its
handler back each time it starts or joins, so the two ways in, `curation.local_ray.start_local_ray`
and `curation.ray_address.join`, call `stop_on_sigterm` after `ray.init`.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

EXIT_CODE = 128 + signal.SIGTERM
_received = threading.Event()


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: the command stops as on Ctrl-C."""


def _terminated(signum: int, frame: FrameType | None) -> None:
    _received.set()
    raise Terminated()


def terminated() -> bool:
    """Whether SIGTERM arrived: the `KeyboardInterrupt` that reaches the command line may be
    another one than `Terminated` (Ray Train's `fit` raises its own)."""
    return _received.is_set()


def stop_on_sigterm() -> None:
    """Make SIGTERM raise `Terminated` in the main thread (only the main thread may set a
    handler: called from another, as by a test's thread, it leaves the handler as it is)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)
