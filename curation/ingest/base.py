"""The contract every source reader fills: `scan` turns a folder's files into StudyItems and
ledger rows; `load` turns one StudyItem into a Volume.

Readers are looked up in an explicit table (`READERS`, filled in `curation.ingest`), keyed by the
manifest's `kind`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from curation.items import LedgerEntry, StudyItem, Volume
from curation.keys import Keyer


@dataclass(slots=True)
class Scan:
    """A reader's answer for one source: the items it made and a ledger row for each file it
    looked at (indexed files included). Files it did not claim are ledgered by the indexer."""

    items: list[StudyItem] = field(default_factory=list)
    ledger: list[LedgerEntry] = field(default_factory=list)


class SourceReader(ABC):
    """One per source `kind`. Constructed once per source; `scan` on the driver, `load` anywhere
    (it must only need the item and the spec, so that Ray workers can call it)."""

    kind: ClassVar[str]

    def __init__(self, spec: Any, keyer: Keyer):
        self.spec = spec
        self.root: Path = Path(spec.root)
        self.keyer = keyer

    @abstractmethod
    def scan(self, files: list[str]) -> Scan:
        """`files`: every file under the root, as sorted POSIX paths relative to it."""

    @abstractmethod
    def load(self, item: StudyItem) -> Volume:
        """Voxels in RAS with CT in HU; raises `ItemError` naming the item's file on failure."""

    def load_labels(self, item: StudyItem) -> Volume | None:
        """The item's ground-truth label map (a NIfTI on the item's grid), if it has one."""
        from curation.ingest.nifti import load_nifti  # nifti builds on this module

        return load_nifti(self.root / item.label_uri) if item.label_uri else None

    def entry(self, uri: str, status: str, reason: str, item_id: str | None = None) -> LedgerEntry:
        return LedgerEntry(uri=uri, source=self.spec.name, status=status, reason=reason, item_id=item_id)  # type: ignore[arg-type]
