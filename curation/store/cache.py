"""Findings cache: expert outputs stored by (item content hash, expert fingerprint, expert
argument) — `<VISTA3D(everything)>` and `<VISTA3D(hepatic tumor)>` are different results.

Experts are the expensive part of a build; everything after them is cheap and always redone.
A cached entry is one JSON file (PNG bytes base64-encoded) written to a temporary file in
`_tmp/` and renamed (`curation.atomic`), so a killed build leaves either a whole entry or none,
and sealed with the sha256 of its contents (`SEAL`), so a digit changed on disk is found when
it is read rather than becoming another volume in an answer (entries of earlier versions, without
a seal, are read as they are);
and a rerun picks up exactly where it stopped; `sweep_tmp` removes what killed writers left
in `_tmp/`. Nothing lists the entries: each is found by its path, so the cache's size never
weighs on a build's memory.

Beside the findings the cache keeps what `m3-curate render` needs to work without an expert:
the reason an expert could not give findings (`put_error`; render reports the reason, and a
later build tries again only when the failure was the environment's — a worker that died, too
little memory — not the expert's own verdict on the item, which the same fingerprint repeats) and, in `experts.json`, each expert configuration a build ran with its
fingerprint, so render finds the entries without constructing a runner. While an item is
loaded, run through an expert or rendered, a `.running.json` mark names the build and counts
the tries: a mark of the same build found again means that step killed its process (Ray
retried it on a restarted worker), and after `tries` such deaths the item is set aside rather
than run into the next crash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from curation.atomic import sweep, write_json
from curation.errors import CurationError, brief
from curation.expert_info import ExpertInfo
from curation.findings import Findings
from curation.items import StudyItem, source_path
from curation.manifest import BuildSpec

TMP = "_tmp"  # the cache's folder for files being written
SEAL = "sha256"  # an entry's key for the digest of the rest of it
DAMAGED = ".damaged"  # the suffix of an entry that did not read, moved aside

log = logging.getLogger(__name__)


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


class DamagedEntry(Exception):
    """Cached findings that do not read (a file cut short or changed by a failing disk, or by
    hand), moved aside to `<entry>.damaged` so that the next build runs the expert again."""


class DiedHere(Exception):
    """Processes of this build died running this before, as often as allowed (see
    `FindingsCache.running`)."""

    def __init__(self, what: str, deaths: int):
        super().__init__(f"{what}: {deaths} worker process(es) died running it")
        self.deaths = deaths


def _alive_here(mark: dict[str, Any]) -> bool:
    """Whether the process that wrote a mark is still running on this machine (then the mark
    is a concurrent run of the same step, not a death)."""
    if mark.get("host") != socket.gethostname() or mark.get("pid") == os.getpid():
        return False
    try:
        os.kill(int(mark["pid"]), 0)
    except (OSError, KeyError, ValueError, TypeError):
        return False
    return True


class FindingsCache:
    """`root/<fingerprint>/<content hash[:2]>/<content hash>-<argument hash>.json`."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def _write(self, path: Path, data: Any) -> None:
        write_json(path, data, tmp_dir=self.root / TMP)

    def sweep_tmp(self, *, older_than: float = 600.0) -> int:
        """Remove temporary files of killed writers (older than `older_than` seconds: a live
        writer holds one for milliseconds); returns how many."""
        return sweep(self.root / TMP, older_than=older_than)

    def path(self, content: str, fingerprint: str, args: str = "") -> Path:
        arg = hashlib.sha256(args.encode()).hexdigest()[:8]
        return self.root / fingerprint / content[:2] / f"{content}-{arg}.json"

    def get(self, content: str, fingerprint: str, args: str = "") -> Findings | None:
        """The cached findings, None where there are none, or `DamagedEntry` where the entry
        does not read."""
        path = self.path(content, fingerprint, args)
        try:
            return Findings.from_dict(_unsealed(json.loads(path.read_text())))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:  # JSON cut short, base64 or fields changed
            raise _set_aside(path, e) from None

    def has(self, content: str, fingerprint: str, args: str = "") -> bool:
        return self.path(content, fingerprint, args).is_file()

    def put(self, content: str, fingerprint: str, findings: Findings, args: str = "") -> Path:
        path = self.path(content, fingerprint, args)
        self._write(path, _sealed(findings.to_dict(with_png=True)))
        self.error_path(content, fingerprint, args).unlink(missing_ok=True)
        return path

    def error_path(self, content: str, fingerprint: str, args: str = "") -> Path:
        path = self.path(content, fingerprint, args)
        return path.with_name(path.name.removesuffix(".json") + ".error.json")

    def put_error(self, content: str, fingerprint: str, reason: str, args: str = "", *, status: str = "quarantined",
                  transient: bool = False) -> Path:
        """Record why there are no findings (`status`: `quarantined` for a failure, `skipped`
        for an item the expert does not take; `transient`: the environment's failure, which a
        later build tries again). Render reports them."""
        path = self.error_path(content, fingerprint, args)
        self._write(path, {"status": status, "reason": reason, "transient": transient})
        return path

    def settled(self, content: str, fingerprint: str, args: str = "") -> bool:
        """Findings are cached, or a failure that running again would repeat."""
        if self.has(content, fingerprint, args):
            return True
        try:
            return not json.loads(self.error_path(content, fingerprint, args).read_text()).get("transient", True)
        except (FileNotFoundError, ValueError):
            return False

    def get_error(self, content: str, fingerprint: str, args: str = "") -> tuple[str, str] | None:
        """(status, reason) of a recorded failure, or None."""
        path = self.error_path(content, fingerprint, args)
        try:
            d = json.loads(path.read_text())
            return str(d["status"]), str(d["reason"])
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as e:  # not settled either (`settled`): the next build runs it again
            _set_aside(path, e)
            return None

    # -- runs in progress: an item that kills its expert's process is set aside, not retried forever

    def running_path(self, content: str, fingerprint: str, args: str = "") -> Path:
        path = self.path(content, fingerprint, args)
        return path.with_name(path.name.removesuffix(".json") + ".running.json")

    def mark_running(self, content: str, fingerprint: str, build: str, args: str = "", *, tries: int = 1) -> None:
        """Mark the step as running for `build`, as its `tries`-th try."""
        mark = {"build": build, "tries": tries, "host": socket.gethostname(), "pid": os.getpid()}
        self._write(self.running_path(content, fingerprint, args), mark)

    @contextmanager
    def running(self, content: str, fingerprint: str, build: str, args: str = "", *, tries: int = 1) -> Iterator[None]:
        """Mark the run while the block runs. A mark of this build found when it starts means a
        process died in it before (out of memory, a crash in native code; Ray restarted the
        worker and retried): after `tries` deaths, `DiedHere` instead of running into the next
        crash. A mark of an earlier build, killed as a whole, does not count (a resumed build
        runs the item again), nor does one whose process is still running here (the same step
        of another item with the same files, at the same time)."""
        path = self.running_path(content, fingerprint, args)
        try:
            mark = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            mark = {}
        deaths = int(mark.get("tries", 1)) if isinstance(mark, dict) and mark.get("build") == build and not _alive_here(mark) else 0
        if deaths >= tries:
            path.unlink(missing_ok=True)
            raise DiedHere(content, deaths)
        self.mark_running(content, fingerprint, build, args, tries=deaths + 1)
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
        except (ValueError, TypeError) as e:  # `render` then lacks the older configurations: a build records its own again
            _set_aside(self.registry_path, e)
            return []

    def register(self, entries: list[dict[str, Any]]) -> None:
        """Record expert configurations (dicts with at least `spec` and `fingerprint`); an
        entry with the same spec and fingerprint replaces the old one."""
        keep = [e for e in self.experts() if not any(_same(e, n) for n in entries)]
        self._write(self.registry_path, keep + entries)


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sealed(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, SEAL: _digest(data)}


def _unsealed(data: Any) -> Any:
    """An entry's contents, checked against its seal (where it has one)."""
    if isinstance(data, dict) and SEAL in data:
        seal = data.pop(SEAL)
        if seal != _digest(data):
            raise ValueError("its contents do not match their sha256 (bytes changed on disk)")
    return data


def _set_aside(path: Path, error: Exception) -> DamagedEntry:
    """Move a cache file that does not read out of the way (kept beside it as evidence), say
    so naming it, and return the error for the caller, which says why without the path (a
    reason may reach the dataset card)."""
    aside = path.with_name(path.name + DAMAGED)
    try:
        os.replace(path, aside)
    except FileNotFoundError:  # another reader of the same entry moved it first
        pass
    why = f"{type(error).__name__}: {brief(error)}"
    log.warning("%s: does not read (%s); moved to %s, and the next build makes it again", path, why, aside.name)
    return DamagedEntry(why)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.get("spec") == b.get("spec") and a.get("fingerprint") == b.get("fingerprint")


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
