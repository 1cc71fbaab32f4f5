"""Live progress on the terminal and the closing summary.

On a terminal one line is redrawn in place a few times a second; elsewhere (a `ray job`
log, CI) a plain line is printed every `every` seconds, so logs stay readable. The line is
drawn on that clock whether or not an item has arrived: on a node whose CPUs the expert hosts
hold, Ray Data renders items only once loading ends (bench/README.md, "Where rendering
runs"), and a large build would otherwise print nothing for most of its run.

For the same reason the line also counts the items past their experts, which on CPUs run ahead
of the rendered ones by most of the build. The driver learns of an item only from its rows, so
the workers tell it through files: each process that runs a lane's last expert stage rewrites
one small file of its own (`PassedCount`, at most once a second) in the build's progress folder,
beside the plan's input blocks that every node reads already, and the driver sums them
(`through_experts`).

The estimate weighs what is left by what each lane's items cost. A mixed archive's lanes pass
their experts at very different paces (a chest X-ray in hundredths of a second, a CT series
through three segmentations in seconds), so a count of items alone swings either way for most
of a build. Each count therefore carries its lane's expert seconds: a lane's items left cost
what its passed ones cost on average, and they go at the expert seconds done per second since
the first count came (before it, the actors were starting). While a lane with items left has
passed none, nothing tells yet what its items cost: the estimate leaves them out and says so,
`eta >0:22`, at least that long. On CPUs the lanes' loads take turns, so on the large demo
archive the brain lane's first item came at 60 % of the build.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, ClassVar

from curation.atomic import write_json
from curation.errors import CurationError
from curation.store.layout import Layout

log = logging.getLogger(__name__)

READ_EVERY = 1.0  # seconds between two readings of the workers' counts (a shared folder is listed)
WRITE_EVERY = 1.0  # seconds between two writes of one worker's count


def clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass(frozen=True, slots=True)
class LaneCount:
    """A lane's items through their experts, and the expert seconds they took."""

    items: int
    seconds: float = 0.0

    def __add__(self, other: LaneCount) -> LaneCount:
        return LaneCount(self.items + other.items, self.seconds + other.seconds)


class BuildProgress:
    """`update()` after each item; `close()` at the end (or leave its `with` block). With
    `every` above 0 a thread redraws the line on that clock between items."""

    def __init__(self, total: int, *, label: str = "build", stream: IO[str] | None = None, every: float | None = None, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stderr
        self.live = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = every if every is not None else (0.25 if self.live else 10.0)
        self.started = time.perf_counter()
        self.done = self.rows = self.runs = self.set_aside = 0
        self._last = 0.0
        self._experts: tuple[dict[int, int], Callable[[], Mapping[int, LaneCount]]] | None = None
        self._first: tuple[float, float] | None = None  # when expert seconds were first counted, and how many
        self._passed: dict[int, LaneCount] = {}
        self._read_at = -READ_EVERY
        self._lock = threading.Lock()
        self._closed = threading.Event()
        if self.enabled and self.every > 0:
            threading.Thread(target=self._beat, name="build-progress", daemon=True).start()

    def __enter__(self) -> BuildProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, *, rows: int = 0, runs: int = 0, set_aside: int = 0) -> None:
        with self._lock:
            self.done += 1
            self.rows += rows
            self.runs += runs
            self.set_aside += set_aside
            self._draw_when_due(last_item=self.done == self.total)

    def watch(self, lanes: Mapping[int, int], passed: Callable[[], Mapping[int, LaneCount]]) -> None:
        """Show the items through their experts too: `passed()` of the lanes' items (`lanes`:
        each lane with experts and its items), read by the line's clock at most every
        READ_EVERY seconds (`refresh`), each lane capped at its items."""
        with self._lock:
            self._experts = (dict(lanes), passed) if any(lanes.values()) else None

    def refresh(self) -> None:
        """Read the workers' counts, outside the line's lock: a slow shared folder delays the
        next line, never the driver's collecting of items. A read that fails keeps the counts
        they had (they are for the eye; the build goes on), and no count goes back."""
        experts, self._read_at = self._experts, time.perf_counter()
        if experts is None:
            return
        lanes, passed = experts
        try:
            read = passed()
        except Exception as e:  # noqa: BLE001  (whatever the folder does, the line goes on)
            log.debug("items through experts not read: %s", e)
            return
        with self._lock:
            for lane, items in lanes.items():
                got, had = read.get(lane, LaneCount(0)), self._passed.get(lane, LaneCount(0))
                self._passed[lane] = LaneCount(max(had.items, min(items, got.items)), max(had.seconds, got.seconds))
            spent = sum(c.seconds for c in self._passed.values())
            if self._first is None and spent > 0:
                self._first = (time.perf_counter(), spent)

    def _beat(self) -> None:
        while not self._closed.wait(self.every):
            if time.perf_counter() - self._read_at >= READ_EVERY:
                self.refresh()
            with self._lock:
                if not self._closed.is_set():
                    self._draw_when_due()

    def _draw_when_due(self, *, last_item: bool = False) -> None:
        """Draw if `every` seconds have passed since the last line, or for the last item (the
        caller holds the lock)."""
        now = time.perf_counter()
        if self.enabled and (last_item or now - self._last >= self.every):
            self._last = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        now = now or time.perf_counter()
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        eta, experts = _eta(self.done, self.total, elapsed), ""
        if self._experts is not None:
            lanes = self._experts[0]
            total = sum(lanes.values())
            # every rendered item is through its experts: the last counts may still be on their way
            passed = total if self.done == self.total else sum(c.items for c in self._passed.values())
            experts = f"{passed}/{total} through experts, "
            if self.done < passed < total:  # the experts ahead of rendering set the pace; rendering follows in bursts
                eta = _experts_eta(lanes, self._passed, self._first, now)
        return (f"{self.label}: {self.done}/{self.total} items ({pct:.0f}%), {experts}{self.rows} rows, {self.runs} expert runs, "
                f"{self.set_aside} set aside, {rate:.1f} items/s, {clock(elapsed)} elapsed, eta {eta or '?'}")

    def _draw(self, now: float) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K" + self.line(now))
        else:
            self.stream.write(self.line(now) + "\n")
        self.stream.flush()

    def close(self) -> None:
        with self._lock:
            if self._closed.is_set():
                return
            self._closed.set()
            if self.enabled and self.live:
                self.stream.write("\n")
                self.stream.flush()


