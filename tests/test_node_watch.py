"""`NodeWatch` on its own: a real thread raising `NodeFault` in this (the main) thread, with
the nodes' liveness and the build's counts given as functions. The whole story, a node killed
under a real build on two Ray nodes, is `tests/test_two_nodes.py`."""

from __future__ import annotations

import itertools
import re
import time

import pytest

from curation.build import node_watch
from curation.build.node_watch import NodeFault, NodeWatch

NODES = {"a" * 56: "10.0.0.1 (aaaaaaaa)", "b" * 56: "10.0.0.2 (bbbbbbbb)"}


def wait_in_main_thread(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.01)


def only_first() -> dict[str, str]:
    return dict(list(NODES.items())[:1])


def test_a_lost_node_and_no_move_stop_the_build_naming_the_node():
    watch = NodeWatch(lambda: 7, NODES, alive=only_first, every=0.02, stall=0.3)
    started = time.monotonic()
    try:
        with pytest.raises(NodeFault):
            wait_in_main_thread(30)
    finally:
        watch.stop()
    assert time.monotonic() - started >= 0.3  # not before the stall
    assert watch.reason is not None and watch.reason.startswith("node 10.0.0.2 (bbbbbbbb) left the Ray cluster at ")
    assert "What finished is cached: run the same command again" in watch.reason


@pytest.mark.parametrize("mark, alive", [
    (itertools.count().__next__, only_first),  # a node lost, and the build still moves: the nodes left have room
    (lambda: 7, lambda: NODES),  # nothing moves, and every node is there: a long expert run
], ids=["lost, still moving", "still, none lost"])
def test_the_watch_lets_a_build_that_moves_or_has_every_node_go_on(mark, alive):
    watch = NodeWatch(mark, NODES, alive=alive, every=0.02, stall=0.1)
    try:
        wait_in_main_thread(1.0)
    finally:
        watch.stop()
    assert watch.reason is None


def test_the_wait_grows_with_the_longest_pause_before_the_loss():
    """The build moved once, 0.4 s in, and lost a node at 0.5 s: it is given five times that
    pause (2 s) rather than the 0.1 s stall."""
    t0 = time.monotonic()
    watch = NodeWatch(lambda: int(time.monotonic() - t0 >= 0.4), NODES,
                          alive=lambda: NODES if time.monotonic() - t0 < 0.5 else only_first(), every=0.05, stall=0.1)
    try:
        with pytest.raises(NodeFault):
            wait_in_main_thread(30)
    finally:
        watch.stop()
    assert time.monotonic() - t0 >= 0.5 + 5 * 0.4 - 0.1


def test_after_stop_no_node_lost_is_raised():
    watch = NodeWatch(lambda: 7, NODES, alive=only_first, every=0.02, stall=0.05)
    watch.stop()
    wait_in_main_thread(0.3)
    assert watch.reason is None


def test_a_node_that_joined_after_the_start_and_is_lost_is_named_too():
    """An autoscaler's node, joined after the build began, then gone."""
    late = {"c" * 56: "10.0.0.3 (cccccccc)"}
    t0 = time.monotonic()

    def alive() -> dict[str, str]:
        return {**NODES, **late} if 0.2 <= time.monotonic() - t0 < 0.5 else dict(NODES)

    watch = NodeWatch(lambda: 7, dict(NODES), alive=alive, every=0.02, stall=0.3)
    try:
        with pytest.raises(NodeFault):
            wait_in_main_thread(30)
    finally:
        watch.stop()
    assert watch.reason is not None and watch.reason.startswith("node 10.0.0.3 (cccccccc) left the Ray cluster at ")


class Joined:
    """The shared-paths check of joined nodes (`NodeCheck`'s `ask` and `answers`), answering
    `lacks` for each node asked, one look after it was asked."""

    def __init__(self, lacks: list[str]):
        self.lacks, self.asked, self._waiting = lacks, [], []

    def ask(self, nodes):
        self.asked += list(nodes)
        self._waiting += list(nodes)

    def answers(self):
        found = [(node, self.lacks) for node in self._waiting if self.lacks]
        self._waiting = []
        return found


