"""DICOM → NIfTI conversion speed: m3-curate's `convert` against dcm2niix on the same files.

    python bench/ingest.py [--slices 240] [--series 2] [--repeat 5] [--keep DIR]

Writes a CT archive with pydicom into a temporary folder (S series × N slices of 512×512 int16,
uncompressed explicit VR little endian, with a header of the size scanners write), then times
each converter writing uncompressed `.nii`:

  ours      `curation.ingest.convert.convert(spec, out, compress=False)`: index (header scan of every
            file) + load every item + nibabel save, plus index/ledger Parquet
  dcm2niix  `dcm2niix -z n -o OUT DIR` (the PyPI package's binary next to this Python)

After one untimed warm-up of each, each is run `--repeat` times, alternating; medians of wall
and CPU time (user + system, all threads) are reported, with our time split into scan / load /
save from a separate direct pass. Ours runs in this process (imports already done); dcm2niix
pays its process start (a few ms). The goal is ours/dcm2niix <= 1.5 in wall time.

Noise: on a small VM whose transparent huge pages are in `madvise` mode, numpy asks for huge
pages for large arrays and the kernel sometimes compacts memory to find them, adding 0.1-0.8 s
of system time to a run (dcm2niix's plain malloc never asks). `NUMPY_MADVISE_HUGEPAGE=0` makes
our runs as steady as dcm2niix's; compare medians of several repeats either way.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import dicom_factory as fac  # noqa: E402  (tests/dicom_factory.py: the same writer the tests use)

from curation.ingest.convert import convert  # noqa: E402
from curation.ingest.index import list_files  # noqa: E402
from curation.ingest.dicom import DicomReader  # noqa: E402
from curation.keys import Keyer  # noqa: E402
from curation.manifest import BuildSpec, DicomSourceSpec  # noqa: E402

# What a CT scanner puts in each header besides geometry and pixels (~2 kB): parsing cost is
# part of what is measured, so the bench files carry a realistic load.
SCANNER_HEADER: dict[str, object] = {
    "SpecificCharacterSet": "ISO_IR 100", "StudyTime": "101500", "SeriesDate": "20240102", "SeriesTime": "101733",
    "AcquisitionDate": "20240102", "AcquisitionTime": "101801.123", "ContentDate": "20240102", "ContentTime": "101802",
    "AccessionNumber": "ACC123456", "Manufacturer": "Bench Medical", "InstitutionName": "Bench Hospital",
    "InstitutionAddress": "1 Bench Road, Bench City", "ReferringPhysicianName": "Ref^Doctor", "StationName": "CT01",
    "StudyDescription": "CT CHEST ABDOMEN PELVIS", "SeriesDescription": "AXIAL 1.25 STANDARD", "OperatorsName": "Tech^One",
    "ManufacturerModelName": "Bench CT 128", "PatientBirthDate": "19700101", "PatientSex": "F", "PatientAge": "054Y",
    "BodyPartExamined": "CHEST", "KVP": 120, "DataCollectionDiameter": 500, "SoftwareVersions": "bench 1.0",
    "ReconstructionDiameter": 360, "DistanceSourceToDetector": 946.7, "DistanceSourceToPatient": 538.5,
    "GantryDetectorTilt": 0, "TableHeight": 160, "RotationDirection": "CW", "ExposureTime": 500, "XRayTubeCurrent": 250,
    "Exposure": 125, "FilterType": "BODY FILTER", "GeneratorPower": 30, "FocalSpots": 0.7, "ConvolutionKernel": "STANDARD",
    "PatientPosition": "FFS", "StudyID": "1234", "AcquisitionNumber": 1, "FrameOfReferenceUID": "1.2.3.4.5.6.7.8.9",
    "PositionReferenceIndicator": "SN", "SliceLocation": 0.0, "WindowCenter": 40, "WindowWidth": 400, "RescaleType": "HU",
    "ImageComments": "written by bench/ingest.py", "RequestedProcedureDescription": "CT CHEST ABDOMEN PELVIS WITH CONTRAST",
}


def write_archive(root: Path, n_series: int, n_slices: int) -> int:
    """The bench archive; returns its size in bytes."""
    for s in range(n_series):
        fac.write_series(
            root / f"series{s + 1}", rows=512, cols=512, n_slices=n_slices, slice_steps=[1.25] * (n_slices - 1),
            pixel_spacing=(0.703125, 0.703125), origin=(-180.0, -180.0, -300.0), seed=s, intercept=-1024.0,
            series_number=s + 2, patient_id=f"BENCH{s // 2}", name="IM", extra=SCANNER_HEADER,
        )
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def dcm2niix_binary() -> str:
    beside = Path(sys.executable).parent / "dcm2niix"
    found = str(beside) if beside.exists() else shutil.which("dcm2niix")
    if not found:
        raise SystemExit("dcm2niix not found next to this Python or on PATH: pip install dcm2niix")
    return found


def time_dcm2niix(binary: str, archive: Path, out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one dcm2niix run."""
    fresh(out)
    cpu, started = _child_cpu(), time.perf_counter()
    subprocess.run([binary, "-z", "n", "-o", str(out), str(archive)], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started, _child_cpu() - cpu


def time_ours(spec: BuildSpec, out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one `convert` (CPU of all our threads)."""
    fresh(out)
    cpu, started = time.process_time(), time.perf_counter()
    result = convert(spec, out, compress=False)
    elapsed, used = time.perf_counter() - started, time.process_time() - cpu
    if result.failed:
        raise SystemExit(f"conversion failed: {result.failed[:3]}")
    return elapsed, used


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def phases(spec: BuildSpec, out: Path) -> dict[str, float]:
    """Scan / load / save of the same work, called directly, to see where our time goes."""
    fresh(out)
    source = spec.sources[0]
    reader = DicomReader(source, Keyer("bench"))
    t0 = time.perf_counter()
    scan = reader.scan(list_files(reader.root))
    t1 = time.perf_counter()
    volumes = [reader.load(item) for item in scan.items]
    t2 = time.perf_counter()
    for item, volume in zip(scan.items, volumes):
        nib.save(nib.Nifti1Image(volume.array, volume.affine), out / f"{item.item_id}.nii")
    t3 = time.perf_counter()
    return {"scan": t1 - t0, "load": t2 - t1, "save": t3 - t2}


def fresh(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=240, help="slices per series (default 240)")
    parser.add_argument("--series", type=int, default=2, help="number of series (default 2)")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs of each converter; the median is reported")
    parser.add_argument("--keep", type=Path, help="write the archive and outputs here and keep them")
    args = parser.parse_args(argv)
    binary = dcm2niix_binary()
    with tempfile.TemporaryDirectory(prefix="m3-bench-") as tmp:
        work = args.keep or Path(tmp)
        archive = work / "archive"
        fresh(archive)
        t = time.perf_counter()
        size = write_archive(archive, args.series, args.slices)
        print(f"archive: {args.series} series x {args.slices} slices of 512x512 int16, {size / 1e6:.0f} MB, written in {time.perf_counter() - t:.1f} s")
        spec = BuildSpec(name="bench", sources=[DicomSourceSpec(name="ct", kind="dicom", root=archive)], output={"dir": work / "out"})
        time_dcm2niix(binary, archive, work / "dcm2niix")  # warm-up, untimed: page cache, lazy imports
        time_ours(spec, work / "ours")
        theirs, ours = [], []
        for _ in range(args.repeat):  # alternate, so neither always runs on a warmer cache
            theirs.append(time_dcm2niix(binary, archive, work / "dcm2niix"))
            ours.append(time_ours(spec, work / "ours"))
        split = phases(spec, work / "phases")
        check_same_voxels(work / "ours", work / "dcm2niix")
    mine, ref = statistics.median(w for w, _ in ours), statistics.median(w for w, _ in theirs)
    mine_cpu, ref_cpu = statistics.median(c for _, c in ours), statistics.median(c for _, c in theirs)
    print(f"ours (convert, .nii): {mine:.2f} s wall, {mine_cpu:.2f} s CPU   [scan {split['scan']:.2f} + load {split['load']:.2f} + save {split['save']:.2f} s]")
    print(f"dcm2niix -z n:        {ref:.2f} s wall, {ref_cpu:.2f} s CPU")
    print(f"ratio ours/dcm2niix:  {mine / ref:.2f} wall (goal <= 1.5), {mine_cpu / ref_cpu:.2f} CPU")
    print(f"runs (wall s): ours {fmt([w for w, _ in ours])}; dcm2niix {fmt([w for w, _ in theirs])}")
    return 0


def check_same_voxels(ours: Path, theirs: Path) -> None:
    """The race is only fair if both wrote the same volumes (in HU; orientation aside)."""
    mine = sorted(np.asarray(nib.load(p).get_fdata(dtype=np.float32)).sum() for p in ours.glob("*.nii"))
    ref = sorted(np.asarray(nib.load(p).get_fdata(dtype=np.float32)).sum() for p in theirs.glob("*.nii"))
    if not np.allclose(mine, ref):
        raise SystemExit(f"outputs differ: voxel sums {mine} vs {ref}")


def fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


if __name__ == "__main__":
    raise SystemExit(main())
