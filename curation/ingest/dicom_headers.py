"""Read what the DICOM scan needs from each file's header — never its pixel data — in parallel.

A `Header` is one file's facts: identity (UIDs, modality, ImageType), pixel layout, geometry
(one position per slice the file holds: one for a plain image, one per frame of an enhanced
multi-frame, one per tile of a Siemens mosaic) and rescale. Reading stops right before the pixel
data element; that file position also gives a cheap truncation check, so a file cut inside its
pixels (headers intact) is quarantined at scan time instead of failing a build later.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from curation.ingest.dicom_pixel_element import check_pixel_element
from curation.ingest.dicom_csa import CREATOR as CSA_CREATOR, IMAGE_INFO as CSA_IMAGE_INFO, CsaError, mosaic_geometry
from curation.ingest.dicom_quick import private_value, quick_header
from curation.ingest.dicom_values import as_list, floats, integer, number, positive, positive_pair, text
from curation.ingest.reasons import describe
from curation.items import source_path


NOT_DICOM = "not a DICOM file (no 'DICM' prefix and no readable header)"
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage: DICOMDIR, Philips DIRFILE


@dataclass(slots=True)
class Header:
    """One file's header facts. `problem` set means the file is unusable ("corrupt: ...");
    `unsupported` means it is readable but cannot become a volume (a skip reason)."""

    uri: str
    problem: str | None = None
    unsupported: str | None = None
    sop_class: str = ""
    series_uid: str = ""
    study_uid: str = ""
    patient_id: str = ""
    series_number: int | None = None
    modality: str = ""
    image_type: tuple[str, ...] | None = None
    burned_in: bool = False  # BurnedInAnnotation YES: the pixels hold text (names, dates) that may identify
    has_pixels: bool = False
    rows: int = 0
    cols: int = 0
    samples: int = 1
    n_frames: int = 1
    bits_allocated: int = 16
    bits_stored: int = 16
    signed: bool = False
    photometric: str = ""
    transfer_syntax: str = ""
    little_endian: bool = True
    implicit_vr: bool = False
    pixel_offset: int = 0
    tiles: int = 0  # Siemens mosaic: slices tiled into one frame
    orientation: tuple[float, ...] | None = None
    positions: np.ndarray | None = None  # (slices in this file, 3), LPS mm
    pixel_spacing: tuple[float, float] | None = None  # DICOM order: (between rows, between columns)
    slice_gap: float | None = None  # SpacingBetweenSlices, else SliceThickness
    slopes: np.ndarray = field(default_factory=lambda: np.ones(1))  # one per slice in this file
    intercepts: np.ndarray = field(default_factory=lambda: np.zeros(1))

    def __getstate__(self) -> tuple[object, ...]:
        """Plain values (numpy arrays as lists): headers travel between processes by
        the thousand, and pickling small arrays costs more than the rest of the header."""
        return tuple(_plain(getattr(self, name)) for name in _FIELDS)

    def __setstate__(self, state: tuple[object, ...]) -> None:
        for name, value in zip(_FIELDS, state):
            object.__setattr__(self, name, np.array(value, float) if name in _ARRAYS and value is not None else value)

    @property
    def slice_shape(self) -> tuple[int, int]:
        """(rows, columns) of one slice: a mosaic tile, or the whole frame."""
        if self.tiles:
            grid = mosaic_grid(self.tiles)
            return self.rows // grid, self.cols // grid
        return self.rows, self.cols

    @property
    def n_slices(self) -> int:
        return self.tiles or self.n_frames


_FIELDS = tuple(f.name for f in fields(Header))
_ARRAYS = frozenset({"positions", "slopes", "intercepts"})


def _plain(value: object) -> object:
    return value.tolist() if isinstance(value, np.ndarray) else value


def mosaic_grid(tiles: int) -> int:
    """Tiles per mosaic row (and column): Siemens packs n slices into a ceil(sqrt(n)) square."""
    return int(math.ceil(math.sqrt(tiles)))


def read_header(root: Path, uri: str) -> Header:
    """One file's header; never raises: an unreadable file comes back with `problem` set (a
    reason without the file's path)."""
    path = source_path(root, uri)
    try:
        size = path.stat().st_size
        if size == 0:
            return Header(uri, problem="corrupt: empty file")
        with open(path, "rb") as fp:
            return open_header(fp, uri, size)
    except Exception as e:  # a per-file boundary: whatever pydicom raises, the file is set aside
        return Header(uri, problem=f"corrupt: {one_line(e, path, uri)}")


