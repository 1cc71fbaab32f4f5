"""What every node of a cluster must see, and write in, at the paths the driver resolved,
tried on each node before the build begins, and on each that joins while it runs.

Load tasks, expert actors and render tasks open the manifest's paths as the driver resolved
them (README: "On a cluster"). A node that mounts the archive elsewhere, or not at all, would
set every item it loads aside as unreadable; a node whose `--out` or cache is a folder of its
own would read no input block and write results no other node sees. Either is a mistake in
how the cluster was set up, so the build stops before its first item, naming the node and what
it lacks. One task per node other than the driver's own (pinned to it, no CPU reserved) looks for:

- each source's first indexed file (its root where nothing was indexed), and its labels path;
- each expert's bundle folder and each prompt folder of the manifest;
- a folder or file the driver has just made, where workers write what others read: this
  build's own folder under `--out` (`internal/plan/progress-<build>`), and a mark in the cache
  when the cache lies outside `--out`. A same-named folder of the node's own has neither;
- and that it can write in both (a file made and removed): a read-only mount, or a uid the
  storage refuses, would fail each write of a count or a result.

Nodes that join the cluster later (an autoscaler's) are asked the same as the build's
`NodeWatch` sees them, and the mark stays in the cache until the build ends.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path

from curation.build.plan import Plan
from curation.errors import CurationError
from curation.items import source_path
from curation.atomic import write_refused

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 120.0  # a node that starts no worker in this time is left unchecked, with a warning
SHARED_RULE = ("Every node must mount the archive and the bundles, and --out and the cache writable, at the same paths "
               "as the driver's machine (README: On a cluster)")
RERUN_WITH_THE_NODE = "What finished is cached: run the same command again once that node has them, or without it"


def read_paths(plan: Plan) -> dict[str, str]:
    """What the nodes read, each under the manifest key it comes from: the first indexed file
    of each source, labels, bundles and prompt folders."""
    spec, paths = plan.spec, {}
    first: dict[str, str] = {}
    for item in plan.source:
        if len(first) == len(spec.sources):
            break
        if item.source not in first and item.uris:
            first[item.source] = str(source_path(Path(spec.source(item.source).root), item.uris[0]))
    for i, src in enumerate(spec.sources):
        paths[f"sources[{i}].root ({src.name})"] = first.get(src.name, str(src.root))
        for key in ("labels", "file"):
            value = getattr(src, key, None)
            if isinstance(value, Path):
                paths[f"sources[{i}].{key}"] = str(value)
    for i, expert in enumerate(spec.experts):
        if expert.bundle is not None:
            paths[f"experts[{i}].bundle ({expert.name})"] = str(expert.bundle)
    for i, folder in enumerate(spec.prompts):
        paths[f"prompts[{i}]"] = str(folder)
    return paths


def node_needs(plan: Plan, build_folder: Path, cache_root: Path, out: Path, build_id: str) -> tuple[dict[str, str], dict[str, str], Path | None]:
    """(what every node must see, the folders it must write in, the mark), each under its
    manifest key: `read_paths`, `build_folder` (this build's, under `out`: the workers' count
    files go there) and, when the cache lies outside `out`, a mark file in it that `NodeCheck`
    writes before it asks a node (`None` otherwise); the cache and `build_folder` must take the
    workers' writes."""
    see = {**read_paths(plan), "output.dir (this build's folder under it)": str(build_folder)}
    write = {"output.dir (this build's folder under it)": str(build_folder), "output.cache": str(cache_root)}
    mark = None
    if not cache_root.resolve().is_relative_to(out.resolve()):
        mark = cache_root / f".node-check-{build_id}"
        see["output.cache (a mark the driver wrote in it)"] = str(mark)
    return see, write, mark


def lacking(see: Mapping[str, str], write: Mapping[str, str]) -> list[str]:
    """What this machine lacks, each as `key: what`: a path of `see` it does not find, a folder
    of `write` it finds but cannot write in (tried for real: permission bits say nothing to
    root, nor about a read-only mount)."""
    found = [f"{key}: not found: {path}" for key, path in see.items() if not os.path.exists(path)]
    for key, folder in write.items():
        refused = write_refused(folder) if os.path.isdir(folder) else None
        if refused is not None:
            found.append(f"{key}: cannot write in {folder} ({refused.strerror or type(refused).__name__})")
    return found


