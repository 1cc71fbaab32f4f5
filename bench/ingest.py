"""Ingest speed: `convert` against dcm2niix, and the index scan on a large archive.

    python bench/ingest.py convert [--repeat 5] [--keep DIR] [--synthetic [N]]
    python bench/ingest.py scan [--repeat 3] [--workers N] [--sizes 0.25,1] [--archive DIR] [--keep DIR]

convert: on the real Siemens series of `../shared/realdata/dcm_qa_ts` (nine files, 64×64×35
mosaics, when present) and on a 500-slice CT (the demo CT at scanner size: `m3-curate
demo-archive --ct-size full`, its axial series alone), each converter writes uncompressed NIfTI:

  ours, CLI   `python -m curation convert M --out DIR --uncompressed` (start-up included)
  ours, net   `curation.ingest.convert.convert(spec, out, compress=False)` timed in a fresh
              process after its imports: net of start-up, first-run costs included (the
              imports convert makes on demand, memory the process has not touched yet)
  ours, warm  the same call in this process, which has converted before: a long-lived worker
  dcm2niix    `dcm2niix -z n -o DIR IN` (the PyPI package's binary next to this Python)

After one untimed warm-up each, the four run `--repeat` times, alternating; the medians of wall
time, CPU time (user + system, all threads and child processes) and peak memory (the process
tree's resident set) are printed, with the warm time split into index / load / save, and
Python's start-up (interpreter + imports of `convert`; the interpreter and numpy alone, the
floor of any Python converter) measured alone. `--synthetic N` adds an archive of N series of
240 slices of 512×512 written by tests/dicom_factory.py (2 when N is left out): one command over
many series, as a user converts an archive, where Python's start-up is paid once.

scan: `m3-curate index --workers N` on demo archives of several sizes (`--sizes` are fractions
of 500 CT series + 200 brain cases + 20,000 chest X-rays, drawn with `--distinct 16`: ~45,000
files at 1), `--repeat` times each: files/s net of start-up (the scan's own time, as the command
prints it), the whole command's wall time, the driver's peak resident memory (the command's own
process: flat in the number of files is the goal) and the peak of all its processes.

The machine this was written on is shared (2 cores, other work running): print the load
average beside every figure, compare medians, and re-measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

DCM_QA_TS = REPO.parent / "shared" / "realdata" / "dcm_qa_ts" / "In"
FULL_SCALE = {"ct": 500, "brain": 200, "cxr": 20_000}


@dataclass
class Run:
    wall: float
    cpu: float
    peak_mib: float
    driver_mib: float = 0.0
    stdout: str = ""


def run(cmd: list[str], env: dict[str, str] | None = None) -> Run:
    """Run a command; wall, CPU of it and its children, peak RSS of its process tree and of the
    command's own process (sampled every 20 ms)."""
    before = _children_cpu()
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    peak, driver = [0], [0]
    done = threading.Event()

    def sample() -> None:
        try:
            root = psutil.Process(proc.pid)
            while not done.is_set():
                tree = [root, *root.children(recursive=True)]
                total = 0
                for p in tree:
                    try:
                        rss = p.memory_info().rss
                    except psutil.Error:
                        continue
                    total += rss
                    if p.pid == proc.pid:
                        driver[0] = max(driver[0], rss)
                peak[0] = max(peak[0], total)
                done.wait(0.02)
        except psutil.Error:
            pass

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, _ = proc.communicate()
    wall = time.perf_counter() - started
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out[-3000:]}")
    return Run(wall, _children_cpu() - before, peak[0] / 2**20, driver[0] / 2**20, out)


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def load() -> str:
    return "load {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def median(values: list[float]) -> float:
    return statistics.median(values)


# -- convert -------------------------------------------------------------------------------------------


def dcm2niix_binary() -> str:
    beside = Path(sys.executable).parent / "dcm2niix"
    found = str(beside) if beside.exists() else shutil.which("dcm2niix")
    if not found:
        raise SystemExit("dcm2niix not found next to this Python or on PATH: pip install dcm2niix")
    return found


