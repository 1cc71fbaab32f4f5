"""Live progress on the terminal and the closing summary.

On a terminal one line is redrawn in place a few times a second; elsewhere (a `ray job`
log, CI) a plain line is printed every `every` seconds, so logs stay readable. The line is
drawn on that clock whether or not an item has arrived: on a node whose CPUs the expert hosts
hold, Ray Data renders items only once loading ends (bench/README.md, "Where rendering
runs"), and a large build would otherwise print nothing for most of its run.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import IO, Any

from curation.store.layout import Layout


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


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

    def _beat(self) -> None:
        while not self._closed.wait(self.every):
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
        elapsed = (now or time.perf_counter()) - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        pct = 100.0 * self.done / self.total if self.total else 100.0
        # the first items include the experts' start-up: an estimate from them means nothing
        settled = rate > 0 and self.done >= max(3, self.total // 20)
        eta = _clock((self.total - self.done) / rate) if settled else "?"
        return (f"{self.label}: {self.done}/{self.total} items ({pct:.0f}%), {self.rows} rows, {self.runs} expert runs, "
                f"{self.set_aside} set aside, {rate:.1f} items/s, {_clock(elapsed)} elapsed, eta {eta}")

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