class NodeCheck:
    """`lacking`, asked of nodes in a task pinned to each (no CPU reserved): those alive at the
    start (`check_every_node`), then those that join as the build's `NodeWatch` sees them
    (`ask`, `answers`). `close()` removes the mark."""

    def __init__(self, see: dict[str, str], write: dict[str, str], mark: Path | None, *, timeout_s: float = ANSWER_TIMEOUT_S):
        self.see, self.write, self.mark, self.timeout_s = see, write, mark, timeout_s
        self.names: dict[str, str] = {}  # every node asked: id → name
        self._pending: dict[object, tuple[str, float]] = {}  # the task's ref → (node id, when it was asked)

    def ask(self, nodes: Mapping[str, str]) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        if not nodes:
            return
        self.write_mark()
        look = ray.remote(num_cpus=0, max_retries=0)(lacking)
        for node, name in nodes.items():
            self.names[node] = name
            ref = look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(self.see, self.write)
            self._pending[ref] = (node, time.monotonic())

    def answers(self, wait: float = 0.0) -> list[tuple[str, list[str]]]:
        """(node id, what it lacks) for each node that answered within `wait` seconds and lacks
        something; a node that has not answered `timeout_s` after it was asked is left
        unchecked, with a warning, and so is one lost before it answered."""
        import ray

        if not self._pending:
            return []
        done, _ = ray.wait(list(self._pending), num_returns=len(self._pending), timeout=wait)
        found = []
        for ref in done:
            node, _ = self._pending.pop(ref)
            try:
                lacks = ray.get(ref)
            except ray.exceptions.RayError as e:
                log.warning("node %s did not answer (%s): not checked for the shared paths", self.names[node], type(e).__name__)
                continue
            if lacks:
                found.append((node, lacks))
        now = time.monotonic()
        for ref, (node, asked) in list(self._pending.items()):
            if now - asked >= self.timeout_s:
                log.warning("node %s did not answer within %g s: not checked for the shared paths", self.names[node], self.timeout_s)
                ray.cancel(ref, force=True)
                del self._pending[ref]
        return found

    def write_mark(self) -> None:
        if self.mark is not None and not self.mark.exists():
            self.mark.parent.mkdir(parents=True, exist_ok=True)  # a new cache's first result would make it
            self.mark.write_bytes(b"")

    def close(self) -> None:
        if self.mark is not None:
            self.mark.unlink(missing_ok=True)


def check_every_node(plan: Plan, build_folder: Path, cache_root: Path, out: Path, build_id: str, *,
                     timeout_s: float = ANSWER_TIMEOUT_S) -> tuple[NodeCheck, dict[str, str]]:
    """Refuse the build when a node other than the driver's lacks any of `node_needs`; else the
    check, for the nodes that join later, and every node alive now (id → name, the driver's own
    included). On a Ray of one node nothing is asked or written."""
    import ray

    own = ray.get_runtime_context().get_node_id()
    alive = alive_nodes()
    check = NodeCheck(*node_needs(plan, build_folder, cache_root, out, build_id), timeout_s=timeout_s)
    try:
        check.ask({node: name for node, name in alive.items() if node != own})
        found = check.answers(wait=timeout_s + 1.0)  # a second beyond: the late are dropped in the same call
    except BaseException:
        check.close()
        raise
    if found:
        check.close()
        raise CurationError(". ".join(f"node {check.names[node]} lacks " + "; ".join(lacks) for node, lacks in found)
                            + f". {SHARED_RULE}")
    return check, alive


def alive_nodes() -> dict[str, str]:
    """The cluster's alive nodes: id → `node_name`."""
    import ray

    return {n["NodeID"]: node_name(n) for n in ray.nodes() if n.get("Alive")}


def node_name(node: Mapping) -> str:
    """How a log line or an error names a node of `ray.nodes()`: `IP (id8)`."""
    return f"{node.get('NodeManagerAddress', '?')} ({node['NodeID'][:8]})"


def this_node() -> str:
    """`node_name` of the node this Ray worker runs on."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    return node_name({"NodeManagerAddress": ray.util.get_node_ip_address(), "NodeID": node})
