"""Findings cache: expert outputs stored by (item content hash, expert fingerprint, expert
argument) — `<VISTA3D(everything)>` and `<VISTA3D(hepatic tumor)>` are different results.

Experts are the expensive part of a build; everything after them is cheap and always redone.
A cached entry is one JSON file (PNG bytes base64-encoded) written to a temporary name and
renamed, so a killed build leaves either a whole entry or none, and a rerun picks up exactly
where it stopped.

Beside the findings the cache keeps what `m3-curate render` needs to work without an expert:
the reason an expert could not give findings (`put_error`: a later build tries again, render
reports the reason) and, in `experts.json`, each expert configuration a build ran with its
fingerprint, so render finds the entries without constructing a runner. While an item is
loaded, run through an expert or rendered, a `.running.json` mark names the build: a mark of
the same build found again means that step killed its process, and the item is set aside
rather than run into the next crash.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from curation.errors import CurationError
from curation.expert_info import ExpertInfo
from curation.findings import Findings
from curation.items import StudyItem, source_path
from curation.manifest import BuildSpec


def content_hash(item: StudyItem, root: Path) -> str:
    """sha256 over the item's files (names relative to the source root, and their bytes), its
    label map and the frame it uses: a changed file means new findings."""
    h = hashlib.sha256()
    uris = list(item.uris) + ([item.label_uri] if item.label_uri else [])
    for uri in uris:
        h.update(uri.encode() + b"\0")
        with open(source_path(root, uri), "rb") as f:  # uris are text: a name that is not UTF-8 is escaped
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    h.update(f"frame={item.frame}".encode())
    return h.hexdigest()[:32]


class DiedHere(Exception):
    """A process of this build died running this before (see `FindingsCache.running`)."""


class FindingsCache:
    """`root/<fingerprint>/<content hash[:2]>/<content hash>-<argument hash>.json`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, content: str, fingerprint: str, args: str = "") -> Path:
        arg = hashlib.sha256(args.encode()).hexdigest()[:8]
        return self.root / fingerprint / content[:2] / f"{content}-{arg}.json"

    def get(self, content: str, fingerprint: str, args: str = "") -> Findings | None:
        path = self.path(content, fingerprint, args)
        try:
            return Findings.from_dict(json.loads(path.read_text()))
        except FileNotFoundError:
            return None

    def has(self, content: str, fingerprint: str, args: str = "") -> bool:
        return self.path(content, fingerprint, args).is_file()

    def put(self, content: str, fingerprint: str, findings: Findings, args: str = "") -> Path:
        path = self.path(content, fingerprint, args)
        _write_json(path, findings.to_dict(with_png=True))
        self.error_path(content, fingerprint, args).unlink(missing_ok=True)
        return path

    def error_path(self, content: str, fingerprint: str, args: str = "") -> Path:
        path = self.path(content, fingerprint, args)
        return path.with_name(path.name.removesuffix(".json") + ".error.json")

    def put_error(self, content: str, fingerprint: str, reason: str, args: str = "", *, status: str = "quarantined") -> Path:
        """Record why there are no findings (`status`: `quarantined` for a failure, `skipped`
        for an item the expert does not take). Builds retry these; render reports them."""
        path = self.error_path(content, fingerprint, args)
        _write_json(path, {"status": status, "reason": reason})
        return path

    def get_error(self, content: str, fingerprint: str, args: str = "") -> tuple[str, str] | None:
        """(status, reason) of a recorded failure, or None."""
        try:
            d = json.loads(self.error_path(content, fingerprint, args).read_text())
        except FileNotFoundError:
            return None
        return str(d["status"]), str(d["reason"])

    # -- runs in progress: an item that kills its expert's process is set aside, not retried forever

    def running_path(self, content: str, fingerprint: str, args: str = "") -> Path:
        path = self.path(content, fingerprint, args)
        return path.with_name(path.name.removesuffix(".json") + ".running.json")

    def mark_running(self, content: str, fingerprint: str, build: str, args: str = "") -> None:
        _write_json(self.running_path(content, fingerprint, args), {"build": build, "pid": os.getpid()})

    @contextmanager
    def running(self, content: str, fingerprint: str, build: str, args: str = "") -> Iterator[None]:
        """Mark the run while the block runs. A mark of this build found when it starts means a
        process died in it before (out of memory, a crash in native code; Ray restarted the
        worker and retried): `DiedHere` instead of running into the next crash. A mark of an
        earlier build, killed as a whole, does not count: a resumed build runs the item again."""
        path = self.running_path(content, fingerprint, args)
        try:
            died = json.loads(path.read_text()).get("build") == build
        except (FileNotFoundError, ValueError, AttributeError):
            died = False
        if died:
            path.unlink(missing_ok=True)
            raise DiedHere(content)
        self.mark_running(content, fingerprint, build, args)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)

    # -- the experts a build ran, for `m3-curate render` ---------------------------------------

    @property
    def registry_path(self) -> Path:
        return self.root / "experts.json"

    def experts(self) -> list[dict[str, Any]]:
        """Every expert configuration recorded by `register`, oldest first."""
        try:
            return list(json.loads(self.registry_path.read_text()))
        except FileNotFoundError:
            return []

    def register(self, entries: list[dict[str, Any]]) -> None:
        """Record expert configurations (dicts with at least `spec` and `fingerprint`); an
        entry with the same spec and fingerprint replaces the old one."""
        keep = [e for e in self.experts() if not any(_same(e, n) for n in entries)]
        _write_json(self.registry_path, keep + entries)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("spec") == b.get("spec") and a.get("fingerprint") == b.get("fingerprint")


def _write_json(path: Path, data: Any) -> None:
    """Write beside the final name and rename: readers see a whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))  # dict order kept: a legend is in drawing order
    os.replace(tmp, path)


def expert_infos_from_cache(spec: BuildSpec, cache: FindingsCache) -> dict[str, ExpertInfo]:
    """Fingerprints a build recorded for the manifest's expert configurations; no runner is
    constructed. An expert no build has run is an error that says so."""
    recorded = cache.experts()
    infos = {}
    for i, e in enumerate(spec.experts):
        want = e.without_placement().model_dump(mode="json")
        found = [r for r in recorded if r["spec"] == want]
        if not found:
            raise CurationError(
                f"experts[{i}] ({e.name!r}): no build has run this expert configuration with cache {cache.root}; "
                f"run `m3-curate build` first (render uses cached findings only)"
            )
        infos[e.name] = ExpertInfo.from_json(found[-1]["info"])
    return infos
