"""The contract every source reader fills, in three steps:

- `read(uris)`: each file's header facts as a `Record` — per file, no state across files, so it
  runs in worker processes or Ray tasks over any partition of the file list;
- `group(records)`: records → StudyItems and one ledger row per record. Records with the same
  `key` (a SeriesInstanceUID, a case, an image) are always grouped together, so a series whose
  files lie in many partitions still becomes one item;
- `load(item)`: one StudyItem → a Volume.

`scan(files)` is `group(read(files))` in one process. The base class owns the safety net: a file
whose reading raises anything is a quarantined record, a group whose grouping raises is set aside
whole, each with a path-free reason (`curation.ingest.reasons`); neither stops the scan. A
`SetAside` error carries its own ledger status (a valid file this source does not use is
skipped, not quarantined), so no reader decides a status by reading its own messages.

One rule decides whether a declared size is too large, and words it: `size_problem`, against the
source's `SizeCaps`. The scan asks it of headers (`too_large`) and every loader asks it again of
the file it opens (`SizeCaps.refuse`), so the same oversize file reads the same in the ledger
wherever it is caught.

Readers are looked up in an explicit table (`READERS`, filled in `curation.ingest`), keyed by the
manifest's `kind`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from curation.errors import CurationError, ItemError
from curation.ingest.reasons import describe
from curation.items import LedgerEntry, Status, StudyItem, Volume, source_path
from curation.keys import Keyer


@dataclass(slots=True)
class Scan:
    """A reader's answer for some records: the items it made and a ledger row for each record
    (indexed files included). Files no reader claimed are ledgered by the indexer."""

    items: list[StudyItem] = field(default_factory=list)
    ledger: list[LedgerEntry] = field(default_factory=list)

    def extend(self, other: Scan) -> None:
        self.items.extend(other.items)
        self.ledger.extend(other.ledger)


@dataclass(slots=True)
class Record:
    """What reading one file found. `key`: records that must be grouped together share it.
    `status` set: the file's fate is already known (skipped, quarantined, or a support file
    such as a labels table, "indexed" without an item), with `reason`; `facts` is whatever the
    reader's `group` needs (picklable: records travel between processes)."""

    uri: str
    key: str
    status: Status | None = None
    reason: str = ""
    facts: Any = None


class SourceReader(ABC):
    """One per source `kind`. Constructed from the source's spec; `read` and `load` need nothing
    else (workers and Ray tasks call them), `group` also the keyer."""

    kind: ClassVar[str]

    def __init__(self, spec: Any, keyer: Keyer):
        self.spec = spec
        self.root: Path = Path(spec.root)
        self.keyer = keyer

    def path(self, uri: str) -> Path:
        """The file a uri names (uris are text: see `curation.items.uri_text`)."""
        return source_path(self.root, uri)

    def prepare(self) -> None:
        """Check the source's own input files (a labels table, a question–answer file) on the
        driver, before any worker starts: a mistake there is a `CurationError`."""

    # -- reading: one file at a time ------------------------------------------------------------

    def read(self, uris: Sequence[str]) -> list[Record]:
        """A record for each file this reader claims, in the order given (the indexer ledgers
        the others as unsupported)."""
        out = []
        for uri in uris:
            try:
                record = self.read_one(uri)
            except ItemError as e:
                record = Record(uri, uri, status_of(e), e.reason)
            except CurationError:
                raise  # the user's input (a manifest, a labels table) is wrong: stop and say so
            except Exception as e:  # a per-file boundary: whatever a library raises, the file is set aside
                record = Record(uri, uri, "quarantined", f"unreadable: {describe(e, self.path(uri), uri)}")
            if record is not None:
                out.append(record)
        return out

    @abstractmethod
    def read_one(self, uri: str) -> Record | None:
        """The file's record, or None when this reader does not claim the file."""

    # -- grouping: records of whole keys ----------------------------------------------------------

    def group(self, records: Sequence[Record]) -> Scan:
        """Items and one ledger row per record. Records must include every record of each key
        they hold; keys are grouped in order of their first record."""
        out = Scan()
        by_key: dict[str, list[Record]] = {}
        for r in records:
            if r.status is not None:
                out.ledger.append(self.entry(r.uri, r.status, r.reason))
            else:
                by_key.setdefault(r.key, []).append(r)
        for key, members in by_key.items():
            part = Scan()
            try:
                self.combine(key, members, part)
            except CurationError as e:
                if not isinstance(e, ItemError):
                    raise
                part = Scan(ledger=[self.entry(m.uri, status_of(e), e.reason) for m in members])
            except Exception as e:  # a per-group boundary
                reason = f"could not be grouped: {describe(e, *(m.uri for m in members))}"
                part = Scan(ledger=[self.entry(m.uri, "quarantined", reason) for m in members])
            out.extend(part)
        return out

    @abstractmethod
    def combine(self, key: str, records: list[Record], out: Scan) -> None:
        """Turn the undecided records of one key into items (and a ledger row for each record)."""

    def scan(self, files: Sequence[str]) -> Scan:
        """`group(read(files))` in this process: `files` are uris relative to the root."""
        return self.group(self.read(files))

    # -- loading ----------------------------------------------------------------------------------

    @abstractmethod
    def load(self, item: StudyItem) -> Volume:
        """Voxels in RAS with CT in HU; raises `ItemError` (`where`: the file, `reason`: what is
        wrong, without a path) on failure."""

    def load_labels(self, item: StudyItem) -> Volume | None:
        """The item's ground-truth label map (a NIfTI on the item's grid), if it has one."""
        from curation.ingest.nifti import load_nifti  # nifti builds on this module

        if not item.label_uri:
            return None
        return load_nifti(self.path(item.label_uri), where=item.label_uri, caps=self.caps)

    # -- helpers ----------------------------------------------------------------------------------

    def entry(self, uri: str, status: str, reason: str, item_id: str | None = None) -> LedgerEntry:
        return LedgerEntry(uri=uri, source=self.spec.name, status=status, reason=reason, item_id=item_id)  # type: ignore[arg-type]

    @property
    def caps(self) -> SizeCaps:
        return SizeCaps(max_voxels=self.spec.max_voxels, max_pixels=self.spec.max_pixels)

    def too_large(self, shape: Sequence[int], channels: int = 1) -> str | None:
        """The reason an item of this declared shape is set aside, or None (`size_problem`)."""
        return self.caps.problem(shape, channels)

    def refuse_too_large(self, where: str, shape: Sequence[int], channels: int = 1) -> None:
        """The same check at load time, on the shape the index holds, before anything is
        allocated (an index may have been written under other caps, or by hand)."""
        self.caps.refuse(where, shape, channels)


