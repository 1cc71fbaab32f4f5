"""A build that a node leaves without a way forward, that a node joins without the shared
paths, or whose head is lost, stops in one line instead of waiting for ever, setting items
aside or being ended by Ray.

Measured on two nodes of 2 CPUs (the demo-24 archive, the worker node killed 25 s in): Ray
restarted the lost expert host on the node left, whose two CPUs then held both hosts. The load
tasks that feed them need a CPU each and waited, and so did the hosts: 7 minutes later the line
still read `300/336 through experts`. Ray waits without end because it cannot know whether the
node comes back (an autoscaler may start one).

`NodeWatch` reads every few seconds which nodes are alive, and whether the build has moved
(items through their experts, their expert seconds, items rendered):

- once a node it watches is lost and the build has not moved for
  `max(STALL_S, 5 × the longest pause between moves before the loss)`, it stops the build with
  a `CurationError` that names the node. Where the nodes left have room, the build keeps moving
  and the watch does nothing;
- a node that joins after the build began (an autoscaler's) is watched too, and is asked for
  the shared paths as the nodes at the start were (`curation.build.shared.NodeCheck`): one that
  lacks them would set every item it loads aside, so the build stops, naming it and what it
  lacks;
- once the head (its GCS) has not answered for HEAD_S, it stops the build naming the head:
  Ray's own calls wait for a lost head without a word, and a minute later Ray ends the driver
  with a line of its own (`Failed to connect to GCS within 60 seconds … The program will
  terminate`, status 1). The watch opens a TCP connection to the head's GCS, with a deadline,
  and asks Ray for the nodes only while the head answers: that call would wait with the rest.

What finished is cached in every case, and the next run plans for the nodes there are then.
"""

from __future__ import annotations

import ctypes
import logging
import socket
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from datetime import datetime
from typing import Protocol

from curation.build.progress import clock
from curation.build.shared import RERUN_WITH_THE_NODE, SHARED_RULE, alive_nodes

log = logging.getLogger(__name__)

EVERY_S = 5.0  # seconds between two looks at the nodes and the build's counts
STALL_S = 600.0  # a build without a move this long after losing a node is stopped (at least)
PAUSES = 5  # ... or this many times its longest pause between moves before the loss
HEAD_S = 30.0  # a head that has not answered this long is lost (Ray ends the driver at 60 s)
HEAD_CONNECT_S = 2.0  # each look's deadline


class NodeFault(BaseException):
    """Raised in the driver's main thread by the watch (a `BaseException`, as KeyboardInterrupt
    is, so that no `except Exception` on the way swallows it); the watch's `reason` says why."""


class JoinedNodes(Protocol):
    """What the watch asks of the nodes that join (`curation.build.shared.NodeCheck`)."""

    def ask(self, nodes: Mapping[str, str]) -> None:
        """Start looking at these nodes (id → name); returns at once."""

    def answers(self) -> list[tuple[str, list[str]]]:
        """(node id, what it lacks) for each node asked whose answer came since, and lacks something."""


class HeadProbe:
    """Raises `OSError` unless the head's GCS at `address` takes a TCP connection within
    HEAD_CONNECT_S: refused where its process is gone, no answer where its machine is."""

    def __init__(self, address: str):
        self.address = address

    @classmethod
    def of_session(cls) -> HeadProbe:
        import ray

        return cls(ray.get_runtime_context().gcs_address)

    def __call__(self) -> None:
        from curation.ray_address import host_port

        socket.create_connection(host_port(self.address), timeout=HEAD_CONNECT_S).close()