def full_size_ct(work: Path) -> Path:
    """The demo CT at scanner size, its axial series alone (localizer, screen save and the
    truncated file left out, so both converters do the same work)."""
    from curation.demo import write_demo_archive

    archive = work / "demo-full"
    if not (archive / "ground_truth.json").is_file():
        write_demo_archive(archive, cases=1, cxr_images=1, ct_size="full")
    series = work / "ct500"
    if not series.is_dir():
        (axial,) = [p for p in (archive / "ct").glob("*/2") if p.is_dir()]
        shutil.copytree(axial, series)
    return series


def synthetic_ct(work: Path, series: int) -> Path:
    """`series` × 240 slices of 512×512, headers of scanner size (tests/dicom_factory.py)."""
    import dicom_factory as fac

    root = work / f"synthetic-{series}"
    if not root.is_dir():
        for s in range(series):
            fac.write_series(root / f"series{s + 1}", rows=512, cols=512, n_slices=240, slice_steps=[1.25] * 239,
                             pixel_spacing=(0.703125, 0.703125), origin=(-180.0, -180.0, -300.0), seed=s, intercept=-1024.0,
                             series_number=s + 2, patient_id=f"BENCH{s}", name="IM")
    return root


def convert_case(name: str, archive: Path, work: Path, repeat: int) -> None:
    import yaml

    from curation.ingest.convert import convert
    from curation.manifest import load_manifest

    work.mkdir(parents=True, exist_ok=True)
    manifest = work / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump({"name": name, "sources": [{"name": "s", "kind": "dicom", "root": str(archive),
                                                                    "select": {"min_slices": 1}}]}))
    spec = load_manifest(manifest)
    binary = dcm2niix_binary()
    size = sum(p.stat().st_size for p in archive.rglob("*") if p.is_file())
    files = sum(1 for p in archive.rglob("*") if p.is_file())
    ours_cli = [sys.executable, "-m", "curation", "-q", "convert", str(manifest), "--out", str(work / "ours"), "--uncompressed"]
    theirs = [binary, "-z", "n", "-o", str(work / "dcm2niix"), str(archive)]

    def fresh(folder: Path) -> Path:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def in_process() -> Run:
        fresh(work / "inproc")
        cpu, started = time.process_time(), time.perf_counter()
        result = convert(spec, work / "inproc", compress=False)
        if result.failed:
            raise SystemExit(f"conversion failed: {result.failed[:3]}")
        return Run(time.perf_counter() - started, time.process_time() - cpu, 0.0)

    def net() -> Run:
        fresh(work / "net")
        hot_memory()
        done = run([sys.executable, "-c", NET_OF_START_UP, str(manifest), str(work / "net")], env())
        wall, cpu = (float(v) for v in done.stdout.split()[-2:])
        return Run(wall, cpu, done.peak_mib)

    def cli(cmd: list[str], out: Path) -> Run:
        fresh(out)
        hot_memory()
        return run(cmd, env())

    cli(ours_cli, work / "ours"), cli(theirs, work / "dcm2niix"), in_process(), net()  # warm-up: page cache
    runs: dict[str, list[Run]] = {"ours, CLI": [], "ours, net": [], "ours, warm": [], "dcm2niix": []}
    for _ in range(repeat):  # alternate, so that none always runs on a warmer cache
        runs["dcm2niix"].append(cli(theirs, work / "dcm2niix"))
        runs["ours, CLI"].append(cli(ours_cli, work / "ours"))
        runs["ours, net"].append(net())
        runs["ours, warm"].append(in_process())
    check_same_voxels(work / "ours", work / "dcm2niix")
    startup = [run([sys.executable, "-c", "import curation.cli, curation.manifest, curation.ingest.convert"], env()) for _ in range(repeat)]
    floor = [run([sys.executable, "-c", "import numpy"], env()) for _ in range(repeat)]
    split = phases(spec, work / "phases")
    print(f"\n{name}: {files} files, {size / 1e6:.0f} MB ({load()})")
    for label, rs in runs.items():
        peak = f", peak {median([r.peak_mib for r in rs]):.0f} MiB" if rs[0].peak_mib else ""
        print(f"  {label:<11} {median([r.wall for r in rs]):.3f} s wall, {median([r.cpu for r in rs]):.3f} s CPU{peak}   runs: {fmt([r.wall for r in rs])}")
    ref = median([r.wall for r in runs["dcm2niix"]])
    ratios = ", ".join(f"{label.removeprefix('ours, ')} {median([r.wall for r in runs[label]]) / ref:.2f}" for label in runs if label != "dcm2niix")
    print(f"  ratio ours/dcm2niix (wall): {ratios} (goal <= 1.0)")
    print(f"  python start-up + imports of convert: {median([s.wall for s in startup]):.3f} s wall, {median([s.cpu for s in startup]):.3f} s CPU; "
          f"python + numpy alone: {median([f.wall for f in floor]):.3f} s")
    print(f"  warm split: index {split['index']:.3f} + load {split['load']:.3f} + save {split['save']:.3f} s")


