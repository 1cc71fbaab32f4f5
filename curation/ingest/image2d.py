"""2D images (PNG, JPEG, single-frame CR/DX/MG DICOM, with or without a file extension) with an
optional labels table.

Arrays come out as (x, y) = (column, row), like every other Volume, with the pixel spacing
on the diagonal of the affine; a plain PNG has no patient geometry, so its spacing is 1 mm.

Scanning reads headers only: a picture's size from its first bytes and its end marker (a cut
file is quarantined), a DICOM file's header through the DICOM reader's fast path. A declared size
over `max_pixels` is set aside before anything is decoded, and the loader reads and checks the
size again, the same way, before decoding: a 140 KB PNG can claim 12000 × 12000 pixels (a
decompression bomb). The patient of an
image is, in order: the labels table's `patient_id`, the DICOM PatientID, the file's stem.
"""

from __future__ import annotations

import csv
import os
import struct
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import numpy as np

from curation.errors import CurationError, ItemError
from curation.ingest.base import Record, Scan, SetAside, SizeCaps, SourceReader
from curation.ingest.dicom import NOT_DICOM_SUFFIXES
from curation.ingest.dicom_headers import MEDIA_DIRECTORY, NOT_DICOM, Header, read_header
from curation.ingest.dicom_pixels import read_image_2d
from curation.ingest.dicom_series import MEDIA_DIRECTORY_REASON, burned_in_reason
from curation.ingest.reasons import describe
from curation.items import StudyItem, Volume

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_SUFFIXES = (".dcm", ".dicom")
DICOM_2D_MODALITIES = ("CR", "DX", "MG")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
HEAD_BYTES = 65536  # a JPEG's frame header follows its EXIF/ICC segments, within the first 64 KB
JPEG_END = b"\xff\xd9"
JPEG_TAIL = 1024  # bytes searched for the end-of-image marker (some writers pad after it)


def _suffix(uri: str) -> str:
    return os.path.splitext(uri)[1].lower()


@dataclass(frozen=True, slots=True)
class ImageFacts:
    """A 2D image's header: (width, height), spacing (x, y) in mm, modality, and the DICOM
    PatientID ("" for a picture or a file without one)."""

    shape: tuple[int, int]
    spacing: tuple[float, float]
    modality: str
    patient_id: str = ""


def read_labels_table(path: Path) -> dict[str, dict[str, Any]]:
    """`image` → {"patient_id": …, "labels": {name: 0/1}} from a CSV with an `image` column."""
    return dict(labels_rows(path))


