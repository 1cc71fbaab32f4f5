"""Where the scan's tasks run: the `Runner` protocol, and `LocalRunner` (this machine's cores).

`curation.build.scan.RayRunner` fills the same protocol with Ray tasks; the scan itself does not
know which it was given.
"""

from __future__ import annotations

import multiprocessing
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing.context import BaseContext
from typing import Any, Protocol, TypeVar

from curation.cpus import available_cpus
from curation.signals import held_while_workers_start, leave_signals_to_the_command

R = TypeVar("R")


class Runner(Protocol):
    """Runs `fn(*args)` for each argument tuple, a bounded number at a time, and yields the
    results as they finish (in any order). `args` is consumed lazily."""

    def map(self, fn: Callable[..., R], args: Iterable[tuple[Any, ...]]) -> Iterator[R]: ...


class LocalRunner:
    """Tasks on this machine's cores: in this process for one worker (or one task), else in a
    process pool (forked when this process has no other threads, else from a fork server), with
    at most twice as many tasks in flight as workers. As with any use of multiprocessing, a
    script that scans from a thread must guard its main code with `if __name__ == "__main__"`
    (the fork server's workers import the main module); `m3-curate` and `python -m curation` do."""

    def __init__(self, workers: int | None = None):
        self.workers = max(1, workers if workers is not None else available_cpus())
        self._pool: ProcessPoolExecutor | None = None
        self._context: BaseContext = multiprocessing.get_context("fork")

    def map(self, fn: Callable[..., R], args: Iterable[tuple[Any, ...]]) -> Iterator[R]:
        it = iter(args)
        first = next(it, None)
        second = next(it, None) if first is not None else None
        if first is None:
            return
        if self.workers == 1 or second is None:  # one task: a pool would only add its start-up
            yield fn(*first)
            if second is not None:
                yield fn(*second)
                for a in it:
                    yield fn(*a)
            return
        pool = self._pool or self._start()
        with held_while_workers_start(self._context):
            pending: set[Future[R]] = {pool.submit(fn, *first), pool.submit(fn, *second)}
        for a in it:
            with held_while_workers_start(self._context):
                pending.add(pool.submit(fn, *a))
            if len(pending) >= 2 * self.workers:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                yield from (f.result() for f in finished)
        while pending:
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            yield from (f.result() for f in finished)

    def _start(self) -> ProcessPoolExecutor:
        """Forked workers start at once with every module this process has imported; a process
        with other threads (a build starting Ray beside the scan) must not fork, so its workers
        come from a fork server that imported the readers once."""
        if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("fork")
        else:
            context = multiprocessing.get_context("forkserver")
            context.set_forkserver_preload(["curation.ingest.scan"])
        self._context = context
        self._pool = ProcessPoolExecutor(self.workers, mp_context=context, initializer=leave_signals_to_the_command)
        return self._pool

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None