def open_header(fp: BinaryIO, uri: str, size: int) -> Header:
    """The header of an open file of `size` bytes, and a check that its pixel data fits.

    Plain files take the fast path (`dicom_quick`), Siemens mosaics included (their CSA
    header is found by the same walk); multi-frame files need pydicom's Dataset for their
    functional groups, and anything the fast path does not handle falls back to pydicom too."""
    quick = quick_header(fp, size)
    if quick is not None:
        values = quick.values
        if quick.media_sop_class and "SOPClassUID" not in values:
            values = {**values, "SOPClassUID": quick.media_sop_class}
        h = header_from_values(values.get, uri, quick.transfer_syntax, quick.implicit_vr, True)
        needs_dataset = _needs_dataset(h)
        mosaic = needs_dataset and h.n_frames == 1  # a single frame needs the Dataset only for its CSA header
        csa = private_value(fp, size, 0x0029, CSA_CREATOR, CSA_IMAGE_INFO) if mosaic else None
        if not needs_dataset or csa is not None:
            h.has_pixels = h.has_pixels and quick.pixel_offset is not None
            h.pixel_offset = quick.pixel_offset if quick.pixel_offset is not None else size
            if csa is not None:
                _add_mosaic_geometry(h, csa)
            return _checked(fp, h, size)
    fp.seek(0)
    ds = _read_dataset(fp)
    offset = fp.tell()
    meta = getattr(ds, "file_meta", None)
    implicit, little = ds.original_encoding
    media = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    get = ds.get if ds.get("SOPClassUID") or not media else (lambda k, d=None: media if k == "SOPClassUID" else ds.get(k, d))
    h = header_from_values(
        get, uri, str(meta.get("TransferSyntaxUID", "")) if meta is not None else "",
        implicit is not False, little is not False,
    )
    h.pixel_offset = offset
    if h.problem is None and h.has_pixels:
        if h.n_frames > 1:
            _add_frame_geometry(ds, h)
        elif h.image_type and "MOSAIC" in h.image_type:
            _add_mosaic_geometry(h, _csa_of(ds))
    return _checked(fp, h, size)


def _needs_dataset(h: Header) -> bool:
    return h.problem is None and h.has_pixels and (h.n_frames > 1 or bool(h.image_type and "MOSAIC" in h.image_type))


def _checked(fp: BinaryIO, h: Header, size: int) -> Header:
    """Check the pixel data element (see `dicom_pixel_element`) where the header ended."""
    if h.has_pixels and h.problem is None:
        fp.seek(h.pixel_offset)
        element = check_pixel_element(fp, h, size)
        h.has_pixels, h.problem = element.present, element.problem
    return h


def _read_dataset(fp: BinaryIO) -> Any:
    """dcmread up to the pixels. A file without the 128-byte preamble and 'DICM' (an old bare
    dataset) is tried once more if it starts like one (a group 0002 or 0008 tag), and accepted
    only if it names a SOP class: pydicom's `force` reads almost any bytes as *something*.
    (pydicom is imported here, not at the top: plain files never need it, and it costs ~0.3 s.)"""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    try:
        return dcmread(fp, stop_before_pixels=True)
    except InvalidDicomError:
        fp.seek(0)
    if fp.read(2) in (b"\x02\x00", b"\x08\x00"):
        fp.seek(0)
        try:
            ds = dcmread(fp, stop_before_pixels=True, force=True)
            meta = getattr(ds, "file_meta", None)
            for named in (ds.get("SOPClassUID"), meta.get("MediaStorageSOPClassUID") if meta is not None else None):
                if isinstance(named, str) and named:
                    return ds
        except Exception:  # garbage after a plausible start: not DICOM either
            pass
    raise InvalidDicomError(NOT_DICOM)


def one_line(error: BaseException, *paths: object) -> str:
    """An exception as one ledger-friendly line, without paths (`curation.ingest.reasons`)."""
    text = describe(error, *paths)
    return text.removeprefix("InvalidDicomError: ") if type(error).__name__ == "InvalidDicomError" else text


