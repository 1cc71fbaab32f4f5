"""The archive attacked as a hostile archive and a careless user would (issue 15), every case
through the real command line (`m3-curate index`, `convert`, `build` in a subprocess).

Each case asserts that the command ends within a time bound (a subprocess timeout, not a timing
assert), prints no traceback, ledgers every input file exactly once with its reason, indexes (or
builds) the valid items, keeps paths out of every reason (and, for builds, identifiers out of
every shareable byte), and stays under a stated peak memory (the command and all its processes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

import dicom_factory as fac
from curation.items import source_path
from fault_archive import (clean, corrupt_rle_series, files_under, huge_nifti_header, huge_rle_series, ledger, media_directory, png,
                           radiograph, run_cli, shareable_bytes, small_nifti, small_png)

pytestmark = pytest.mark.slow  # every test runs `m3-curate index` or `convert` as a command on a hostile archive

INDEX_TIMEOUT = 120  # seconds; a healthy index of these archives takes 1-3 s
INDEX_PEAK_MIB = 700  # the command, its header-reading processes included (~100-150 MiB each)
IDENTIFIERS = ("DOE", "JOHN", "MRN12345")


def write_manifest(folder: Path, sources: list[dict], **extra) -> Path:
    path = folder / "m.yaml"
    path.write_text(yaml.safe_dump({"name": "faults", "sources": sources, "output": {"dir": str(folder / "out")}, **extra}, sort_keys=False))
    return path


def index(manifest: Path, out: Path, timeout: float = INDEX_TIMEOUT) -> dict[tuple[str, str], dict]:
    run = run_cli("index", str(manifest), "--out", str(out), timeout=timeout)
    clean(run)
    assert run.peak_mib < INDEX_PEAK_MIB, f"index peaked at {run.peak_mib:.0f} MiB"
    return ledger(out / "internal" / "ledger.parquet")


def items(out: Path) -> list[dict]:
    return pq.read_table(out / "internal" / "index.parquet").to_pylist()


def assert_no_path_in_reasons(rows: dict, *also: str) -> None:
    for (source, uri), row in rows.items():
        reason = row["reason"] or ""
        assert "/" not in reason and not any(s in reason for s in (*also, *IDENTIFIERS)), (uri, reason)


# -- 1. links in loops ---------------------------------------------------------------------------


def test_links_in_loops_end_and_list_every_file_once(tmp_path: Path) -> None:
    root = tmp_path / "vols"
    for k in range(3):
        small_nifti(root / f"sub{k}" / f"p{k}_ct.nii.gz", seed=k)
    for k in range(6):
        (root / f"notes{k}.txt").write_text("x")
    os.symlink(".", root / "loop")
    os.symlink("..", root / "sub0" / "up")
    (tmp_path / "elsewhere").mkdir()
    os.symlink(root, tmp_path / "elsewhere" / "back")  # outside the root, pointing back into it
    os.symlink(tmp_path / "elsewhere", root / "out")
    os.mkfifo(root / "pipe")  # opening it would block forever
    rows = index(write_manifest(tmp_path, [{"name": "vols", "kind": "nifti", "root": "vols"}]), tmp_path / "o")
    files = files_under(root)
    assert len(files) == 9 and files <= {u for _, u in rows}
    odd = {u: r for (_, u), r in rows.items() if u not in files}
    assert set(odd) == {"loop", "sub0/up", "out/back", "pipe"}, odd
    assert all(r["status"] == "skipped" for r in odd.values())
    assert "named pipe" in odd["pipe"]["reason"]
    assert len(items(tmp_path / "o")) == 3
    no_follow = index(write_manifest(tmp_path, [{"name": "vols", "kind": "nifti", "root": "vols", "follow_links": False}]), tmp_path / "o2")
    assert no_follow[("vols", "out")]["reason"] == "symbolic link not followed (follow_links: false)"


# -- 2. file names of any bytes ------------------------------------------------------------------


def test_file_names_of_any_bytes_are_indexed_and_converted(tmp_path: Path) -> None:
    cxr, vols = tmp_path / "cxr", tmp_path / "vols"
    odd_png = cxr / os.fsdecode(b"caf\xe9") / os.fsdecode(b"\xff\xfe 50%.png")
    small_png(odd_png)
    small_png(cxr / "plain.png", seed=1)
    small_nifti(vols / os.fsdecode(b"vol\x80.nii.gz"))
    manifest = write_manifest(tmp_path, [{"name": "cxr", "kind": "image2d", "root": "cxr"},
                                         {"name": "vols", "kind": "nifti", "root": "vols"}])
    rows = index(manifest, tmp_path / "o")
    escaped = {u for (s, u) in rows if s == "cxr"}
    assert escaped == {"caf%E9/%FF%FE 50%25.png", "plain.png"}
    assert all(r["status"] == "indexed" for r in rows.values())
    assert source_path(cxr, "caf%E9/%FF%FE 50%25.png").read_bytes() == odd_png.read_bytes()
    run = run_cli("convert", str(manifest), "--out", str(tmp_path / "nifti"), timeout=INDEX_TIMEOUT)
    clean(run)
    assert len(list((tmp_path / "nifti").glob("*.nii.gz"))) == 3
    converted = ledger(tmp_path / "nifti" / "ledger.parquet")
    assert all(r["status"] == "indexed" for r in converted.values())


# -- 3. decompression bombs ----------------------------------------------------------------------


def test_decompression_bombs_are_set_aside_before_anything_is_decoded(tmp_path: Path) -> None:
    cxr = tmp_path / "cxr"
    png(cxr / "bomb_12000.png", 12000, 12000)  # ~140 KB, under PIL's own limit; 144 MB decoded
    png(cxr / "bomb_30000.png", 30000, 30000, complete=False)  # over PIL's limit (DecompressionBombError)
    for k in range(3):
        small_png(cxr / f"ok{k}.png", seed=k)
    manifest = write_manifest(tmp_path, [{"name": "cxr", "kind": "image2d", "root": "cxr"}])
    rows = index(manifest, tmp_path / "o")
    assert rows[("cxr", "bomb_12000.png")]["status"] == "skipped"
    assert rows[("cxr", "bomb_12000.png")]["reason"] == "declared size 12000×12000 (144 M pixels) exceeds max_pixels (50 M)"
    assert rows[("cxr", "bomb_30000.png")]["status"] == "skipped"
    assert "exceeds" in rows[("cxr", "bomb_30000.png")]["reason"]
    assert sum(r["status"] == "indexed" for r in rows.values()) == 3
    run = run_cli("convert", str(manifest), "--out", str(tmp_path / "nifti"), timeout=INDEX_TIMEOUT)
    clean(run)
    assert run.peak_mib < INDEX_PEAK_MIB and len(list((tmp_path / "nifti").glob("*.nii.gz"))) == 3


def test_the_pixel_cap_is_the_manifests(tmp_path: Path) -> None:
    small_png(tmp_path / "cxr" / "a.png")  # 40 × 48
    manifest = write_manifest(tmp_path, [{"name": "cxr", "kind": "image2d", "root": "cxr", "max_pixels": 1000}])
    rows = index(manifest, tmp_path / "o")
    assert rows[("cxr", "a.png")]["reason"] == "declared size 40×48 (1.92 k pixels) exceeds max_pixels (1 k)"


# -- 4. tiny files claiming huge volumes -----------------------------------------------------------


def test_tiny_files_claiming_huge_volumes_are_set_aside_and_the_rest_runs(tmp_path: Path) -> None:
    ct, vols = tmp_path / "ct", tmp_path / "vols"
    huge = huge_rle_series(ct / "huge")  # 8 × ~2 KB, each claiming 65535 × 65535
    fac.write_series(ct / "valid", n_slices=8, seed=1)
    huge_nifti_header(vols / "claims_4096x4096x1024.nii")
    small_nifti(vols / "fine.nii.gz")
    manifest = write_manifest(tmp_path, [{"name": "ct", "kind": "dicom", "root": "ct"}, {"name": "vols", "kind": "nifti", "root": "vols"}])
    rows = index(manifest, tmp_path / "o")
    for p in huge:
        row = rows[("ct", p.relative_to(ct).as_posix())]
        assert row["status"] == "skipped" and row["reason"].startswith("declared size 65535×65535×8"), row
    assert rows[("vols", "claims_4096x4096x1024.nii")]["reason"].startswith("declared size 4096×4096×1024")
    assert sorted((i["source"], i["shape"]) for i in items(tmp_path / "o")) == [("ct", [16, 12, 8]), ("vols", [12, 10, 8])]
    run = run_cli("convert", str(manifest), "--out", str(tmp_path / "nifti"), timeout=INDEX_TIMEOUT)
    clean(run)
    assert run.peak_mib < INDEX_PEAK_MIB, f"convert peaked at {run.peak_mib:.0f} MiB"
    assert len(list((tmp_path / "nifti").glob("*.nii.gz"))) == 2


def test_a_lower_voxel_cap_sets_aside_a_valid_volume(tmp_path: Path) -> None:
    small_nifti(tmp_path / "vols" / "a.nii.gz")  # 960 voxels
    rows = index(write_manifest(tmp_path, [{"name": "vols", "kind": "nifti", "root": "vols", "max_voxels": 500}]), tmp_path / "o")
    assert rows[("vols", "a.nii.gz")]["reason"] == "declared size 12×10×8 (960 voxels) exceeds max_voxels (500)"


# -- 5. reasons name no path -----------------------------------------------------------------------


def test_reasons_say_what_is_wrong_never_where(tmp_path: Path) -> None:
    person = tmp_path / "ct" / "DOE^JOHN_MRN12345"
    truncated = fac.write_series(person / "series1", n_slices=8, seed=2)
    fac.truncate(truncated.paths[5])
    corrupt_rle_series(person / "series2", broken=6)
    vols = tmp_path / "vols" / "DOE^JOHN_MRN12345"
    vols.mkdir(parents=True)
    (vols / "scan.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    small_nifti(vols / "fine.nii.gz")
    manifest = write_manifest(tmp_path, [{"name": "ct", "kind": "dicom", "root": "ct"}, {"name": "vols", "kind": "nifti", "root": "vols"}])
    rows = index(manifest, tmp_path / "o")
    assert_no_path_in_reasons(rows, str(tmp_path), "scan.nii")
    assert rows[("vols", "DOE^JOHN_MRN12345/scan.nii.gz")]["status"] == "quarantined"
    assert any(r["reason"].startswith("corrupt: truncated pixel data") for r in rows.values())
    run = run_cli("convert", str(manifest), "--out", str(tmp_path / "nifti"), timeout=INDEX_TIMEOUT)
    clean(run)
    converted = ledger(tmp_path / "nifti" / "ledger.parquet")
    assert_no_path_in_reasons(converted, str(tmp_path), "scan.nii", "IM0006")
    failed = {r["reason"] for r in converted.values() if r["reason"].startswith("conversion failed")}
    assert len(failed) == 1 and "(slice 6 of 8)" in failed.pop()


# -- 6. one patient, one key -------------------------------------------------------------------------


def test_2d_dicom_takes_its_patient_from_patient_id_and_needs_no_extension(tmp_path: Path) -> None:
    cxr = tmp_path / "cxr"
    for name in ("a.dcm", "b.dcm", "c"):  # three images of one patient, one without an extension
        radiograph(cxr / name, patient_id="PAT-7", seed=len(name))
    radiograph(cxr / "other.dcm", patient_id="PAT-8")
    (cxr / "notes").write_text("not an image")
    rows = index(write_manifest(tmp_path, [{"name": "cxr", "kind": "image2d", "root": "cxr"}]), tmp_path / "o")
    assert rows[("cxr", "c")]["status"] == "indexed" and rows[("cxr", "notes")]["status"] == "skipped"
    keys = {i["uris"][0]: i["patient_key"] for i in items(tmp_path / "o")}
    assert keys["a.dcm"] == keys["b.dcm"] == keys["c"] != keys["other.dcm"]


# -- 11. media directories ---------------------------------------------------------------------------


def test_media_directories_are_skipped_not_quarantined(tmp_path: Path) -> None:
    for folder in ("ct", "cxr"):
        media_directory(tmp_path / folder / "DICOMDIR")
        media_directory(tmp_path / folder / "DIRFILE", preamble=False)
    fac.write_series(tmp_path / "ct" / "s", n_slices=8)
    radiograph(tmp_path / "cxr" / "x.dcm", patient_id="P")
    rows = index(write_manifest(tmp_path, [{"name": "ct", "kind": "dicom", "root": "ct"}, {"name": "cxr", "kind": "image2d", "root": "cxr"}]),
                 tmp_path / "o")
    for key in (("ct", "DICOMDIR"), ("ct", "DIRFILE"), ("cxr", "DICOMDIR"), ("cxr", "DIRFILE")):
        assert rows[key]["status"] == "skipped" and rows[key]["reason"].startswith("media directory"), (key, rows[key])
    assert len(items(tmp_path / "o")) == 2


# -- 12. burned-in text --------------------------------------------------------------------------------


def test_images_at_risk_of_burned_in_text_are_set_aside_unless_kept(tmp_path: Path) -> None:
    marked = fac.write_series(tmp_path / "ct" / "marked", n_slices=8, extra={"BurnedInAnnotation": "YES"})
    fac.write_series(tmp_path / "ct" / "plain", n_slices=8, seed=1, extra={"BurnedInAnnotation": "NO"})
    radiograph(tmp_path / "ct" / "us.dcm", patient_id="P", modality="US")
    radiograph(tmp_path / "cxr" / "dx_marked.dcm", patient_id="P", burned_in="YES")
    radiograph(tmp_path / "cxr" / "dx.dcm", patient_id="P")
    sources = [{"name": "ct", "kind": "dicom", "root": "ct"}, {"name": "cxr", "kind": "image2d", "root": "cxr"}]
    rows = index(write_manifest(tmp_path, sources), tmp_path / "o")
    first = marked.paths[0].relative_to(tmp_path / "ct").as_posix()
    assert rows[("ct", first)]["reason"].startswith("burned-in annotation (BurnedInAnnotation YES)")
    assert rows[("ct", "us.dcm")]["reason"].startswith("ultrasound")
    assert rows[("cxr", "dx_marked.dcm")]["reason"].startswith("burned-in annotation")
    assert len(items(tmp_path / "o")) == 2
    kept = index(write_manifest(tmp_path, [{**s, "keep_burned_in": True} for s in sources]), tmp_path / "o2")
    assert kept[("ct", first)]["status"] == "indexed" and kept[("cxr", "dx_marked.dcm")]["status"] == "indexed"


# -- the whole build over a hostile archive -------------------------------------------------------------


BUILD_TIMEOUT = 900  # seconds; the healthy build of this archive takes ~1-2 minutes on 2 busy cores
BUILD_PEAK_MIB = 3500  # the build and every Ray process; the bomb alone took a build to 4.1 GB


@pytest.mark.slow
@pytest.mark.ray
def test_a_build_over_a_hostile_archive_finishes_and_shares_nothing_identifying(tmp_path: Path) -> None:
    from curation.demo import write_demo_archive

    demo = tmp_path / "demo"
    write_demo_archive(demo, cases=1, seed=0, cxr_images=4)
    truth = json.loads((demo / "ground_truth.json").read_text())
    ct, cxr, vols = demo / "ct", demo / "cxr", tmp_path / "vols"
    huge_rle_series(ct / "DOE^JOHN_MRN12345" / "huge")
    os.symlink(".", ct / "loop")
    os.mkfifo(ct / "pipe")
    png(cxr / "images" / "bomb_12000.png", 12000, 12000)
    png(cxr / "images" / "bomb_30000.png", 30000, 30000, complete=False)
    small_png(cxr / "images" / os.fsdecode(b"\xff odd name.png"))
    header = (cxr / "labels.csv").read_text().splitlines()[0].split(",")
    with (cxr / "labels.csv").open("a") as f:  # a labels table names such a file by its text (README: Index and ledger)
        f.write(",".join(["images/%FF odd name.png", "ODD-1", *["0"] * (len(header) - 2)]) + "\n")
    media_directory(ct / "DICOMDIR")
    huge_nifti_header(vols / "DOE^JOHN_MRN12345" / "claims.nii")
    small_nifti(vols / "DOE^JOHN_MRN12345" / "fine.nii.gz", shape=(24, 24, 16))
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump({
        "name": "hostile", "seed": 1,
        "sources": [
            {"name": "ct", "kind": "dicom", "root": str(ct), "labels": "../ct_labels"},
            {"name": "cxr", "kind": "image2d", "root": str(cxr), "labels": "labels.csv"},
            {"name": "vols", "kind": "nifti", "root": str(vols)},
        ],
        "experts": [{"name": "CT_TISSUE", "runner": "ct_tissue"}, {"name": "CXR", "runner": "labels"}],
        "tasks": [
            {"template": "findings/volume.j2", "source": "ct", "expert": "CT_TISSUE"},
            {"template": "findings/volume.j2", "source": "vols", "expert": "CT_TISSUE"},
            {"template": "cxr/expert_hint_vqa.j2", "source": "cxr", "expert": "CXR"},
        ],
        "output": {"dir": str(tmp_path / "out"), "image_max_side": 64},
    }, sort_keys=False))
    run = run_cli("-q", "build", str(manifest), timeout=BUILD_TIMEOUT)
    clean(run)
    assert run.peak_mib < BUILD_PEAK_MIB, f"build peaked at {run.peak_mib:.0f} MiB"
    out = tmp_path / "out"
    rows = ledger(out / "internal" / "ledger.parquet")
    for source, root in (("ct", ct), ("cxr", cxr), ("vols", vols)):
        assert files_under(root) <= {u for s, u in rows if s == source}
    assert rows[("cxr", "images/bomb_12000.png")]["status"] == "skipped"
    assert rows[("ct", "DICOMDIR")]["reason"].startswith("media directory")
    assert rows[("vols", "DOE^JOHN_MRN12345/claims.nii")]["reason"].startswith("declared size 4096×4096×1024")
    used = {(s, u) for (s, u), r in rows.items() if r["status"] == "used"}
    assert ("vols", "DOE^JOHN_MRN12345/fine.nii.gz") in used
    assert ("cxr", "images/%FF odd name.png") in used
    assert sum(1 for s, _ in used if s == "ct") >= 40 and sum(1 for s, _ in used if s == "cxr") >= 4
    shared = shareable_bytes(out)
    secrets = [*IDENTIFIERS, *truth["ct"][0]["identifiers"].values()]
    assert shared and not [s for s in secrets if isinstance(s, str) and len(s) > 3 and s.encode() in shared]
