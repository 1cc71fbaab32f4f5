"""Writing the CT phantom as a real-looking DICOM study.

Each patient's study holds what a scanner's export holds: the axial series (SeriesNumber 2),
a localizer series (SeriesNumber 1, 1–3 scout images), and a secondary-capture screenshot
(SeriesNumber 900). The indexer must pick the axial series and ledger the other two. One
patient's axial series is written with InstanceNumbers shuffled against slice position, as
real archives do after re-sends, so a reader that sorts by InstanceNumber is caught out.

All values are plain uncompressed explicit-VR little-endian; stored pixel values are
`HU + 1024` as unsigned 12-bit (BitsAllocated 16, BitsStored 12, PixelRepresentation 0) with
RescaleSlope 1 and RescaleIntercept −1024, a common scanner encoding.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian

from curation.demo.ct import CtPhantom
from curation.demo.identity import Identity, demo_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
AXIAL_SERIES, LOCALIZER_SERIES, CAPTURE_SERIES, TRUNCATED_SERIES = 2, 1, 900, 99
IMPLEMENTATION_UID = UID(demo_uid(0, "implementation"))  # fixed: pydicom's own carries its version
HU_OFFSET = 1024
PRIVATE_GROUP, PRIVATE_CREATOR = 0x0011, "SYNTHETIC IMAGING 1.0"


def study_uids(seed: int, case: int) -> dict[str, str]:
    """The UIDs of patient `case`'s study and of each of its series (keys: study, frame,
    axial, localizer, capture, truncated)."""
    return {name: demo_uid(seed, "ct", case, name) for name in ("study", "frame", "axial", "localizer", "capture", "truncated")}


def _base(ident: Identity, uids: dict[str, str], series: str, number: int, description: str, sop_class: str) -> Dataset:
    """Patient, study, series and equipment modules shared by every image of one series."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ident.study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = ident.study_time
    ds.AccessionNumber = ident.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = "Synthetic Imaging Systems"
    ds.InstitutionName = ident.institution_name
    ds.InstitutionAddress = ident.institution_address
    ds.ReferringPhysicianName = ident.referring_physician_name
    ds.StationName = ident.station_name
    ds.StudyDescription = "CT ABDOMEN WITH CONTRAST"
    ds.SeriesDescription = description
    ds.OperatorsName = ident.operators_name
    ds.ManufacturerModelName = "PhantomScan 64"
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.patient_birth_date
    ds.PatientSex = ident.patient_sex
    ds.PatientAge = ident.patient_age
    ds.DeviceSerialNumber = ident.device_serial_number
    ds.SoftwareVersions = "m3-curate-demo 1"
    ds.BodyPartExamined = "ABDOMEN"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uids["study"]
    ds.SeriesInstanceUID = uids[series]
    ds.StudyID = ident.study_id
    ds.SeriesNumber = number
    ds.FrameOfReferenceUID = uids["frame"]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    # A vendor's private block repeating the MRN: de-identification must drop private tags too.
    ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True).add_new(0x01, "LO", ident.patient_id)
    return ds


def _ct_pixels(ds: Dataset, stored: np.ndarray, *, bits_stored: int = 12) -> None:
    """Attach a 2D array (rows, columns) as unsigned 16-bit pixels with 12 stored bits."""
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()


