"""A build that a lost node left without a way forward stops in one line instead of waiting for
ever.

Measured on two nodes of 2 CPUs (the demo-24 archive, the worker node killed 25 s in): Ray
restarted the lost expert host on the node left, whose two CPUs then held both hosts. The load
tasks that feed them need a CPU each and waited, and so did the hosts: 7 minutes later the line
still read `300/336 through experts`. Ray waits without end because it cannot know whether the
node comes back (an autoscaler may start one).

`LostNodeWatch` reads every few seconds which of the nodes the build began with, or that joined
since, are alive, and whether the build has moved (items through their experts, their expert
seconds, items rendered). Once a node is lost and the build has not moved for
`max(STALL_S, 5 × the longest pause between moves before the loss)`, it stops the build with a
`CurationError` that names the node. What finished is cached, and the next run plans for the
nodes there are then. Where the nodes left have room, or a new node joins, the build keeps
moving and the watch does nothing.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable, Hashable
from datetime import datetime

from curation.build.progress import clock

log = logging.getLogger(__name__)

EVERY_S = 5.0  # seconds between two looks at the nodes and the build's counts
STALL_S = 600.0  # a build without a move this long after losing a node is stopped (at least)
PAUSES = 5  # ... or this many times its longest pause between moves before the loss


class NodeLost(BaseException):
    """Raised in the driver's main thread by the watch (a `BaseException`, as KeyboardInterrupt
    is, so that no `except Exception` on the way swallows it); the watch's `reason` says why."""


class LostNodeWatch:
    """Watches from a thread of its own as soon as it is made. `mark()`: a value that changes
    whenever the build moves; `nodes`: the nodes to watch (id → name; those that join later are
    added), `alive()` the ones alive now. `stop()` before leaving the block that catches `NodeLost`: after it returns, no
    `NodeLost` is raised."""

    def __init__(self, mark: Callable[[], Hashable], nodes: dict[str, str], *, alive: Callable[[], dict[str, str]] | None = None,
                 every: float = EVERY_S, stall: float = STALL_S):
        self.mark, self.nodes, self.alive, self.every, self.stall = mark, nodes, alive or _alive, every, stall
        self.reason: str | None = None
        self._main = threading.main_thread().ident
        self._armed = True
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lost-node-watch", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, mark: Callable[[], Hashable]) -> LostNodeWatch | None:
        """Watch the Ray nodes alive now; None on a single node (losing it ends the driver too)."""
        nodes = _alive()
        return cls(mark, nodes, every=EVERY_S, stall=STALL_S) if len(nodes) > 1 else None

    def stop(self) -> None:
        with self._lock:
            self._armed = False
        self._stopped.set()
        self._thread.join()

    def _watch(self) -> None:
        last, moved, longest = self._read(None), time.monotonic(), 0.0
        lost: tuple[str, float, str] | None = None  # the node, when it was seen gone (monotonic, clock)
        while not self._stopped.wait(self.every):
            mark, now = self._read(last), time.monotonic()
            if mark != last:
                if lost is None:
                    longest = max(longest, now - moved)
                last, moved = mark, now
            if lost is None:
                lost = self._first_lost(now)
                continue
            waited = now - max(moved, lost[1])
            if waited > max(self.stall, PAUSES * longest):
                self._fire(lost[0], lost[2], waited)
                return

    def _read(self, before: Hashable) -> Hashable:
        try:
            return self.mark()
        except Exception as e:  # noqa: BLE001  (a count that cannot be read now is no move)
            log.debug("the build's counts not read: %s", e)
            return before

    def _first_lost(self, now: float) -> tuple[str, float, str] | None:
        try:
            alive = self.alive()
        except Exception as e:  # noqa: BLE001  (the GCS busy or gone: the driver's own calls say so)
            log.debug("the cluster's nodes not read: %s", e)
            return None
        gone = [n for n in self.nodes if n not in alive]
        if not gone:
            self.nodes.update(alive)  # a node that joined since (an autoscaler's) is watched too
            return None
        log.warning("node %s left the Ray cluster; the build goes on with the nodes left", self.nodes[gone[0]])
        return self.nodes[gone[0]], now, datetime.now().strftime("%H:%M:%S")

    def _fire(self, node: str, at: str, waited: float) -> None:
        self.reason = (f"node {node} left the Ray cluster at {at}, and the build has not moved since ({clock(waited)} "
                       "without an item through its experts or rendered): the nodes left cannot hold what it had "
                       "placed there, and Ray would wait for that node without end. What finished is cached: run the "
                       "same command again, and it plans for the nodes the cluster has then")
        with self._lock:
            if self._armed and self._main is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._main), ctypes.py_object(NodeLost))


def _alive() -> dict[str, str]:
    """The cluster's alive nodes: id → `IP (id8)`."""
    import ray

    return {n["NodeID"]: f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n in ray.nodes() if n.get("Alive")}
