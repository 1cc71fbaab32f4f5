"""The experts' fingerprints (their cache keys) and what the plan needs to know of them, three
ways: by constructing every runner (a build that will run experts), from what a build
recorded in the cache (`m3-curate render`), and from a record that is still valid without
constructing anything (a build whose findings may all be cached: it must not pay for
importing torch and MONAI only to learn that nothing needs to run).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from curation.build.plan import ExpertInfo, runner_spec, spec_json
from curation.errors import CurationError
from curation.manifest import BuildSpec
from curation.store.cache import FindingsCache


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


def from_runners(spec: BuildSpec, cache: FindingsCache, code: str) -> tuple[dict[str, ExpertInfo], dict[str, Any]]:
    """Construct every runner on the driver (validating its options before any worker
    starts), take its fingerprint, and record it in the cache with what `recorded` checks."""
    from expert_runners.base import make_runner

    infos, runners, entries = {}, {}, []
    for e in spec.experts:
        runner = make_runner(runner_spec(e), image_max_side=spec.output.image_max_side)
        runners[e.name] = runner
        weights = runner.weight_files()
        infos[e.name] = ExpertInfo(
            name=e.name, runner=e.runner, fingerprint=runner.fingerprint(), spec=spec_json(e),
            modalities=tuple(runner.modalities), kinds=tuple(runner.kinds), weights=bool(weights),
        )
        entries.append({"spec": infos[e.name].spec, "fingerprint": infos[e.name].fingerprint, "info": infos[e.name].to_json(),
                        "code": code, "files": _stats(weights)})
    cache.register(entries)
    return infos, runners


def from_cache(spec: BuildSpec, cache: FindingsCache) -> dict[str, ExpertInfo]:
    """Fingerprints a build recorded for the manifest's expert configurations; no runner is
    constructed. An expert no build has run is an error that says so."""
    recorded = cache.experts()
    infos = {}
    for i, e in enumerate(spec.experts):
        want = spec_json(e)
        found = [r for r in recorded if r["spec"] == want]
        if not found:
            raise CurationError(
                f"experts[{i}] ({e.name!r}): no build has run this expert configuration with cache {cache.root}; "
                f"run `m3-curate build` first (render uses cached findings only)"
            )
        infos[e.name] = ExpertInfo.from_json(found[-1]["info"])
    return infos


def recorded(spec: BuildSpec, cache: FindingsCache, code: str) -> dict[str, ExpertInfo] | None:
    """Fingerprints a build recorded, while they still hold: the same expert configuration,
    the same code version, and every weight file (and its folder) with the size and
    modification time it had then — the rule `expert_runners.base.file_digest` applies within
    a process. None when some expert has no such record: construct the runners."""
    records = cache.experts()
    infos = {}
    for e in spec.experts:
        want = spec_json(e)
        found = [r for r in records if r["spec"] == want and r.get("code") == code and _unchanged(r.get("files"))]
        if not found:
            return None
        infos[e.name] = ExpertInfo.from_json(found[-1]["info"])
    return infos


def seen(spec: BuildSpec, cache: FindingsCache) -> bool:
    """Whether a build has run every expert configuration of the manifest with this cache
    (whatever the code or weights then): its results may all be there."""
    specs = [r["spec"] for r in cache.experts()]
    return all(spec_json(e) in specs for e in spec.experts)
