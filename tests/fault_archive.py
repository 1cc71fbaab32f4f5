"""Hostile and careless inputs for the fault suite (tests/test_faults_ingest.py), each made small
by the test itself, and a command-line runner that watches time and memory.

Every maker writes real files: a PNG whose header claims 12000 × 12000 pixels with all its rows
compressed into 140 KB, a 2 KB RLE DICOM claiming 65535 × 65535, a 352-byte NIfTI header claiming
4096 × 4096 × 1024, a DICOMDIR with and without its preamble, links in loops, named pipes, file
names that are not UTF-8.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

import dicom_factory as fac

REPO = Path(__file__).resolve().parents[1]
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
CR_IMAGE = "1.2.840.10008.5.1.4.1.1.1"


# -- files ---------------------------------------------------------------------------------------


def png(path: Path, width: int, height: int, *, complete: bool = True) -> Path:
    """An 8-bit grey PNG of zeros. `complete`: every row compressed (a real image: 12000² is
    ~140 KB); else only the first row, the rest missing (a header that lies)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    co = zlib.compressobj(9)
    row = b"\0" * (width + 1)
    idat = b"".join(co.compress(row) for _ in range(height if complete else 1)) + co.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def small_png(path: Path, seed: int = 0) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 40), dtype=np.uint8)).save(path)
    return path


def huge_rle_series(folder: Path, n: int = 8, *, rows: int = 65535, cols: int = 65535) -> list[Path]:
    """`n` RLE DICOM slices of one series, ~2 KB each, each claiming rows × cols 16-bit pixels."""
    series, study = generate_uid(), generate_uid()
    paths = []
    for k in range(n):
        ds = fac.base_dataset(series_uid=series, study_uid=study, patient_id="HUGE-1")
        ds.file_meta.TransferSyntaxUID = RLELossless
        ds.Rows, ds.Columns = rows, cols
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.ImageOrientationPatient, ds.ImagePositionPatient, ds.PixelSpacing = [1, 0, 0, 0, 1, 0], [0, 0, 2.5 * k], [1, 1]
        frame = struct.pack("<16I", 2, 64, 664, *([0] * 13)) + b"\x81\x00" * 600
        ds.PixelData = encapsulate([frame])
        ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
        paths.append(fac.write(ds, folder / f"IM{k + 1:04d}.dcm"))
    return paths


def corrupt_rle_series(folder: Path, broken: int, n: int = 8) -> fac.Series:
    """A valid RLE series whose slice `broken` (1-based, in slice order) holds garbage in place of
    its RLE segments: its header and fragments are intact, so only decoding finds it."""
    series = fac.write_series(folder, n_slices=n, shuffle=False, name="IM", seed=5)
    from pydicom import dcmread

    for k, p in enumerate(series.paths):
        ds = dcmread(p)
        ds.compress(RLELossless)
        if k + 1 == broken:
            ds.PixelData = encapsulate([struct.pack("<16I", 1, 64, *([0] * 14)) + b"\x7f\x01"])
            ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
        ds.save_as(p)
    return series


def huge_nifti_header(path: Path, shape: tuple[int, ...] = (4096, 4096, 1024)) -> Path:
    """A NIfTI header (and its 4-byte extension flag) claiming `shape` int16, with no voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.binaryblock + b"\0\0\0\0")
    return path


def small_nifti(path: Path, seed: int = 0, shape: tuple[int, int, int] = (12, 10, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).integers(-1000, 1000, shape).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), path)
    return path


def media_directory(path: Path, *, preamble: bool = True) -> Path:
    """A DICOMDIR (media directory: an index of files, no series, no pixels); without the
    preamble, as some vendors' DIRFILEs come."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = MEDIA_DIRECTORY, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "ARCHIVE"
    ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity = 0
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = []
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    if not preamble:
        path.write_bytes(path.read_bytes()[132:])
    return path


def radiograph(path: Path, *, patient_id: str, modality: str = "CR", burned_in: str | None = None, seed: int = 0) -> Path:
    """A single-frame CR/DX (or US) image with a PatientID and, optionally, BurnedInAnnotation."""
    sop = US_IMAGE if modality == "US" else CR_IMAGE
    ds = fac.base_dataset(sop_class=sop, modality=modality, series_uid=generate_uid(), study_uid=generate_uid(),
                          patient_id=patient_id, image_type=("ORIGINAL", "PRIMARY"))
    ds.ImagerPixelSpacing = [0.2, 0.2]
    if burned_in is not None:
        ds.BurnedInAnnotation = burned_in
    fac.set_pixels(ds, np.random.default_rng(seed).integers(0, 4000, (24, 20)).astype(np.uint16))
    return fac.write(ds, path)


# -- running the command line -----------------------------------------------------------------------


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    peak_mib: float  # the largest total resident memory of the command and all its processes
    seconds: float


def run_cli(*args: str, timeout: float, cwd: Path | None = None) -> Run:
    """`python -m curation ARGS` in a subprocess, killed (and the test failed) past `timeout`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("M3_CURATE_KEY", None)
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "curation", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, cwd=cwd)
    sampler = _PeakMemory(proc.pid)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        out, err = proc.communicate()
        pytest.fail(f"m3-curate {' '.join(args)} did not finish within {timeout} s\n{err[-3000:]}")
    finally:
        sampler.stop()
    return Run(proc.returncode, out, err, sampler.peak / 2**20, time.perf_counter() - started)


class _PeakMemory(threading.Thread):
    """Samples the summed RSS of a process and all its descendants (Ray's too) every 50 ms."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self._stop_event = pid, 0, threading.Event()

    def run(self) -> None:
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop_event.is_set():
            total = 0
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        total += p.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                return
            self.peak = max(self.peak, total)
            self._stop_event.wait(0.05)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def _kill_tree(pid: int) -> None:
    try:
        root = psutil.Process(pid)
        for p in [*root.children(recursive=True), root]:
            p.kill()
    except psutil.Error:
        pass


def clean(run: Run) -> None:
    """Finished with status 0 and no traceback."""
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.returncode == 0, run.stderr[-3000:]


# -- reading what it wrote ---------------------------------------------------------------------------


def ledger(path: Path) -> dict[tuple[str, str], dict]:
    """(source, uri) → row, after checking that no (source, uri) appears twice."""
    rows = pq.read_table(path).to_pylist()
    keys = [(r["source"], r["uri"]) for r in rows]
    assert len(keys) == len(set(keys)), sorted(k for k in keys if keys.count(k) > 1)[:5]
    return dict(zip(keys, rows))


def files_under(root: Path) -> set[str]:
    """Every regular file under `root` (no link followed), as uris relative to it."""
    from curation.items import uri_text

    out = set()
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            if os.path.isfile(path) and not os.path.islink(path):
                out.add(uri_text(Path(os.path.relpath(path, root)).as_posix()))
    return out


def shareable_bytes(out: Path) -> bytes:
    """Every byte of the build's shareable folder."""
    return b"".join(p.read_bytes() for p in sorted((out / "dataset").rglob("*")) if p.is_file())
