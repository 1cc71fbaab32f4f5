"""The small records passed between stages: what was found (StudyItem), what became of each
file (LedgerEntry), and what a loader returns (Volume).

Arrays stay inside `Volume`; StudyItem and LedgerEntry are plain, hashable-free data that go to
Parquet unchanged (`INDEX_SCHEMA`, `LEDGER_SCHEMA`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import pyarrow as pa

# The kinds of source a manifest can name, and the kind of item each gives (a `qa` record is a
# 2D image with its question and answer). The one list: readers, templates and experts use it.
SourceKind = Literal["dicom", "nifti", "nifti_group", "image2d", "qa"]
ItemKind = Literal["dicom", "nifti", "nifti_group", "image2d"]
SOURCE_KINDS: tuple[str, ...] = get_args(SourceKind)
ITEM_KINDS: tuple[str, ...] = get_args(ItemKind)
ITEM_KIND: dict[str, str] = {**{k: k for k in ITEM_KINDS}, "qa": "image2d"}

_ESCAPED = re.compile(r"%(25|[89A-F][0-9A-F])")


def uri_text(relative: str) -> str:
    """A relative path as a file system gave it (`os.fsdecode`: bytes that are not UTF-8 become
    lone surrogates) → the text every record carries: the path itself when it is valid UTF-8,
    else the path with each undecodable byte as `%XX` and each `%` as `%25`.

    Why: Arrow and Parquet strings must be valid UTF-8, and a name of any bytes must still lead
    back to its file (`source_path`). Valid names stay as they are, so the index reads as the
    archive does; `walk` sets aside the rare odd name whose escaped text is another file's name.

    >>> uri_text("a/IM1.dcm"), uri_text(os.fsdecode(b"caf\\xe9/50%.dcm"))
    ('a/IM1.dcm', 'caf%E9/50%25.dcm')
    """
    if not any("\udc80" <= ch <= "\udcff" for ch in relative):
        return relative
    return "".join("%25" if ch == "%" else f"%{ord(ch) - 0xDC00:02X}" if "\udc80" <= ch <= "\udcff" else ch for ch in relative)


def uri_name(text: str) -> str:
    """The inverse of `uri_text` for an escaped text: the path with lone surrogates, which
    Python's file functions turn back into the original bytes.

    >>> os.fsencode(uri_name("caf%E9/50%25.dcm"))
    b'caf\\xe9/50%.dcm'
    """
    return _ESCAPED.sub(lambda m: "%" if m.group(1) == "25" else chr(0xDC00 + int(m.group(1), 16)), text)


def source_path(root: Path, uri: str) -> Path:
    """The file a record's `uri` names under `root`. A name that was valid UTF-8 is used as it is;
    only when no such file exists and the text holds escapes is it read as an escaped name."""
    path = root / uri
    if "%" not in uri or os.path.lexists(path):
        return path
    return root / uri_name(uri)

Status = Literal["indexed", "skipped", "quarantined"]


@dataclass(slots=True)
class StudyItem:
    """One unit an expert runs on: a DICOM series, a NIfTI volume, one case's NIfTI
    sequences, or a 2D image.

    `uris` are relative to the source root and in load order (DICOM: sorted along the slice
    normal; groups: in `channels` order). `attrs` holds kind-specific facts that later stages
    may need (gantry tilt, uneven spacing, mosaic, labels of a 2D image); it must be JSON-safe
    and must not hold raw identifiers.
    """

    item_id: str
    patient_key: str
    study_key: str
    source: str
    kind: ItemKind
    modality: str
    shape: list[int]
    spacing: list[float]
    n_files: int
    uris: list[str]
    series_number: int | None = None
    channels: list[str] = field(default_factory=list)
    label_uri: str | None = None
    frame: int | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        """The item as an index row (attrs as JSON). Built field by field: `asdict` deep-copies
        every list and dict, which costs more than the rest of indexing an image."""
        row = {name: getattr(self, name) for name in _ITEM_FIELDS}
        row["attrs"] = json.dumps(self.attrs, sort_keys=True)
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "StudyItem":
        values = dict(row)
        values["attrs"] = json.loads(values.get("attrs") or "{}")
        values["shape"] = list(values["shape"])
        values["spacing"] = list(values["spacing"])
        values["uris"] = list(values["uris"])
        values["channels"] = list(values.get("channels") or [])
        return cls(**{k: values[k] for k in cls.__slots__ if k in values})  # type: ignore[attr-defined]


_ITEM_FIELDS = tuple(f.name for f in fields(StudyItem))


@dataclass(slots=True, frozen=True)
class LedgerEntry:
    """What became of one discovered file. Every file under a source root gets exactly one."""

    uri: str
    source: str
    status: Status
    reason: str
    item_id: str | None = None


@dataclass(slots=True)
class Volume:
    """Voxels and where they are.

    `array` is in NIfTI voxel order: (x, y, z) for a volume, (x, y, z, c) for a multi-sequence
    group, (x, y) for a 2D image. `affine` maps voxel indices to RAS millimetres (4×4).
    CT is in Hounsfield units (rescale applied).
    """

    array: np.ndarray
    affine: np.ndarray
    channels: tuple[str, ...] = ()


INDEX_SCHEMA = pa.schema(
    [
        ("item_id", pa.string()),
        ("patient_key", pa.string()),
        ("study_key", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("modality", pa.string()),
        ("shape", pa.list_(pa.int64())),
        ("spacing", pa.list_(pa.float64())),
        ("n_files", pa.int64()),
        ("uris", pa.list_(pa.string())),
        ("series_number", pa.int64()),
        ("channels", pa.list_(pa.string())),
        ("label_uri", pa.string()),
        ("frame", pa.int64()),
        ("attrs", pa.string()),
    ]
)

LEDGER_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("item_id", pa.string()),
    ]
)


def items_table(items: list[StudyItem]) -> pa.Table:
    return pa.Table.from_pylist([i.to_row() for i in items], schema=INDEX_SCHEMA)


def ledger_table(entries: list[LedgerEntry]) -> pa.Table:
    return pa.Table.from_pylist([asdict(e) for e in entries], schema=LEDGER_SCHEMA)


def items_from_table(table: pa.Table) -> list[StudyItem]:
    return [StudyItem.from_row(r) for r in table.to_pylist()]


def ledger_from_table(table: pa.Table) -> list[LedgerEntry]:
    return [LedgerEntry(**{k: r[k] for k in LEDGER_SCHEMA.names}) for r in table.to_pylist()]
