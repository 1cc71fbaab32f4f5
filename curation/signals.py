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

Worker processes that a command starts (the scan's pool, `demo-archive`'s draw, the demo
bundles' training) leave both signals to the command: they start with both blocked
(`held_while_workers_start`) and ignore Ctrl-C from their initializer on
(`leave_signals_to_the_command`); the command ends them as it ends (`command_pool`).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # multiprocessing is imported where workers start: every command imports this module
    from multiprocessing.context import BaseContext
    from multiprocessing.pool import Pool

EXIT_CODE = 128 + signal.SIGTERM
_COMMAND_SIGNALS = {signal.SIGINT, signal.SIGTERM}
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


def report_stop(prog: str) -> int:
    """For a command's `except KeyboardInterrupt`: print its one line and return its status
    (130 for Ctrl-C, `EXIT_CODE` for SIGTERM)."""
    if terminated():
        print(f"{prog}: terminated (SIGTERM)", file=sys.stderr)
        return EXIT_CODE
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130


def stop_on_sigterm() -> None:
    """Make SIGTERM raise `Terminated` in the main thread (only the main thread may set a
    handler: called from another, as by a test's thread, it leaves the handler as it is)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminated)


def leave_signals_to_the_command() -> None:
    """A worker process's initializer: Ctrl-C and SIGTERM are the command's to handle. The
    terminal sends SIGINT to every process of the group, and a worker (with the command's
    handlers) printed a `KeyboardInterrupt` traceback of its own beside the command's one line.
    The command ends its workers as it ends; a SIGTERM sent to every process ends a worker
    quietly. The worker started with both blocked (`held_while_workers_start`), so one sent
    before this ran is discarded, or ends it quietly, here."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _COMMAND_SIGNALS)


@contextmanager
def held_while_workers_start(context: BaseContext) -> Iterator[None]:
    """Blocks SIGINT and SIGTERM in this thread while worker processes of `context` may start. A
    worker inherits the block (forked or spawned from here, or forked from a fork server that
    started here), so a Ctrl-C that reaches it before its initializer waits for the initializer
    instead of raising `KeyboardInterrupt` in multiprocessing's start-up code, which printed a
    traceback. This process gets the signal as the block lifts. multiprocessing's resource
    tracker, which spawned and fork-server workers need, lifts both signals' block as it starts
    (it blocks them only for its own start), so it is started first."""
    if context.get_start_method() != "fork":
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()
    held = signal.pthread_sigmask(signal.SIG_BLOCK, _COMMAND_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def command_pool(context: BaseContext, processes: int) -> Pool:
    """A `multiprocessing` Pool whose workers leave Ctrl-C and SIGTERM to the command. Use it in
    a `with` block: leaving it terminates the workers, so a stopped command does not wait for
    their tasks (a `ProcessPoolExecutor` waits for those that run)."""
    with held_while_workers_start(context):
        return context.Pool(processes, initializer=leave_signals_to_the_command)