class NodeWatch:
    """Watches from a thread of its own as soon as it is made. `mark()`: a value that changes
    whenever the build moves; `nodes`: the nodes the build began with, all checked (id → name;
    any other alive node is a joiner: added, and given to `joined` to check); `alive()`: the
    nodes alive now; `head`: asks the head (`HeadProbe`). `stop()` before leaving the block
    that catches `NodeFault`: after it returns, no `NodeFault` is raised."""

    def __init__(self, mark: Callable[[], Hashable], nodes: Mapping[str, str], *, joined: JoinedNodes | None = None,
                 head: HeadProbe | None = None, alive: Callable[[], dict[str, str]] | None = None,
                 every: float | None = None, stall: float | None = None):
        self.mark, self.nodes, self.joined, self.head, self.alive = mark, dict(nodes), joined, head, alive or alive_nodes
        self.every, self.stall = every or EVERY_S, stall or STALL_S
        self.reason: str | None = None
        self._joined_at: dict[str, str] = {}
        self._silent: tuple[float, str] | None = None  # since when the head has not answered (monotonic, clock)
        self._main = threading.main_thread().ident
        self._armed = True
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="node-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._armed = False
        self._stopped.set()
        self._thread.join(timeout=HEAD_CONNECT_S + 1.0)  # a look under way ends within its deadline

    def _watch(self) -> None:
        last, moved, longest = self._read(None), time.monotonic(), 0.0
        lost: tuple[str, float, str] | None = None  # the node, when it was seen gone (monotonic, clock)
        while not self._stopped.wait(self.every):
            mark, now = self._read(last), time.monotonic()
            if mark != last:
                if lost is None:
                    longest = max(longest, now - moved)
                last, moved = mark, now
            if not self._head_answers(now):
                if self.reason is not None:
                    return
                continue
            alive = self._alive()
            if alive is not None:
                self._welcome(alive)
            if self._refuse_joiner():
                return
            if lost is None:
                lost = self._first_lost(alive, now)
                continue
            waited = now - max(moved, lost[1])
            if waited > max(self.stall, PAUSES * longest):
                self._fire(f"node {lost[0]} left the Ray cluster at {lost[2]}, and the build has not moved since "
                           f"({clock(waited)} without an item through its experts or rendered): the nodes left cannot "
                           "hold what it had placed there, and Ray would wait for that node without end. What finished "
                           "is cached: run the same command again, and it plans for the nodes the cluster has then")
                return

    def _read(self, before: Hashable) -> Hashable:
        try:
            return self.mark()
        except Exception as e:  # noqa: BLE001  (a count that cannot be read now is no move)
            log.debug("the build's counts not read: %s", e)
            return before

    def _head_answers(self, now: float) -> bool:
        """Whether the head answered; the build is stopped once it has not for HEAD_S."""
        if self.head is None:
            return True
        try:
            self.head()
        except OSError as e:
            if self._silent is None:
                self._silent = (now, datetime.now().strftime("%H:%M:%S"))
                log.warning("the Ray cluster's head (%s) does not answer (%s): the build stops if it has not answered "
                            "again in %s", self.head.address, e.strerror or type(e).__name__, clock(HEAD_S))
            elif now - self._silent[0] >= HEAD_S:
                self._fire(f"the Ray cluster's head ({self.head.address}) has not answered since {self._silent[1]} "
                           f"({clock(now - self._silent[0])}): the build cannot go on without it. What finished is "
                           "cached: once the head is back, run the same command again")
            return False
        if self._silent is not None:
            log.warning("the Ray cluster's head answers again")
            self._silent = None
        return True

    def _alive(self) -> dict[str, str] | None:
        try:
            return self.alive()
        except Exception as e:  # noqa: BLE001  (the GCS busy or gone: the driver's own calls say so)
            log.debug("the cluster's nodes not read: %s", e)
            return None

    def _welcome(self, alive: dict[str, str]) -> None:
        """Watch the nodes that joined since the last look, and ask them for the shared paths."""
        new = {node: name for node, name in alive.items() if node not in self.nodes}
        if not new:
            return
        log.info("node%s %s joined the Ray cluster", "s" * (len(new) > 1), ", ".join(new.values()))
        self.nodes.update(new)
        at = datetime.now().strftime("%H:%M:%S")
        self._joined_at.update(dict.fromkeys(new, at))
        if self.joined is not None:
            self.joined.ask(new)

    def _refuse_joiner(self) -> bool:
        """Stop the build for the first joined node that lacks a shared path, if one answered so."""
        try:
            found = self.joined.answers() if self.joined is not None else []
        except Exception as e:  # noqa: BLE001  (the GCS busy or gone: as above)
            log.debug("the joined nodes' answers not read: %s", e)
            return False
        if not found:
            return False
        node, lacks = found[0]
        self._fire(f"node {self.nodes[node]} joined the Ray cluster at {self._joined_at.get(node, '?')} and lacks "
                   + "; ".join(lacks) + f": every item it loads would be set aside. {SHARED_RULE}. {RERUN_WITH_THE_NODE}")
        return True

    def _first_lost(self, alive: dict[str, str] | None, now: float) -> tuple[str, float, str] | None:
        gone = [n for n in self.nodes if alive is not None and n not in alive]
        if not gone:
            return None
        log.warning("node %s left the Ray cluster; the build goes on with the nodes left", self.nodes[gone[0]])
        return self.nodes[gone[0]], now, datetime.now().strftime("%H:%M:%S")

    def _fire(self, reason: str) -> None:
        self.reason = reason
        with self._lock:
            if self._armed and self._main is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self._main), ctypes.py_object(NodeFault))