def header_from_values(get: Callable[[str], Any], uri: str, syntax: str, implicit_vr: bool, little_endian: bool) -> Header:
    """The facts of one file from `get(keyword)` (a pydicom Dataset's `get`, or the fast
    path's decoded values): one function for both, so both give the same Header."""
    h = Header(
        uri,
        sop_class=text(get("SOPClassUID")),
        series_uid=text(get("SeriesInstanceUID")),
        study_uid=text(get("StudyInstanceUID")),
        patient_id=text(get("PatientID")),
        series_number=integer(get("SeriesNumber")),
        modality=text(get("Modality")),
        image_type=tuple(str(v).upper() for v in as_list(get("ImageType"))) if get("ImageType") is not None else None,
        burned_in=text(get("BurnedInAnnotation")).strip().upper() == "YES",
        transfer_syntax=syntax,
        implicit_vr=implicit_vr,
        little_endian=little_endian,
    )
    if h.sop_class == MEDIA_DIRECTORY:
        return h  # an index of other files: no series, no pixels, and nothing wrong with it
    if not h.series_uid or not h.study_uid:
        h.problem = "corrupt: missing SeriesInstanceUID or StudyInstanceUID"
        return h
    h.rows, h.cols = integer(get("Rows")) or 0, integer(get("Columns")) or 0
    h.has_pixels = h.rows > 0 and h.cols > 0
    if not h.has_pixels:
        return h
    h.samples = integer(get("SamplesPerPixel")) or 1
    h.n_frames = max(1, integer(get("NumberOfFrames")) or 1)
    h.bits_allocated = integer(get("BitsAllocated")) or 16
    h.bits_stored = integer(get("BitsStored")) or h.bits_allocated
    h.signed = integer(get("PixelRepresentation")) == 1
    h.photometric = text(get("PhotometricInterpretation")) or "MONOCHROME2"
    h.pixel_spacing = positive_pair(get("PixelSpacing")) or positive_pair(get("ImagerPixelSpacing"))
    h.slice_gap = positive(get("SpacingBetweenSlices")) or positive(get("SliceThickness"))
    h.orientation = floats(get("ImageOrientationPatient"), 6)
    position = floats(get("ImagePositionPatient"), 3)
    h.positions = np.array([position]) if position is not None else None
    h.slopes = np.array([number(get("RescaleSlope"), 1.0)])
    h.intercepts = np.array([number(get("RescaleIntercept"), 0.0)])
    return h


def _add_mosaic_geometry(h: Header, csa: bytes | None) -> None:
    """Tile positions of a Siemens mosaic from its CSA header (`dicom_csa`)."""
    try:
        h.tiles, h.positions, h.slice_gap = mosaic_geometry(
            csa, (h.rows, h.cols), h.orientation, h.pixel_spacing, None if h.positions is None else h.positions[0], h.slice_gap)
    except CsaError as e:
        h.unsupported = f"unsupported: mosaic without usable CSA header ({e})"
        return
    h.slopes, h.intercepts = np.resize(h.slopes, h.tiles), np.resize(h.intercepts, h.tiles)


def _csa_of(ds: Any) -> bytes | None:
    """The CSA image header of a pydicom Dataset, or None."""
    try:
        value = ds.private_block(0x0029, CSA_CREATOR)[CSA_IMAGE_INFO].value
    except (KeyError, ValueError):
        return None
    return value.encode("latin-1") if isinstance(value, str) else value


def _add_frame_geometry(ds: Any, h: Header) -> None:
    """Per-frame positions of an enhanced multi-frame image from its functional groups (each
    attribute per frame, else shared, else top level)."""
    from pydicom.dataset import Dataset

    per_frame = list(ds.get("PerFrameFunctionalGroupsSequence") or [])
    if len(per_frame) != h.n_frames:
        per_frame = [Dataset()] * h.n_frames
    shared = (ds.get("SharedFunctionalGroupsSequence") or [Dataset()])[0]

    def each(sequence: str, keyword: str) -> list[Any]:
        return [_functional(frame, shared, ds, sequence, keyword) for frame in per_frame]

    orientations = [floats(v, 6) for v in each("PlaneOrientationSequence", "ImageOrientationPatient")]
    positions = [floats(v, 3) for v in each("PlanePositionSequence", "ImagePositionPatient")]
    if any(o is None for o in orientations) or any(p is None for p in positions):
        h.unsupported = "unsupported: multi-frame without a position and orientation for every frame"
        return
    if np.ptp(np.array(orientations, float), axis=0).max() > 1e-4:
        h.unsupported = "unsupported: multi-frame whose frames have different orientations"
        return
    h.orientation, h.positions = orientations[0], np.array(positions, float)
    first = per_frame[0]
    h.pixel_spacing = positive_pair(_functional(first, shared, ds, "PixelMeasuresSequence", "PixelSpacing")) or h.pixel_spacing
    h.slice_gap = (
        positive(_functional(first, shared, ds, "PixelMeasuresSequence", "SpacingBetweenSlices"))
        or positive(_functional(first, shared, ds, "PixelMeasuresSequence", "SliceThickness"))
        or h.slice_gap
    )
    h.slopes = np.array([number(v, 1.0) for v in each("PixelValueTransformationSequence", "RescaleSlope")])
    h.intercepts = np.array([number(v, 0.0) for v in each("PixelValueTransformationSequence", "RescaleIntercept")])


def _functional(frame: Any, shared: Any, ds: Any, sequence: str, keyword: str) -> Any:
    """An attribute of an enhanced image: from the frame's functional group, else the shared
    group, else the top level (where legacy-converted files keep it)."""
    for group in (frame, shared):
        items = group.get(sequence)
        if items and keyword in items[0]:
            return items[0].get(keyword)
    return ds.get(keyword)