def _settled(done: int, total: int) -> bool:
    """Whether enough is done to estimate from: a twentieth of `total`, and 3. The first items
    include the experts' start-up, and an estimate from them means nothing."""
    return done > 0 and done >= max(3, total // 20)


def _eta(done: int, total: int, elapsed: float) -> str | None:
    """Time left at the pace so far; None until it is `_settled`."""
    if elapsed <= 0 or not _settled(done, total):
        return None
    return clock((total - done) * elapsed / done)


def _experts_eta(lanes: Mapping[int, int], passed: Mapping[int, LaneCount], first: tuple[float, float] | None, now: float) -> str | None:
    """Time left for the experts: each lane's items left at what its passed items cost, at the
    expert seconds counted per second since `first` (when, and how many, they were first
    counted). While a lane with items left has passed none, its items are left out and the
    time reads `>0:22`, at least that long. None until the items through are `_settled`, or
    before expert seconds have been counted twice (every result cached, or one reading so far)."""
    done, spent = sum(c.items for c in passed.values()), sum(c.seconds for c in passed.values())
    if first is None or spent <= first[1] or now <= first[0] or not _settled(done, sum(lanes.values())):
        return None
    left, unknown = 0.0, False
    for lane, items in lanes.items():
        got = passed.get(lane, LaneCount(0))
        if got.items < items:
            unknown = unknown or not got.items
            left += (items - got.items) * got.seconds / got.items if got.items else 0.0
    seconds = left * (now - first[0]) / (spent - first[1])
    if unknown:  # at least this long; "at least 0:00" says nothing
        return f">{clock(seconds)}" if seconds >= 1 else None
    return clock(seconds)


class PassedCount:
    """Items this process passed through their lane's last expert stage, and the expert seconds
    they took, per lane, in its own file of the build's progress folder. One per process and
    folder (`of_process`): a load task's worker and an expert host's threads share it. A batch
    only counts; a timer thread writes the file, so a slow or failing file system never holds
    up a batch. The first count is written at once, later ones at most every WRITE_EVERY
    seconds (on a shared file system each write costs round trips, and an X-ray expert on a
    GPU passes dozens of items a second). The last is written within WRITE_EVERY of its batch,
    unless the process ends first (Ray Data lets a pool's actors go when their operator is
    done): the driver's last line makes up for it. A batch Ray retries after a crash is
    counted again; the driver caps each lane's sum."""

    _mine: ClassVar[dict[str, PassedCount]] = {}
    _made = threading.Lock()

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / f"{socket.gethostname()}-{os.getpid()}.json"
        self.lanes: dict[int, LaneCount] = {}
        self.stopped = False  # the driver removed the folder: the build is over
        self.warned = False
        self._written_at = -math.inf
        self._pending = False
        self._lock = threading.Lock()  # the count and the schedule
        self._writing = threading.Lock()  # one write at a time, the newest count last

    @classmethod
    def of_process(cls, folder: str) -> PassedCount:
        with cls._made:
            found = cls._mine.get(folder)
            if found is None:
                found = cls._mine[folder] = cls(folder)
            return found

    def add(self, lane: int, items: int, seconds: float) -> None:
        """`items` of `lane` passed, having taken `seconds` of expert time in all."""
        with self._lock:
            self.lanes[lane] = self.lanes.get(lane, LaneCount(0)) + LaneCount(items, seconds)
            if self._pending or self.stopped:
                return
            timer = threading.Timer(max(0.0, self._written_at + WRITE_EVERY - time.monotonic()), self._write)
            timer.daemon = True
            try:
                timer.start()
            except RuntimeError:  # no thread to spare (a process at its limit): a later batch tries again
                return
            self._pending = True

    def _write(self) -> None:
        """The count, replacing the file whole, into the folder as it is: once the driver has
        removed it, nothing is written again (a write in the millisecond the driver removes it
        may leave this file, which the next build's clean-up of the plan's folder takes). Any
        other failure is said once and tried again a second later, with the next batch."""
        with self._writing:
            with self._lock:
                self._pending, self._written_at = False, time.monotonic()
                lanes = {str(k): {"items": c.items, "seconds": round(c.seconds, 3)} for k, c in self.lanes.items()}
            if self.stopped:
                return
            try:
                write_json(self.path, {"lanes": lanes}, parents=False)  # its temporary name is hidden: the driver reads *.json
            except FileNotFoundError:
                self.stopped = True
            except (OSError, CurationError) as e:
                if not self.warned:
                    self.warned = True
                    log.warning("cannot count items through their experts for the progress line in %s: %s", self.path.parent, e)


def through_experts(folder: str | Path) -> dict[int, LaneCount]:
    """The workers' counts (`PassedCount`) in `folder` summed per lane; empty before the first.
    A folder that cannot be listed raises its OSError (`BuildProgress.refresh` keeps the last
    counts)."""
    total: dict[int, LaneCount] = {}
    for path in Path(folder).glob("*.json"):  # a count being replaced is a hidden temporary name
        try:
            lanes = [(int(k), LaneCount(int(c["items"]), float(c["seconds"]))) for k, c in json.loads(path.read_text())["lanes"].items()]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue  # removed meanwhile, torn, or not one of ours
        for lane, c in lanes:
            total[lane] = total.get(lane, LaneCount(0)) + c
    return total


def summary(card: dict[str, Any], layout: Layout, *, limit: int = 8) -> str:
    """The closing lines: rows, shards, time, what was set aside and why."""
    c = card["counts"]
    rows, files = c["rows"], c["files"]
    splits = ", ".join(f"{n} {s}" for s, n in rows["by_split"].items()) or "none"
    seconds = card["timing"]["wall_s"].get("total", 0)
    lines = [
        f"{rows['total']} rows ({splits}) in {c['shards']['total']} shards under {layout.data} in {seconds:.1f} s",
        f"files: {files['discovered']} discovered = {files['used']} used + {files['skipped']} skipped + {files['quarantined']} quarantined",
    ]
    runs = ", ".join(f"{n}: {e['runs']} run, {e['cached']} cached" for n, e in card["experts"].items())
    if runs:
        lines.append(f"experts: {runs}")
    if c["set_aside"]:
        lines.append(f"conversations set aside ({sum(c['set_aside'].values())}):")
        for reason, n in list(c["set_aside"].items())[:limit]:
            lines.append(f"  {n:>5} × {reason}")
        if len(c["set_aside"]) > limit:
            lines.append(f"  … {len(c['set_aside']) - limit} more reasons in {layout.card}")
    lines.append(f"share {layout.dataset} as it is; keep {layout.internal} (index, ledger, cache) to yourself: it names source files")
    return "\n".join(lines)