def _save(ds: Dataset, path: Path | io.BytesIO, sop_uid: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(ds.SOPClassUID)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "M3CURATE_DEMO"
    ds.SOPInstanceUID = sop_uid
    ds.file_meta = meta
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _axial_slice(base: Dataset, p: CtPhantom, k: int, instance: int, sop_uid: str) -> Dataset:
    ds = copy.deepcopy(base)  # Dataset.copy() is shallow: elements would be shared
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = instance
    ds.AcquisitionNumber = 1
    ds.KVP = 120
    ds.XRayTubeCurrent = 180
    ds.ConvolutionKernel = "STANDARD"
    ds.SliceThickness = p.slice_spacing
    ds.SpacingBetweenSlices = p.slice_spacing
    z = round(p.origin[2] + k * p.slice_spacing, 3)
    ds.ImagePositionPatient = [p.origin[0], p.origin[1], z]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = z
    ds.PixelSpacing = [p.pixel_spacing, p.pixel_spacing]
    ds.RescaleIntercept = -HU_OFFSET
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    # Rows run along +y (row index j), columns along +x (column index i): pixel[j, i] = hu[i, j, k].
    _ct_pixels(ds, (p.hu[:, :, k].T.astype(np.int32) + HU_OFFSET).astype(np.uint16))
    ds.SOPInstanceUID = sop_uid
    return ds


def instance_numbers(n_slices: int, shuffle: np.random.Generator | None) -> list[int]:
    """InstanceNumber of slice k (k = 0 inferior): 1 at the top, as a head-first scan numbers
    them, or a seeded permutation when `shuffle` is given."""
    if shuffle is None:
        return [n_slices - k for k in range(n_slices)]
    return [int(v) + 1 for v in shuffle.permutation(n_slices)]


def write_ct_study(root: Path, p: CtPhantom, ident: Identity, uids: dict[str, str], seed: int, case: int,
                   *, shuffle: np.random.Generator | None, n_localizers: int) -> dict[str, list[str]]:
    """Write one patient's three series under `root/<PatientID>/`; returns each series' files
    (POSIX paths relative to `root`)."""
    patient = root / ident.patient_id
    files: dict[str, list[str]] = {"axial": [], "localizer": [], "capture": []}
    base = _base(ident, uids, "axial", AXIAL_SERIES, "ABD 5.0 STANDARD", CT_IMAGE_STORAGE)
    nz = p.hu.shape[2]
    for k, inst in enumerate(instance_numbers(nz, shuffle)):
        ds = _axial_slice(base, p, k, inst, demo_uid(seed, "ct", case, "axial", k))
        name = f"{AXIAL_SERIES}/IM{inst:04d}.dcm"
        _save(ds, patient / name, ds.SOPInstanceUID)
        files["axial"].append(f"{ident.patient_id}/{name}")
    for n in range(n_localizers):
        ds = _localizer(ident, uids, p, n)
        name = f"{LOCALIZER_SERIES}/IM{n + 1:04d}.dcm"
        _save(ds, patient / name, demo_uid(seed, "ct", case, "localizer", n))
        files["localizer"].append(f"{ident.patient_id}/{name}")
    ds = _capture(ident, uids, p)
    name = f"{CAPTURE_SERIES}/IM0001.dcm"
    _save(ds, patient / name, demo_uid(seed, "ct", case, "capture"))
    files["capture"].append(f"{ident.patient_id}/{name}")
    return {k: sorted(v) for k, v in files.items()}


def _localizer(ident: Identity, uids: dict[str, str], p: CtPhantom, n: int) -> Dataset:
    """A scout: the phantom's attenuation summed along y (frontal, coronal plane) or, for the
    second image, along x (lateral, sagittal plane); superior at the top of the image."""
    ds = _base(ident, uids, "localizer", LOCALIZER_SERIES, "SCOUT", CT_IMAGE_STORAGE)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.InstanceNumber = n + 1
    mu = np.clip((p.hu.astype(np.float32) + 1000.0) / 1000.0, 0.0, None)
    nx, ny, nz = p.hu.shape
    top = round(p.origin[2] + (nz - 1) * p.slice_spacing, 3)
    if n % 2 == 0:  # frontal: columns along +x
        projection = mu.sum(axis=1).T[::-1]  # (z descending, x)
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        ds.ImagePositionPatient = [p.origin[0], round(p.origin[1] + (ny - 1) / 2 * p.pixel_spacing, 3), top]
    else:  # lateral: columns along +y
        projection = mu.sum(axis=0).T[::-1]
        ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.ImagePositionPatient = [round(p.origin[0] + (nx - 1) / 2 * p.pixel_spacing, 3), p.origin[1], top]
    ds.PixelSpacing = [p.slice_spacing, p.pixel_spacing]  # (between rows, between columns)
    ds.SliceThickness = p.pixel_spacing
    ds.KVP = 120
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    ds.WindowCenter, ds.WindowWidth = 2000, 4000
    _ct_pixels(ds, np.rint(projection / max(float(projection.max()), 1e-6) * 4000).astype(np.uint16))
    return ds


def _capture(ident: Identity, uids: dict[str, str], p: CtPhantom) -> Dataset:
    """A screen save: the middle slice at a soft-tissue window, 8-bit, enlarged ×2, with a
    white bar where a viewer would print annotations. No geometry, as in real screen saves."""
    ds = _base(ident, uids, "capture", CAPTURE_SERIES, "SCREEN SAVE", SECONDARY_CAPTURE_STORAGE)
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.ConversionType = "WSD"
    ds.BurnedInAnnotation = "NO"
    ds.InstanceNumber = 1
    hu = p.hu[:, :, p.hu.shape[2] // 2].T.astype(np.float32)
    pixels = np.clip((hu - (50 - 200)) / 400 * 255, 0, 255).astype(np.uint8)
    pixels = np.kron(pixels, np.ones((2, 2), dtype=np.uint8))
    pixels[4:12, 8:120] = 255
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    return ds


def write_truncated(root: Path, p: CtPhantom, ident: Identity, uids: dict[str, str], seed: int, case: int) -> str:
    """The archive's one broken file: a valid CT slice in a series of its own (SeriesNumber 99),
    cut to half its length, inside its pixel data (an interrupted transfer). Its header reads;
    its pixels do not."""
    base = _base(ident, uids, "truncated", TRUNCATED_SERIES, "ABD 5.0 STANDARD (RESENT)", CT_IMAGE_STORAGE)
    k = p.hu.shape[2] // 2
    ds = _axial_slice(base, p, k, 1, demo_uid(seed, "ct", case, "truncated"))
    buffer = io.BytesIO()
    _save(ds, buffer, ds.SOPInstanceUID)
    data = buffer.getvalue()
    rel = f"{ident.patient_id}/{TRUNCATED_SERIES}/IM0001.dcm"
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return rel


def affine_from_headers(headers: Sequence[Dataset]) -> np.ndarray:
    """RAS affine of a (column, row, slice) array from axial headers sorted along the normal:
    the textbook construction from ImagePositionPatient, ImageOrientationPatient and
    PixelSpacing, used by the tests to check the label NIfTI against the DICOM geometry."""
    first, last = headers[0], headers[-1]
    row_cos = np.array([float(v) for v in first.ImageOrientationPatient[:3]])
    col_cos = np.array([float(v) for v in first.ImageOrientationPatient[3:]])
    dr, dc = (float(v) for v in first.PixelSpacing)
    ipp0 = np.array([float(v) for v in first.ImagePositionPatient])
    ipp1 = np.array([float(v) for v in last.ImagePositionPatient])
    step = (ipp1 - ipp0) / max(len(headers) - 1, 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_cos * dc, col_cos * dr, step, ipp0
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
