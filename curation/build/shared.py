"""What every node of a cluster must see, and write in, at the paths the driver resolved,
tried on each node before the build begins.

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

Nodes that join the cluster later (an autoscaler's) are not looked at.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from curation.build.plan import Plan
from curation.errors import CurationError
from curation.items import source_path
from curation.preflight import write_refused

log = logging.getLogger(__name__)

ANSWER_TIMEOUT_S = 120.0  # a node that starts no worker in this time is left unchecked, with a warning


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


@contextmanager
def node_needs(plan: Plan, build_folder: Path, cache_root: Path, out: Path, build_id: str) -> Iterator[tuple[dict[str, str], dict[str, str]]]:
    """(what every node must see, the folders it must write in), each under its manifest key:
    `read_paths`, `build_folder` (this build's, under `out`: the workers' count files go there)
    and, when the cache lies outside `out`, a mark file the driver writes in it (removed
    afterwards); the cache and `build_folder` must take the workers' writes."""
    see = {**read_paths(plan), "output.dir (this build's folder under it)": str(build_folder)}
    write = {"output.dir (this build's folder under it)": str(build_folder), "output.cache": str(cache_root)}
    mark = None
    if not cache_root.resolve().is_relative_to(out.resolve()):
        mark = cache_root / f".node-check-{build_id}"
        cache_root.mkdir(parents=True, exist_ok=True)  # a new cache's first result would make it
        mark.write_bytes(b"")
        see["output.cache (a mark the driver wrote in it)"] = str(mark)
    try:
        yield see, write
    finally:
        if mark is not None:
            mark.unlink(missing_ok=True)


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


def check_every_node(plan: Plan, build_folder: Path, cache_root: Path, out: Path, build_id: str, *,
                     timeout_s: float = ANSWER_TIMEOUT_S) -> None:
    """Refuse the build when a node other than the driver's lacks any of `node_needs`; on a Ray
    of one node nothing is gathered or written."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    own = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["NodeID"] != own]
    if not nodes:
        return
    look = ray.remote(num_cpus=0, max_retries=0)(lacking)
    with node_needs(plan, build_folder, cache_root, out, build_id) as (see, write):
        asked = {look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(see, write): n
                 for n in nodes}
        done, late = ray.wait(list(asked), num_returns=len(asked), timeout=timeout_s)
        for ref in late:
            log.warning("node %s did not answer within %g s: not checked for the shared paths", _name(asked[ref]), timeout_s)
            ray.cancel(ref, force=True)
        problems = [f"node {_name(asked[ref])} lacks " + "; ".join(found) for ref in done if (found := ray.get(ref))]
    if problems:
        raise CurationError(". ".join(problems) + ". Every node must mount the archive and the bundles, and --out and the "
                            "cache writable, at the same paths as the driver's machine (README: On a cluster)")


def _name(node: dict) -> str:
    return f"{node.get('NodeManagerAddress', '?')} ({node['NodeID'][:8]})"
