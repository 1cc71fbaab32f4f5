"""2D images (PNG, JPEG, single-frame CR/DX DICOM) with an optional labels table.

Arrays come out as (x, y) = (column, row), like every other Volume, with the pixel spacing
on the diagonal of the affine; a plain PNG has no patient geometry, so its spacing is 1 mm.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError

from curation.errors import CurationError, ItemError
from curation.ingest.base import Scan, SourceReader
from curation.items import StudyItem, Volume

PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg")
DICOM_2D_MODALITIES = ("CR", "DX", "MG")


def _suffix(uri: str) -> str:
    return Path(uri).suffix.lower()


def read_labels_table(path: Path) -> dict[str, dict[str, Any]]:
    """`image` → {"patient_id": …, "labels": {name: 0/1}} from a CSV with an `image` column."""
    if not path.is_file():
        raise CurationError(f"labels table not found: {path}")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (UnicodeDecodeError, csv.Error) as e:
        raise CurationError(f"{path}: cannot read the labels table as UTF-8 CSV ({e})") from e
    if not rows or "image" not in rows[0]:
        raise CurationError(f"{path}: a labels table needs a header row with an 'image' column")
    table = {}
    for n, row in enumerate(rows, start=2):
        labels = {}
        for k, v in row.items():
            if k in ("image", "patient_id"):
                continue
            if v not in ("0", "1", "0.0", "1.0"):
                raise CurationError(f"{path}, line {n}: column {k!r} must be 0 or 1, got {v!r}")
            labels[k] = int(float(v))
        table[row["image"]] = {"patient_id": row.get("patient_id") or None, "labels": labels}
    return table


# What reading a header raises for a file that is not a readable image.
UNREADABLE = (UnidentifiedImageError, OSError, pydicom.errors.InvalidDicomError, SyntaxError)


def _picture_header(path: Path) -> tuple[list[int], str]:
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        return [img.width, img.height], img.mode


def _dicom_header(path: Path) -> tuple[list[int], list[float], str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if "Rows" not in ds:
        raise ValueError("no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    modality = str(ds.get("Modality", ""))
    if frames != 1 or modality not in DICOM_2D_MODALITIES:
        raise ValueError(f"not a single-frame {'/'.join(DICOM_2D_MODALITIES)} image (Modality {modality}, {frames} frames)")
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or [1.0, 1.0]
    return [int(ds.Columns), int(ds.Rows)], [float(spacing[1]), float(spacing[0])], modality


def load_picture(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        if img.mode not in ("L", "I;16", "I", "F"):
            img = img.convert("L")
        return np.asarray(img).T.copy()


def load_dicom_2d(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.astype(np.float32)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        pixels = pixels.max() - pixels
    return pixels.T.copy()


class Image2DReader(SourceReader):
    """Each picture or CR/DX DICOM file is an item; the labels table, if any, gives each its
    patient and its ground-truth labels."""

    kind = "image2d"

    def scan(self, files: list[str]) -> Scan:
        scan = Scan()
        table: dict[str, dict[str, Any]] = {}
        if self.spec.labels is not None:
            table = read_labels_table(Path(self.spec.labels))
            table_uri = relative_uri(Path(self.spec.labels), self.root)
            if table_uri in files:
                scan.ledger.append(self.entry(table_uri, "indexed", "labels table"))
        for uri in files:
            suffix = _suffix(uri)
            if suffix in PICTURE_SUFFIXES or suffix in (".dcm", ".dicom"):
                self._file(uri, table.get(uri), scan)
        return scan

    def _file(self, uri: str, row: dict[str, Any] | None, scan: Scan) -> None:
        try:
            header = self.header(uri)
        except UNREADABLE as e:
            scan.ledger.append(self.entry(uri, "quarantined", f"corrupt: {type(e).__name__}: {e}"))
            return
        except ValueError as e:
            scan.ledger.append(self.entry(uri, "skipped", str(e)))
            return
        patient = (row or {}).get("patient_id") or Path(uri).stem
        item = self.item(uri, header, patient=patient, attrs={"labels": row["labels"]} if row else {})
        scan.items.append(item)
        scan.ledger.append(self.entry(uri, "indexed", "image" if row or not self.spec.labels else "image (not in labels table)", item.item_id))

    def header(self, uri: str) -> tuple[list[int], list[float], str]:
        """(shape, spacing, modality) from the file's header alone; a picture has neither spacing
        nor modality, so unit spacing and the source's modality stand in. Raises one of
        UNREADABLE, or ValueError for a DICOM that is not a 2D image."""
        path = self.root / uri
        if _suffix(uri) in PICTURE_SUFFIXES:
            shape, _ = _picture_header(path)
            return shape, [1.0, 1.0], self.spec.modality
        return _dicom_header(path)

    def item(self, uri: str, header: tuple[list[int], list[float], str], *, patient: str, attrs: dict[str, Any],
             record: Any = None) -> StudyItem:
        """The item of image `uri`; `record` tells apart several items of one image (question–answer records)."""
        shape, spacing, modality = header
        return StudyItem(
            item_id=self.keyer("item", self.spec.name, uri, *([] if record is None else [record])),
            patient_key=self.keyer("patient", patient),
            study_key=self.keyer("study", self.spec.name, uri),
            source=self.spec.name,
            kind="image2d",
            modality=modality,
            shape=shape,
            spacing=spacing,
            n_files=1,
            uris=[uri],
            attrs=attrs,
        )

    def load(self, item: StudyItem) -> Volume:
        path = self.root / item.uris[0]
        try:
            array = load_picture(path) if _suffix(path.name) in PICTURE_SUFFIXES else load_dicom_2d(path)
        except Exception as e:
            raise ItemError(item.uris[0], f"cannot read pixels ({type(e).__name__}: {e})") from e
        affine = np.diag([item.spacing[0], item.spacing[1], 1.0, 1.0])
        return Volume(array=array, affine=affine)


def relative_uri(path: Path, root: Path) -> str:
    """`path` as a URI under `root`, or "" when it lies elsewhere."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return ""
