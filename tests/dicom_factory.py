"""Small synthetic DICOM files written with pydicom, for tests and `bench/ingest.py`.

Everything here writes real Part-10 files (preamble, file meta, explicit VR little endian by
default) so the reader under test goes through the same code as for scanner data. Each series
remembers what it wrote — the HU volume in slice-position order and the LPS positions — so a
test can compare what the reader loads with what is known to be true.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def oblique_orientation(degrees: float = 20.0) -> tuple[float, ...]:
    """Row and column cosines of a plane rotated about the LPS x axis and then z: a known,
    non-trivial orientation whose three axes all mix patient directions."""
    a, b = np.deg2rad(degrees), np.deg2rad(degrees / 2)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    rot = rz @ rx
    return tuple(float(v) for v in np.concatenate([rot[:, 0], rot[:, 1]]))


@dataclass
class Series:
    """What was written: `paths` in slice-position order, `hu` as (cols, rows, slices) in the
    same order, `positions` the LPS ImagePositionPatient of each slice."""

    series_uid: str
    study_uid: str
    paths: list[Path]
    hu: np.ndarray
    positions: np.ndarray
    orientation: tuple[float, ...]
    pixel_spacing: tuple[float, float]
    extra: dict = field(default_factory=dict)


def base_dataset(
    *,
    sop_class: str = CT_IMAGE,
    modality: str = "CT",
    series_uid: str,
    study_uid: str,
    patient_id: str = "PAT-001",
    series_number: int = 1,
    image_type: tuple[str, ...] | None = ("ORIGINAL", "PRIMARY", "AXIAL"),
) -> Dataset:
    """A dataset with the patient/study/series/instance attributes every test file shares."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientName = "Test^Patient"
    ds.PatientID = patient_id
    ds.StudyDate = "20240102"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.Modality = modality
    if image_type is not None:
        ds.ImageType = list(image_type)
    return ds


def set_pixels(ds: Dataset, stored: np.ndarray, *, slope: float = 1.0, intercept: float = 0.0) -> None:
    """Attach stored values (frames, rows, cols) or (rows, cols), signed or unsigned 16-bit."""
    bits = 16 if stored.dtype.itemsize == 2 else 8
    ds.set_pixel_data(stored, "MONOCHROME2", bits, generate_instance_uid=False)
    if slope != 1.0 or intercept != 0.0 or ds.Modality == "CT":
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_series(
    folder: Path,
    *,
    rows: int = 12,
    cols: int = 16,
    n_slices: int = 10,
    orientation: tuple[float, ...] = AXIAL,
    origin: tuple[float, float, float] = (-40.0, -30.0, 100.0),
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    slice_steps: list[float] | None = None,
    slice_shift: tuple[float, float, float] = (0.0, 0.0, 0.0),
    series_uid: str | None = None,
    study_uid: str | None = None,
    seed: int = 0,
    slope: float = 1.0,
    intercept: float = -1024.0,
    shuffle: bool = True,
    name: str = "img",
    dtype: type = np.int16,
    extra: dict[str, object] | None = None,
    implicit_vr: bool = False,
    nested_sequences: bool = False,
    **dataset_kw: object,
) -> Series:
    """A single-frame series with slices along the plane normal (plus `slice_shift` per slice,
    which tilts the stack like a gantry tilt). InstanceNumbers are shuffled against position
    when `shuffle`, so a reader that sorts by InstanceNumber gets it wrong. `extra` attributes
    (keyword: value) are set on every slice; `implicit_vr` writes implicit VR little endian;
    `nested_sequences` adds undefined-length sequences and a private OB element before the
    pixel data, the structures a header walker must step over."""
    rng = np.random.default_rng(seed)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    steps = slice_steps if slice_steps is not None else [2.5] * (n_slices - 1)
    offsets = np.concatenate([[0.0], np.cumsum(steps)])
    positions = np.array(origin) + offsets[:, None] * normal + np.arange(len(offsets))[:, None] * np.array(slice_shift)
    hu = rng.integers(-1000, 2000, size=(cols, rows, len(offsets))).astype(np.int16)
    instance_numbers = rng.permutation(len(offsets)) + 1 if shuffle else np.arange(len(offsets)) + 1
    paths = []
    for k, pos in enumerate(positions):
        ds = base_dataset(series_uid=series_uid, study_uid=study_uid, **dataset_kw)  # type: ignore[arg-type]
        ds.InstanceNumber = int(instance_numbers[k])
        ds.ImagePositionPatient = [float(v) for v in pos]
        ds.ImageOrientationPatient = list(orientation)
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = 2.5
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        if implicit_vr:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        if nested_sequences:
            add_nested_sequences(ds)
        stored = np.round((hu[:, :, k].T - intercept) / slope).astype(dtype)
        set_pixels(ds, stored, slope=slope, intercept=intercept)
        paths.append(write(ds, folder / f"{name}{int(instance_numbers[k]):04d}.dcm"))
    return Series(series_uid, study_uid, paths, hu, positions, orientation, pixel_spacing)


