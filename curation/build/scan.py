"""The build's index scan on Ray: the partitioned scan of `curation.ingest.scan`, its tasks run as
Ray tasks across the cluster.

The ingest layer knows nothing of Ray: it exposes pure tasks (`read_batch`: files → records,
`group_buckets`: records of whole buckets → items and ledger rows) and a `Runner` protocol. This
module fills the protocol with Ray tasks (one CPU each, at most two per cluster CPU in flight, so
the driver's memory stays flat however many files there are). The spill folder is under the
build's `internal/` folder, which every node mounts at the same path (see README, "On a
cluster"). Without a running Ray session the scan uses this machine's cores instead; both give
the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from curation.ingest.index import read_index, scan_to_files
from curation.ingest.runners import LocalRunner, Runner
from curation.ingest.scan import ScanSummary
from curation.items import LedgerEntry, StudyItem
from curation.manifest import BuildSpec
from curation.store.layout import Layout

R = TypeVar("R")


class RayRunner:
    """`Runner` over Ray tasks: each call a task of one CPU; results as they finish."""

    def __init__(self, in_flight: int | None = None):
        import ray

        self.workers = max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.in_flight = in_flight or 2 * self.workers
        self._remote: dict[Callable[..., Any], Any] = {}

    def map(self, fn: Callable[..., R], args: Iterable[tuple[Any, ...]]) -> Iterator[R]:
        import ray

        remote = self._remote.get(fn)
        if remote is None:
            remote = self._remote[fn] = ray.remote(num_cpus=1, max_retries=2)(fn)
        pending: list[Any] = []
        for a in args:
            pending.append(remote.remote(*a))
            if len(pending) >= self.in_flight:
                done, pending = ray.wait(pending, num_returns=1)
                yield from ray.get(done)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield from ray.get(done)

    def close(self) -> None:
        pass


def runner_here() -> Runner:
    """Ray tasks when this process has a Ray session, else this machine's cores."""
    import ray

    return RayRunner() if ray.is_initialized() else LocalRunner()


def scan_index(spec: BuildSpec, layout: Layout, runner: Runner | None = None) -> tuple[list[StudyItem], list[LedgerEntry], ScanSummary]:
    """Scan the manifest's sources into `layout.index`; return the items and the scan's ledger
    (the build turns it into the final ledger once the items have run)."""
    layout.mark_internal()
    runner = runner or runner_here()
    ledger_path = layout.internal / ".index-ledger.parquet"
    try:
        summary = scan_to_files(spec, layout.index, ledger_path, runner, spill=layout.internal)
        items, ledger = read_index(layout.index, ledger_path)
    finally:
        Path(ledger_path).unlink(missing_ok=True)
        getattr(runner, "close", lambda: None)()
    return items, ledger, summary