class SetAside(ItemError):
    """An `ItemError` that knows its ledger status: `skipped` for a file that is fine but not
    used (over a size cap, a decompression bomb, a case without all its sequences),
    `quarantined` for one that is damaged or inconsistent. Where items are loaded it is an
    `ItemError` like any other."""

    def __init__(self, where: str, reason: str, status: Status):
        super().__init__(where, reason)
        self.status: Status = status


def status_of(error: ItemError) -> Status:
    """The ledger status of a file set aside by `error`: its own for a `SetAside`, else quarantined."""
    return error.status if isinstance(error, SetAside) else "quarantined"


@dataclass(frozen=True, slots=True)
class SizeCaps:
    """A source's caps on declared sizes (the manifest's `max_voxels`, `max_pixels`), as readers
    and their loaders carry them."""

    max_voxels: int
    max_pixels: int

    def problem(self, shape: Sequence[int], channels: int = 1) -> str | None:
        return size_problem(shape, channels, max_voxels=self.max_voxels, max_pixels=self.max_pixels)

    def refuse(self, where: str, shape: Sequence[int], channels: int = 1) -> None:
        """Raise the `size_problem` of this declared shape as a skipped `SetAside`, if it has one."""
        if problem := self.problem(shape, channels):
            raise SetAside(where, problem, "skipped")


def size_problem(shape: Sequence[int], channels: int, *, max_voxels: int, max_pixels: int) -> str | None:
    """Why a declared size is refused, or None: the one place that decides and words it. Two
    dimensions are a 2D image, checked against `max_pixels`; any other shape is a volume (its
    channels counted), checked against `max_voxels`.

    >>> size_problem([65535, 65535, 1], 1, max_voxels=1 << 30, max_pixels=50_000_000)
    'declared size 65535×65535×1 (4.29 G voxels) exceeds max_voxels (1.07 G)'
    >>> size_problem([12000, 12000], 1, max_voxels=1 << 30, max_pixels=50_000_000)
    'declared size 12000×12000 (144 M pixels) exceeds max_pixels (50 M)'
    >>> size_problem([240, 240, 155], 4, max_voxels=30_000_000, max_pixels=50_000_000)
    'declared size 240×240×155×4 channels (35.7 M voxels) exceeds max_voxels (30 M)'
    """
    dims = [int(s) for s in shape]
    total = channels
    for d in dims:
        total *= d
    unit, cap, key = ("pixels", max_pixels, "max_pixels") if len(dims) == 2 else ("voxels", max_voxels, "max_voxels")
    if total <= cap:
        return None  # the usual case, at every scan and load: no message built
    shown = "×".join(str(d) for d in dims) + (f"×{channels} channels" if channels > 1 else "")
    return f"declared size {shown} ({_count(total)} {unit}) exceeds {key} ({_count(cap)})"


def _count(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return str(n)