def add_nested_sequences(ds: Dataset) -> None:
    """An undefined-length sequence holding an undefined-length item with its own
    undefined-length sequence, a defined-length sequence, and a private OB blob."""
    def code() -> Dataset:
        ds = Dataset()
        ds.CodeValue, ds.CodingSchemeDesignator, ds.CodeMeaning = "T-D0050", "SRT", "Tissue"
        return ds

    item = Dataset()
    item.ReferencedSOPClassUID = CT_IMAGE
    item.ReferencedSOPInstanceUID = generate_uid()
    item.PurposeOfReferenceCodeSequence = [code()]
    item["PurposeOfReferenceCodeSequence"].is_undefined_length = True
    item.is_undefined_length_sequence_item = True
    ds.ReferencedImageSequence = [item]
    ds["ReferencedImageSequence"].is_undefined_length = True
    ds.ProcedureCodeSequence = [code()]
    ds.private_block(0x0009, "M3 TEST", create=True).add_new(0x01, "OB", bytes(range(256)) * 4)


def write_multiframe(
    path: Path,
    *,
    rows: int = 10,
    cols: int = 14,
    n_frames: int = 9,
    orientation: tuple[float, ...] = AXIAL,
    origin: tuple[float, float, float] = (10.0, 20.0, -50.0),
    pixel_spacing: tuple[float, float] = (0.9, 0.6),
    step: float = 3.0,
    frame_order: list[int] | None = None,
    seed: int = 1,
    intercept: float = -1024.0,
) -> Series:
    """An enhanced CT file: orientation and spacing in the shared functional groups, one
    position per frame; frames stored in `frame_order` (a permutation of position order)."""
    rng = np.random.default_rng(seed)
    series_uid, study_uid = generate_uid(), generate_uid()
    normal = np.cross(orientation[:3], orientation[3:])
    positions = np.array(origin) + np.arange(n_frames)[:, None] * step * normal
    hu = rng.integers(-1000, 2000, size=(cols, rows, n_frames)).astype(np.int16)
    order = frame_order if frame_order is not None else list(range(n_frames))
    ds = base_dataset(sop_class=ENHANCED_CT_IMAGE, series_uid=series_uid, study_uid=study_uid,
                      image_type=("ORIGINAL", "PRIMARY", "AXIAL", "NONE"))
    shared = Dataset()
    plane = Dataset()
    plane.ImageOrientationPatient = list(orientation)
    measures = Dataset()
    measures.PixelSpacing = list(pixel_spacing)
    measures.SliceThickness = step
    transform = Dataset()
    transform.RescaleSlope = 1
    transform.RescaleIntercept = intercept
    transform.RescaleType = "HU"
    shared.PlaneOrientationSequence = [plane]
    shared.PixelMeasuresSequence = [measures]
    shared.PixelValueTransformationSequence = [transform]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k in order:
        item, pos = Dataset(), Dataset()
        pos.ImagePositionPatient = [float(v) for v in positions[k]]
        item.PlanePositionSequence = [pos]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    stored = np.stack([(hu[:, :, k].T - intercept).astype(np.int16) for k in order])
    ds.set_pixel_data(stored, "MONOCHROME2", 16, generate_instance_uid=False)
    write(ds, path)
    return Series(series_uid, study_uid, [path], hu, positions, orientation, pixel_spacing)


def csa_header(tags: list[tuple[str, str, list[str]]], version: int = 2) -> bytes:
    """A Siemens CSA header holding `tags` (name, VR, values as text), in the CSA2 ("SV10")
    layout or the older CSA1 one (whose item lengths count the first tag's items too)."""
    out = [b"SV10\x04\x03\x02\x01" if version == 2 else b"", struct.pack("<2I", len(tags), 77)]
    first_items = len(tags[0][2])
    for name, vr, values in tags:
        out.append(struct.pack("<64si4s3i", name.encode(), len(values), vr.encode(), 6, len(values), 77))
        for value in values:
            data = value.encode() + b"\0" if value else b""  # an empty item has no bytes at all
            words = (len(data), len(data), 77, len(data)) if version == 2 else (len(data) + first_items, 0, 77, 0)
            out.append(struct.pack("<4i", *words) + data + bytes(-len(data) % 4))
    return b"".join(out)


