"""The experts' fingerprints (their cache keys) and what the plan needs to know of them: by
constructing every runner (a build that will run experts; what a build recorded, for
`m3-curate render`, is `curation.store.cache.expert_infos_from_cache`), and from a record
that is still valid without constructing anything (a build whose findings may all be cached
must not pay for hashing weights only to learn that nothing needs to run).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from curation.expert_info import ExpertInfo
from curation.manifest import BuildSpec
from curation.store.cache import FindingsCache

log = logging.getLogger(__name__)


def _stats(paths: list[Path]) -> list[list[Any]]:
    """(path, size, mtime) of each weight file and of its folder (a file added to or removed
    from the folder changes the folder's mtime)."""
    seen = dict.fromkeys([*paths, *(p.parent for p in paths)])
    out = []
    for p in seen:
        st = os.stat(p)
        out.append([str(p), st.st_size if p.is_file() else 0, st.st_mtime_ns])
    return out


def _unchanged(stats: Any) -> bool:
    if not isinstance(stats, list):
        return False
    for path, size, mtime in stats:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if st.st_mtime_ns != mtime or (size and st.st_size != size):
            return False
    return True


def from_runners(spec: BuildSpec, cache: FindingsCache, code: str) -> dict[str, ExpertInfo]:
    """Construct every runner on the driver (validating its options before any worker
    starts), take its description and fingerprint, and record them in the cache with what
    `recorded` checks."""
    from expert_runners.base import manifest_runners, task_args

    log.info("checking %d expert(s) on the driver (options, weights, fingerprints)", len(spec.experts))
    infos, entries = {}, []
    for name, runner in manifest_runners(spec).items():
        info = infos[name] = runner.describe(task_args(spec, name))
        entries.append({"spec": info.spec, "fingerprint": info.fingerprint, "info": info.to_json(), "code": code,
                        "files": _stats(runner.weight_files())})
    cache.register(entries)
    return infos


def recorded(spec: BuildSpec, cache: FindingsCache, code: str) -> dict[str, ExpertInfo] | None:
    """Fingerprints a build recorded, while they still hold: the same expert configuration,
    the same code version, and every weight file (and its folder) with the size and
    modification time it had then — the rule `expert_runners.base.file_digest` applies within
    a process. None when some expert has no such record: construct the runners."""
    records = cache.experts()
    infos = {}
    for e in spec.experts:
        want = e.without_placement().model_dump(mode="json")
        found = [r for r in records if r["spec"] == want and r.get("code") == code and _unchanged(r.get("files"))]
        if not found:
            return None
        infos[e.name] = ExpertInfo.from_json(found[-1]["info"])
    return infos


def seen(spec: BuildSpec, cache: FindingsCache) -> bool:
    """Whether a build has run every expert configuration of the manifest with this cache
    (whatever the code or weights then): its results may all be there."""
    specs = [r["spec"] for r in cache.experts()]
    return all(e.without_placement().model_dump(mode="json") in specs for e in spec.experts)