def labels_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """The labels table's rows, checked one by one as they are read (a wrong value is a
    `CurationError` naming the line and the column), without holding the table."""
    if not path.is_file():
        raise CurationError(f"labels table not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "image" not in reader.fieldnames:
                raise CurationError(f"{path}: a labels table needs a header row with an 'image' column")
            for n, row in enumerate(reader, start=2):
                labels = {}
                for k, v in row.items():
                    if k in ("image", "patient_id"):
                        continue
                    if v not in ("0", "1", "0.0", "1.0"):
                        raise CurationError(f"{path}, line {n}: column {k!r} must be 0 or 1, got {v!r}")
                    labels[k] = int(float(v))
                yield row["image"], {"patient_id": row.get("patient_id") or None, "labels": labels}
    except (UnicodeDecodeError, csv.Error) as e:
        raise CurationError(f"{path}: cannot read the labels table as UTF-8 CSV ({e})") from e


def picture_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG or JPEG header, after checking that the file ends as one
    must (a copy cut short is caught here, not at decode time). Decodes nothing: one open, the
    first bytes and the last; PIL reads the header of anything else (or anything odd)."""
    with open(path, "rb") as f:
        head = f.read(4096)
        if head.startswith(b"\xff\xd8") and jpeg_size(head) is None:
            head += f.read(HEAD_BYTES - len(head))
        size = f.seek(0, 2)
        f.seek(max(0, size - JPEG_TAIL))
        tail = f.read()
    if head.startswith(PNG_SIGNATURE) and head[12:16] == b"IHDR":
        if PNG_END not in tail:
            raise ValueError("truncated PNG (no IEND chunk at the end)")
        return struct.unpack(">II", head[16:24])
    if head.startswith(b"\xff\xd8"):
        if JPEG_END not in tail:
            raise ValueError("truncated JPEG (no end-of-image marker)")
        found = jpeg_size(head)
        if found is not None:
            return found
    from PIL import Image  # here: only pictures of an unusual kind need PIL to read their header

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            return img.width, img.height


def jpeg_size(head: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's start-of-frame marker, or None if it is not in `head`."""
    pos = 2
    while pos + 9 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", head[pos + 2 : pos + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", head[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    return None


def looks_like_dicom(path: Path) -> bool:
    """Whether a file starts as DICOM: 'DICM' after the 128-byte preamble, or a bare dataset
    starting with a group 0002 or 0008 tag (old files, some vendors' DIRFILEs)."""
    with open(path, "rb") as f:
        head = f.read(132)
    return head[128:132] == b"DICM" or head[:2] in (b"\x02\x00", b"\x08\x00")


def declared_picture_size(path: Path, where: str) -> tuple[int, int]:
    """`picture_size`, or a `SetAside` with the reason and status the ledger gives a picture that
    cannot be read: a decompression bomb (PIL's own limit, for pictures whose header PIL reads)
    is skipped, anything else quarantined as corrupt. The scan and the loader both ask this, so a
    picture reads the same wherever it is caught."""
    try:
        return picture_size(path)
    except Exception as e:  # PIL raises many types for files it cannot read, bombs among them
        if type(e).__name__ == "DecompressionBombError":
            raise SetAside(where, f"decompression bomb: {describe(e, path, where)}", "skipped") from e
        raise SetAside(where, f"corrupt: {describe(e, path, where)}", "quarantined") from e


def image_kind(path: Path, uri: str) -> str | None:
    """"picture", "dicom", or None for a file that is no image of a 2D source: by its name, and
    for a name without a known suffix by its first 132 bytes (`looks_like_dicom`). Nothing is
    parsed."""
    suffix = _suffix(uri)
    if suffix in PICTURE_SUFFIXES:
        return "picture"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if not uri.lower().endswith(NOT_DICOM_SUFFIXES) and looks_like_dicom(path):
        return "dicom"
    return None


def load_picture(path: Path, *, where: str, caps: SizeCaps) -> np.ndarray:
    """A PNG or JPEG as (x, y). Its size is read and checked as the scan reads and checks it
    (`declared_picture_size`, `SizeCaps`), before anything is decoded: a picture that grew
    since indexing is refused in the scan's words."""
    caps.refuse(where, declared_picture_size(path, where))
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            if img.mode not in ("L", "I;16", "I", "F"):
                img = img.convert("L")
            return np.asarray(img).T.copy()


class Image2DReader(SourceReader):
    """Each picture or CR/DX/MG DICOM file is an item; the labels table, if any, gives each its
    patient and its ground-truth labels."""

    kind = "image2d"

    def read_one(self, uri: str) -> Record | None:
        if uri == self._table_uri:
            return Record(uri, uri, "indexed", "labels table")
        facts = self.image_header(uri)
        return None if facts is None else Record(uri, uri, facts=facts)

    def image_header(self, uri: str) -> ImageFacts | None:
        """The image's facts, or None when the file is not an image this reader claims; an image
        that cannot be used raises a `SetAside` with its reason and status."""
        path = self.path(uri)
        kind = image_kind(path, uri)
        if kind == "picture":
            return ImageFacts(declared_picture_size(path, uri), (1.0, 1.0), self.spec.modality)
        if kind == "dicom":
            h = read_header(self.root, uri)
            if h.problem == f"corrupt: {NOT_DICOM}" and _suffix(uri) not in DICOM_SUFFIXES:
                return None  # it only started like DICOM
            return self._dicom_facts(h)
        return None

    def _dicom_facts(self, h: Header) -> ImageFacts:
        uri = h.uri
        if h.problem:
            raise SetAside(uri, h.problem, "quarantined")
        if h.sop_class == MEDIA_DIRECTORY:
            raise SetAside(uri, MEDIA_DIRECTORY_REASON, "skipped")
        if not h.has_pixels:
            raise SetAside(uri, f"no pixel data (SOPClassUID {h.sop_class or 'missing'})", "skipped")
        if h.n_frames != 1 or h.modality not in DICOM_2D_MODALITIES:
            raise SetAside(uri, f"not a single-frame {'/'.join(DICOM_2D_MODALITIES)} image (Modality {h.modality or 'none'}, {h.n_frames} frames)",
                           "skipped")
        if h.samples != 1:
            raise SetAside(uri, f"unsupported: SamplesPerPixel {h.samples} (colour image)", "skipped")
        if not getattr(self.spec, "keep_burned_in", False) and (reason := burned_in_reason(h)):
            raise SetAside(uri, reason, "skipped")
        row_spacing, col_spacing = h.pixel_spacing or (1.0, 1.0)
        return ImageFacts((h.cols, h.rows), (float(col_spacing), float(row_spacing)), h.modality, h.patient_id.strip())

    def combine(self, key: str, records: list[Record], out: Scan) -> None:
        (record,) = records
        facts: ImageFacts = record.facts
        if too_large := self.too_large(facts.shape):
            out.ledger.append(self.entry(record.uri, "skipped", too_large))
            return
        row = self._table.get(record.uri)
        patient = (row or {}).get("patient_id") or facts.patient_id or _stem(record.uri)
        item = self.item(record.uri, facts, patient=patient, attrs={"labels": row["labels"]} if row else {})
        out.items.append(item)
        out.ledger.append(self.entry(record.uri, "indexed", "image" if row or not self.spec.labels else "image (not in labels table)", item.item_id))

    def prepare(self) -> None:
        """Check the labels table on the driver, streaming: the workers build the lookup."""
        if self.spec.labels is not None:
            for _ in labels_rows(Path(self.spec.labels)):
                pass

    @cached_property
    def _table(self) -> dict[str, dict[str, Any]]:
        return read_labels_table(Path(self.spec.labels)) if self.spec.labels is not None else {}

    @cached_property
    def _table_uri(self) -> str:
        return relative_uri(Path(self.spec.labels), self.root) if self.spec.labels is not None else ""

    def item(self, uri: str, facts: ImageFacts, *, patient: str, attrs: dict[str, Any], record: Any = None) -> StudyItem:
        """The item of image `uri`; `record` tells apart several items of one image (question–answer records)."""
        return StudyItem(
            item_id=self.keyer("item", self.spec.name, uri, *([] if record is None else [record])),
            patient_key=self.keyer("patient", patient),
            study_key=self.keyer("study", self.spec.name, uri),
            source=self.spec.name,
            kind="image2d",
            modality=facts.modality,
            shape=list(facts.shape),
            spacing=list(facts.spacing),
            n_files=1,
            uris=[uri],
            attrs=attrs,
        )

    def load(self, item: StudyItem) -> Volume:
        where = item.uris[0]
        self.refuse_too_large(where, item.shape)
        path = self.path(where)
        try:
            if _suffix(where) in PICTURE_SUFFIXES:
                array = load_picture(path, where=where, caps=self.caps)
            else:
                _, array = read_image_2d(self.root, where, frame=(item.shape[1], item.shape[0]))
        except ItemError:
            raise
        except Exception as e:  # PIL raises many types; bombs and MemoryError included
            raise ItemError(where, f"cannot read pixels ({describe(e, path, where)})") from e
        affine = np.diag([item.spacing[0], item.spacing[1], 1.0, 1.0])
        return Volume(array=array, affine=affine)


def _stem(uri: str) -> str:
    return os.path.splitext(uri.rsplit("/", 1)[-1])[0]


def relative_uri(path: Path, root: Path) -> str:
    """`path` as a URI under `root`, or "" when it lies elsewhere."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return ""