def hot_memory(mib: int = 1024) -> None:
    """Touch and free `mib` MiB right before a timed run. This machine is a VM that hands free
    memory back to its host a moment after it is freed (free page reporting), and touching such
    memory again costs 0.03 to 0.5 s per 262 MB, at random, whichever process touches it: more
    than the rest of converting the 500-slice CT. Touched just before, it is ready for every
    converter alike, and the race measures the converters."""
    np.ones(mib * 2**20, np.uint8)


# A fresh process that imports what `convert` needs, then times it: our cost net of start-up, with
# everything a first run pays (lazy imports, fresh memory) that a warm process no longer does.
NET_OF_START_UP = """
import sys, time
from pathlib import Path
from curation.ingest.lean import keep_out_unused
keep_out_unused()
from curation.manifest import load_manifest
from curation.ingest.convert import convert
spec = load_manifest(Path(sys.argv[1]))
cpu, started = time.process_time(), time.perf_counter()
result = convert(spec, Path(sys.argv[2]), compress=False)
assert not result.failed, result.failed[:3]
print(time.perf_counter() - started, time.process_time() - cpu)
"""


def phases(spec, out: Path) -> dict[str, float]:
    """Index / load / save of the same work, called directly, to see where our time goes."""
    from curation.ingest import readers_for
    from curation.ingest.index import build_index
    from curation.ingest.nifti_write import write_nifti

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    index = build_index(spec)
    t1 = time.perf_counter()
    readers = readers_for(spec)
    volumes = [(item, readers[item.source].load(item)) for item in index.items]
    t2 = time.perf_counter()
    for item, volume in volumes:
        write_nifti(out / f"{item.item_id}.nii", volume.array, volume.affine)
    t3 = time.perf_counter()
    return {"index": t1 - t0, "load": t2 - t1, "save": t3 - t2}


def check_same_voxels(ours: Path, theirs: Path) -> None:
    """The race is only fair if both wrote the same volumes (in HU; orientation aside)."""
    import nibabel as nib

    mine = sorted(float(np.asarray(nib.load(p).dataobj, dtype=np.float64).sum()) for p in ours.glob("*.nii"))
    ref = sorted(float(np.asarray(nib.load(p).dataobj, dtype=np.float64).sum()) for p in theirs.glob("*.nii"))
    if not mine or not all(any(np.isclose(m, r) for r in ref) for m in mine):
        raise SystemExit(f"outputs differ: voxel sums {mine} vs {ref}")


# -- scan --------------------------------------------------------------------------------------------------


def large_archive(work: Path, fraction: float) -> Path:
    from curation.demo import write_demo_archive

    counts = {k: max(1, round(v * fraction)) for k, v in FULL_SCALE.items()}
    folder = work / f"archive-{counts['ct']}-{counts['brain']}-{counts['cxr']}"
    if not (folder / "ground_truth.json").is_file():
        started = time.perf_counter()
        write_demo_archive(folder, cases=4, ct_cases=counts["ct"], brain_cases=counts["brain"], cxr_images=counts["cxr"], distinct=16,
                           jobs=len(os.sched_getaffinity(0)))
        print(f"wrote {folder.name} in {time.perf_counter() - started:.0f} s")
    return folder