LATE = {"c" * 56: "10.0.0.3 (cccccccc)"}


def test_a_node_that_joins_without_the_shared_paths_stops_the_build_naming_it_and_what_it_lacks():
    joined = Joined(["sources[0].root (ct): not found: /archive/ct/P1/1/IM1.dcm"])
    watch = NodeWatch(itertools.count().__next__, NODES, joined=joined, alive=lambda: {**NODES, **LATE}, every=0.02, stall=30)
    try:
        with pytest.raises(NodeFault):
            wait_in_main_thread(30)
    finally:
        watch.stop()
    assert joined.asked == list(LATE)  # the nodes the build began with were checked before it
    assert re.fullmatch(r"node 10\.0\.0\.3 \(cccccccc\) joined the Ray cluster at \d\d:\d\d:\d\d and lacks sources\[0\]\.root "
                        r"\(ct\): not found: /archive/ct/P1/1/IM1\.dcm: every item it loads would be set aside\. Every node "
                        r"must mount .* \(README: On a cluster\)\. What finished is cached: run the same command again once "
                        r"that node has them, or without it", watch.reason or ""), watch.reason


def test_a_node_that_joins_with_the_shared_paths_is_asked_once_and_the_build_goes_on():
    joined = Joined([])
    watch = NodeWatch(lambda: 7, NODES, joined=joined, alive=lambda: {**NODES, **LATE}, every=0.02, stall=0.1)
    try:
        wait_in_main_thread(0.5)
    finally:
        watch.stop()
    assert watch.reason is None and joined.asked == list(LATE)


class Head:
    """A head probe (`HeadProbe`) that answers until `gone` seconds, and again after `back`."""

    address = "10.0.0.1:6379"

    def __init__(self, gone: float, back: float = float("inf")):
        self.t0, self.gone, self.back = time.monotonic(), gone, back

    def __call__(self) -> None:
        if self.gone <= time.monotonic() - self.t0 < self.back:
            raise ConnectionRefusedError(111, "Connection refused")


def test_a_head_that_stops_answering_stops_the_build_and_its_nodes_are_not_asked_meanwhile(monkeypatch):
    """Ray's own calls (the nodes, here `alive`) wait for a lost head without end: the watch asks
    them only while the head answers, and stops the build once it has not for HEAD_S."""
    monkeypatch.setattr(node_watch, "HEAD_S", 0.3)
    head, asked_after = Head(gone=0.1), []

    def alive() -> dict[str, str]:
        if time.monotonic() - head.t0 > 0.15:
            asked_after.append(time.monotonic() - head.t0)
        return dict(NODES)

    watch = NodeWatch(itertools.count().__next__, NODES, head=head, alive=alive, every=0.02, stall=30)
    try:
        with pytest.raises(NodeFault):
            wait_in_main_thread(30)
    finally:
        watch.stop()
    assert time.monotonic() - head.t0 >= 0.1 + 0.3
    assert re.fullmatch(r"the Ray cluster's head \(10\.0\.0\.1:6379\) has not answered since \d\d:\d\d:\d\d \(0:00\): the build "
                        r"cannot go on without it\. What finished is cached: once the head is back, run the same command again",
                        watch.reason or ""), watch.reason
    assert not asked_after, f"the nodes were asked while the head did not answer, at {asked_after}"


def test_a_head_that_answers_again_in_time_lets_the_build_go_on(monkeypatch):
    monkeypatch.setattr(node_watch, "HEAD_S", 0.5)
    watch = NodeWatch(lambda: 7, NODES, head=Head(gone=0.1, back=0.3), alive=lambda: NODES, every=0.02, stall=30)
    try:
        wait_in_main_thread(1.0)
    finally:
        watch.stop()
    assert watch.reason is None