def write_mosaic(
    path: Path,
    *,
    tiles: int = 7,
    rows: int = 6,
    cols: int = 8,
    orientation: tuple[float, ...] = AXIAL,
    origin: tuple[float, float, float] = (-20.0, 15.0, 40.0),
    pixel_spacing: tuple[float, float] = (3.0, 2.5),
    step: float = 3.5,
    csa: int | None = 2,
    implicit_vr: bool = False,
    seed: int = 0,
) -> Series:
    """A Siemens MR mosaic: `tiles` slices of rows × cols tiled row by row into one square-ish
    frame, the tile count and slice direction in a CSA image header (version `csa`, or none).
    ImagePositionPatient is, as Siemens writes it, that of the whole frame's corner (see
    nibabel's "dicom_mosaic" notes); `origin` is the first tile's, the truth a reader must find."""
    rng = np.random.default_rng(seed)
    row_dir, col_dir = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row_dir, col_dir)
    positions = np.array(origin) + np.arange(tiles)[:, None] * step * normal
    values = rng.integers(0, 4000, size=(cols, rows, tiles)).astype(np.int16)
    grid = int(np.ceil(np.sqrt(tiles)))
    frame = np.zeros((grid * rows, grid * cols), np.uint16)
    for k in range(tiles):
        r, c = divmod(k, grid)
        frame[r * rows : (r + 1) * rows, c * cols : (c + 1) * cols] = values[:, :, k].T
    shift = (np.array(frame.shape, float) - np.array([rows, cols], float)) / 2
    corner = np.array(origin) - col_dir * pixel_spacing[0] * shift[0] - row_dir * pixel_spacing[1] * shift[1]
    ds = base_dataset(sop_class="1.2.840.10008.5.1.4.1.1.4", modality="MR", series_uid=generate_uid(), study_uid=generate_uid(),
                      image_type=("ORIGINAL", "PRIMARY", "M", "ND", "MOSAIC"))
    ds.ImagePositionPatient = [float(v) for v in corner]
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = list(pixel_spacing)
    ds.SpacingBetweenSlices = step
    ds.SliceThickness = step - 0.5
    if csa is not None:
        header = csa_header([("ImaCoilString", "LO", ["HEA;HEP"]), ("NumberOfImagesInMosaic", "US", [str(tiles)]),
                             ("SliceNormalVector", "FD", [f"{v:.8f}" for v in normal])], version=csa)
        ds.private_block(0x0029, "SIEMENS CSA HEADER", create=True).add_new(0x10, "OB", header)
    if implicit_vr:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    set_pixels(ds, frame)
    write(ds, path)
    return Series(ds.SeriesInstanceUID, ds.StudyInstanceUID, [path], values, positions, orientation, pixel_spacing)


def write_radiograph(path: Path, *, rows: int = 20, cols: int = 24, seed: int = 2, monochrome1: bool = False,
                     slope: float = 1.0, intercept: float = 0.0) -> Series:
    """A single-frame DX image (2D): no slice geometry, just ImagerPixelSpacing; `monochrome1`
    marks it as MONOCHROME1 (high values dark), as many CR/DX devices write. `hu` holds the
    stored values; `slope` and `intercept`, when given, are written as the rescale."""
    rng = np.random.default_rng(seed)
    series_uid, study_uid = generate_uid(), generate_uid()
    ds = base_dataset(sop_class=DX_IMAGE, modality="DX", series_uid=series_uid, study_uid=study_uid,
                      image_type=("ORIGINAL", "PRIMARY"))
    ds.ImagerPixelSpacing = [0.15, 0.2]
    stored = rng.integers(0, 4000, size=(rows, cols)).astype(np.uint16)
    set_pixels(ds, stored, slope=slope, intercept=intercept)
    if monochrome1:
        ds.PhotometricInterpretation = "MONOCHROME1"
    write(ds, path)
    return Series(series_uid, study_uid, [path], stored.T[:, :, None].astype(np.int16), np.zeros((1, 3)), AXIAL, (0.15, 0.2))


def write_secondary_capture(path: Path, *, series_uid: str | None = None) -> Path:
    """A screenshot-like secondary capture with ORIGINAL/PRIMARY ImageType (so only its SOP class
    can exclude it)."""
    ds = base_dataset(sop_class=SECONDARY_CAPTURE, modality="OT", series_uid=series_uid or generate_uid(), study_uid=generate_uid())
    set_pixels(ds, np.zeros((8, 8), np.uint16))
    return write(ds, path)


def write_structured_report(path: Path) -> Path:
    """A DICOM object without pixel data."""
    ds = base_dataset(sop_class=BASIC_TEXT_SR, modality="SR", series_uid=generate_uid(), study_uid=generate_uid(), image_type=None)
    ds.ValueType = "CONTAINER"
    return write(ds, path)


def truncate(path: Path, keep_fraction: float = 0.5) -> int:
    """Cut a file inside its pixel data (as an interrupted copy would), keeping `keep_fraction`
    of the pixel bytes; returns the number of pixel bytes left."""
    ds = dcmread(path, stop_before_pixels=True)
    n_pixel = ds.Rows * ds.Columns * ds.BitsAllocated // 8 * int(ds.get("NumberOfFrames", 1) or 1)
    keep = int(n_pixel * keep_fraction)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - (n_pixel - keep)])
    return keep