def scan_case(archive: Path, work: Path, repeat: int, workers: int | None) -> None:
    import yaml

    manifest = work / f"{archive.name}.yaml"
    manifest.write_text(yaml.safe_dump({"name": "scan", "sources": [
        {"name": "ct", "kind": "dicom", "root": str(archive / "ct"), "labels": "../ct_labels"},
        {"name": "brain", "kind": "nifti_group", "root": str(archive / "brain"), "channels": ["t1c", "t1", "t2", "flair"], "labels": "seg"},
        {"name": "cxr", "kind": "image2d", "root": str(archive / "cxr"), "labels": "labels.csv"},
    ]}))
    cmd = [sys.executable, "-m", "curation", "-q", "index", str(manifest), "--out", str(work / "out")]
    if workers:
        cmd += ["--workers", str(workers)]
    run(cmd, env())  # warm-up: page cache
    runs = [run(cmd, env()) for _ in range(repeat)]
    scanned = []
    for r in runs:
        m = re.search(r"from ([\d,]+) files .* in ([\d.]+) s", r.stdout)
        if not m:
            raise SystemExit(f"no scan time in the output:\n{r.stdout}")
        scanned.append((int(m.group(1).replace(",", "")), float(m.group(2))))
    files = scanned[0][0]
    rates = [n / s for n, s in scanned]
    print(f"\n{archive.name}: {files:,} files, workers {workers or 'all cores'} ({load()})")
    print(f"  scan: {median([s for _, s in scanned]):.2f} s, {median(rates):,.0f} files/s net of start-up (goal >= 10,000)   runs: {fmt(rates, 0)}")
    print(f"  command: {median([r.wall for r in runs]):.2f} s wall, {median([r.cpu for r in runs]):.2f} s CPU; "
          f"driver peak {median([r.driver_mib for r in runs]):.0f} MiB, all processes {median([r.peak_mib for r in runs]):.0f} MiB")


def fmt(values: list[float], digits: int = 2) -> str:
    return ", ".join(f"{v:,.{digits}f}" for v in values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode")
    c = sub.add_parser("convert")
    c.add_argument("--repeat", type=int, default=5)
    c.add_argument("--keep", type=Path, help="write archives and outputs here and keep them")
    c.add_argument("--synthetic", type=int, nargs="?", const=2, default=0, metavar="N",
                   help="also an archive of N synthetic 240-slice series (2 when N is left out)")
    s = sub.add_parser("scan")
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--workers", type=int, help="header-reading processes (default: all cores)")
    s.add_argument("--sizes", default="0.25,1", help="fractions of 500 CT + 200 brain + 20,000 X-rays (default 0.25,1)")
    s.add_argument("--archive", type=Path, help="scan this demo archive instead of drawing them")
    s.add_argument("--keep", type=Path, help="write archives and outputs here and keep them")
    args = parser.parse_args(argv)
    mode = args.mode or "convert"
    with tempfile.TemporaryDirectory(prefix="m3-bench-") as tmp:
        work = getattr(args, "keep", None) or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if mode == "convert":
            repeat = getattr(args, "repeat", 5)
            if DCM_QA_TS.is_dir():
                convert_case("dcm_qa_ts", DCM_QA_TS, work / "qa", repeat)
            else:
                print(f"dcm_qa_ts not found at {DCM_QA_TS}: skipped")
            convert_case("ct500", full_size_ct(work), work / "ct500-out", repeat)
            if getattr(args, "synthetic", 0):
                convert_case(f"synthetic-{args.synthetic}", synthetic_ct(work, args.synthetic), work / f"synthetic-{args.synthetic}-out", repeat)
        else:
            archives = [args.archive] if args.archive else [large_archive(work, float(f)) for f in args.sizes.split(",")]
            for archive in archives:
                scan_case(archive, work, args.repeat, args.workers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
