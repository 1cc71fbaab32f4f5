"""Findings cache: expert outputs stored by (item content hash, expert fingerprint, expert
argument) — `<VISTA3D(everything)>` and `<VISTA3D(hepatic tumor)>` are different results.

Experts are the expensive part of a build; everything after them is cheap and always redone.
A cached entry is one JSON file (PNG bytes base64-encoded) written to a temporary name and
renamed, so a killed build leaves either a whole entry or none, and a rerun picks up exactly
where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from curation.items import StudyItem
from expert_runners.findings import Findings


def content_hash(item: StudyItem, root: Path) -> str:
    """sha256 over the item's files (names relative to the source root, and their bytes), its
    label map and the frame it uses: a changed file means new findings."""
    h = hashlib.sha256()
    uris = list(item.uris) + ([item.label_uri] if item.label_uri else [])
    for uri in uris:
        h.update(uri.encode() + b"\0")
        with open(root / uri, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    h.update(f"frame={item.frame}".encode())
    return h.hexdigest()[:32]


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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(findings.to_dict(with_png=True), sort_keys=True))
        os.replace(tmp, path)
        return path
