"""The synthetic archive: deterministic, laid out as the indexer expects, and true to its
ground truth (the DICOM series is the phantom, the labels line up, the findings are visible)."""

from __future__ import annotations

import csv
import hashlib
import json
import subprocess
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import pydicom
import pytest

from curation.imaging import flip_axis
from scipy import ndimage

from curation.demo import (BRATS_LABELS, CT_LABELS, CXR_LABELS, FINDINGS, SEQUENCES, brain_phantom, build_ct,
                           cardiothoracic_ratio, ct_phantom, cxr_phantom, write_demo_archive)
from curation.demo.cxr import apical_air_pixels, costophrenic_density
from curation.demo.dicom import affine_from_headers
from curation.demo.identity import has_lesion
from curation.errors import CurationError

CASES = 2
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo_archive(out, cases=CASES, seed=0)
    return out


@pytest.fixture(scope="module")
def truth(archive: Path) -> dict:
    return json.loads((archive / "ground_truth.json").read_text())


def nifti(path: Path) -> nib.Nifti1Image:
    return cast(nib.Nifti1Image, nib.load(path))


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def read_series(archive: Path, files: list[str]) -> list[pydicom.Dataset]:
    headers = [pydicom.dcmread(archive / f) for f in files]
    return sorted(headers, key=lambda ds: float(ds.ImagePositionPatient[2]))


# --- determinism -------------------------------------------------------------------------

@pytest.mark.slow
def test_same_seed_gives_identical_bytes_and_another_seed_differs(archive: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_demo_archive(again, cases=CASES, seed=0)
    a = tree_digest(archive)
    assert tree_digest(again) == a
    other = tmp_path / "other"
    write_demo_archive(other, cases=1, seed=1, cxr_images=2)
    b = tree_digest(other)
    shared = {k for k in b if a.get(k) == b[k]}
    assert all(k.endswith("_seg.nii.gz") for k in shared)  # only empty label maps can coincide
    assert {k for k in a if k.startswith("ct/")}.isdisjoint(b)  # other patients, other ids


# sha256 over (path, sha256 of content) of every file of `--cases 4 --seed 0`, taken before the
# large-archive and full-size options were added: those options must not move a byte of the default.
DEFAULT_DEMO_DIGEST = "92e111e60c05770680f2cabdb600096e196a0a835a859af2f5da68942161dc9d"


def archive_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path, digest in tree_digest(root).items():
        h.update(path.encode() + b"\0" + bytes.fromhex(digest))
    return h.hexdigest()


@pytest.mark.slow
@pytest.mark.parametrize("jobs", [1, 2])
def test_the_default_demo_keeps_its_bytes_in_any_number_of_processes(tmp_path: Path, jobs: int) -> None:
    write_demo_archive(tmp_path / "demo", cases=4, seed=0, jobs=jobs)
    assert archive_digest(tmp_path / "demo") == DEFAULT_DEMO_DIGEST


def test_a_case_does_not_depend_on_the_archive_size(archive: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    write_demo_archive(small, cases=1, seed=0, cxr_images=3)
    a, b = tree_digest(archive), tree_digest(small)
    case0 = [k for k in b if k.startswith(("ct/", "ct_labels/", "brain/", "cxr/images/"))]
    assert case0 and all(a[k] == b[k] for k in case0)


@pytest.mark.slow
def test_rewriting_a_demo_archive_replaces_it_and_a_foreign_folder_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "a"
    write_demo_archive(out, cases=1, seed=3, cxr_images=2)
    (out / "cxr" / "images" / "stale.png").write_bytes(b"")
    write_demo_archive(out, cases=1, seed=3, cxr_images=1)
    assert sorted(p.name for p in (out / "cxr" / "images").iterdir()) == ["cxr_0001.png"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(CurationError, match="not empty"):
        write_demo_archive(tmp_path / "b", cases=1)
    assert (tmp_path / "b" / "notes.txt").read_text() == "mine"
    with pytest.raises(CurationError, match="--cases"):
        write_demo_archive(tmp_path / "c", cases=0)


# --- layout and ground truth --------------------------------------------------------------

def test_layout_counts_and_every_file_accounted_for(archive: Path, truth: dict) -> None:
    listed: set[str] = {"ground_truth.json", truth["cxr"]["labels_csv"], truth["ct_truncated"]["file"]}
    assert truth["seed"] == 0 and truth["cases"] == CASES
    assert len(truth["ct"]) == len(truth["brain"]) == CASES
    for case in truth["ct"]:
        pid = case["patient_id"]
        assert pid.startswith("MRN") and len(pid) == 10
        assert {Path(f).parts[:3] for f in case["files"]} == {("ct", pid, "2")}
        assert len(case["files"]) == case["shape"][2]
        assert 1 <= len(case["localizer"]["files"]) <= 3
        assert all(Path(f).parts[:3] == ("ct", pid, "1") for f in case["localizer"]["files"])
        assert case["secondary_capture"]["files"] == [f"ct/{pid}/900/IM0001.dcm"]
        assert case["label_file"] == f"ct_labels/{case['series_uid']}.nii.gz"
        listed |= {*case["files"], *case["localizer"]["files"], *case["secondary_capture"]["files"], case["label_file"]}
    assert truth["ct_truncated"]["file"] == f"ct/{truth['ct'][0]['patient_id']}/99/IM0001.dcm"
    for case in truth["brain"]:
        cid = case["case_id"]
        assert [Path(f).name for f in case["files"].values()] == [f"{cid}_{s}.nii.gz" for s in SEQUENCES]
        listed |= {*case["files"].values(), case["seg"]}
    assert len(truth["cxr"]["images"]) == 16  # max(16, 8 × cases)
    listed |= {f"cxr/{img['image']}" for img in truth["cxr"]["images"]}
    on_disk = {p.relative_to(archive).as_posix() for p in archive.rglob("*") if p.is_file()}
    assert on_disk == listed


def test_at_least_one_case_with_and_one_without_tumour(truth: dict) -> None:
    assert sorted(c["hepatic_tumor"] for c in truth["ct"]) == [False, True]
    assert sorted(c["tumor"] for c in truth["brain"]) == [False, True]
    for c in truth["ct"]:
        assert 0 <= c["hepatic_tumor_count"] <= 3 and (c["hepatic_tumor_count"] > 0) == c["hepatic_tumor"]


# --- CT ------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", range(CASES))
def test_ct_series_is_the_phantom_and_labels_line_up(archive: Path, truth: dict, case: int) -> None:
    record = truth["ct"][case]
    headers = read_series(archive, record["files"])
    volume = np.stack([ds.pixel_array.T.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
                       for ds in headers], axis=-1)
    # by hand: (column, row, slice) with rows stored bottom-up, the converter's layout
    volume, by_hand_affine = flip_axis(volume, affine_from_headers(headers), axis=1)
    hu, labels, affine = ct_phantom(0, case)
    assert np.array_equal(volume, hu)
    label_img = nifti(archive / record["label_file"])
    assert label_img.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(label_img.dataobj), labels)
    assert np.allclose(label_img.affine, by_hand_affine, atol=1e-3)
    assert np.allclose(label_img.affine, affine, atol=1e-3)
    assert {int(v) for v in np.unique(labels)} - {0} == {CT_LABELS[n] for n in record["structures"]}
    n_tumours = ndimage.label(labels == CT_LABELS["hepatic tumor"])[1]
    assert n_tumours == record["hepatic_tumor_count"]


def test_dcm2niix_agrees_with_the_label_map(archive: Path, truth: dict, tmp_path: Path) -> None:
    """An independent converter gives the phantom on the label map's grid, voxel for voxel."""
    dcm2niix = pytest.importorskip("dcm2niix", reason="dcm2niix (a dev extra) is not installed")
    record = truth["ct"][1]
    series = archive / Path(record["files"][0]).parent
    subprocess.run([dcm2niix.bin, "-z", "y", "-f", "series", "-o", str(tmp_path), str(series)], check=True, capture_output=True)
    converted = nifti(tmp_path / "series.nii.gz")
    label_img = nifti(archive / record["label_file"])
    assert np.allclose(converted.affine, label_img.affine, atol=1e-3)
    assert np.array_equal(np.asanyarray(converted.dataobj), ct_phantom(0, 1)[0])


def test_anatomy_sides_and_hu_ranges() -> None:
    hu, labels, affine = ct_phantom(0, 0)
    ijk = np.argwhere(hu > -500)
    body_x = (affine @ np.c_[ijk, np.ones(len(ijk))].T)[0].mean()

    def centroid_x(label_id: int) -> float:
        idx = np.argwhere(labels == label_id)
        return float((affine @ np.c_[idx, np.ones(len(idx))].T)[0].mean())

    # RAS: +x is the patient's right. Liver and right kidney right, spleen and left kidney left.
    assert centroid_x(CT_LABELS["liver"]) > body_x + 30
    assert centroid_x(CT_LABELS["right kidney"]) > body_x > centroid_x(CT_LABELS["left kidney"])
    assert centroid_x(CT_LABELS["spleen"]) < body_x - 30
    assert centroid_x(CT_LABELS["right lung lower lobe"]) > body_x > centroid_x(CT_LABELS["left lung lower lobe"])
    median = {name: float(np.median(hu[labels == lid])) for name, lid in CT_LABELS.items() if (labels == lid).any()}
    assert np.median(hu[0:5, 0:5, :]) < -950                     # air outside the body
    assert 45 < median["liver"] < 75 and 35 < median["spleen"] < 65
    assert median["aorta"] > 150 and median["right lung lower lobe"] < -750
    assert all(median[v] > 200 for v in ("vertebrae T11", "vertebrae L1", "vertebrae L3"))
    # Vertebrae stack T11 (top) … L3 (bottom).
    z = [np.argwhere(labels == CT_LABELS[v])[:, 2].mean() for v in ("vertebrae T11", "vertebrae T12", "vertebrae L1",
                                                                  "vertebrae L2", "vertebrae L3")]
    assert z == sorted(z, reverse=True)


def test_tumours_are_hypodense_inside_the_liver() -> None:
    case = next(c for c in range(2) if has_lesion(0, "ct", c))
    hu, labels, _ = ct_phantom(0, case)
    tumour = labels == CT_LABELS["hepatic tumor"]
    assert np.median(hu[tumour]) < np.median(hu[labels == CT_LABELS["liver"]]) - 25
    around = ndimage.binary_dilation(tumour, iterations=1) & ~tumour
    assert set(np.unique(labels[around])) == {CT_LABELS["liver"]}


def test_headers_geometry_identifiers_and_instance_order(archive: Path, truth: dict) -> None:
    uids = set()
    for n, record in enumerate(truth["ct"]):
        headers = read_series(archive, record["files"])
        ds = headers[0]
        assert ds.SOPClassUID == CT_IMAGE and ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"] and ds.Modality == "CT"
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert (ds.BitsStored, ds.PixelRepresentation, float(ds.RescaleIntercept)) == (12, 0, -1024.0)
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 5.0
        assert {h.SeriesInstanceUID for h in headers} == {record["series_uid"]}
        assert {h.FrameOfReferenceUID for h in headers} == {ds.FrameOfReferenceUID}
        instances = [int(h.InstanceNumber) for h in headers]
        assert sorted(instances) == list(range(1, len(headers) + 1))
        if record["instance_order"] == "shuffled":
            assert instances != sorted(instances) and instances != sorted(instances, reverse=True)
        else:
            assert instances == sorted(instances, reverse=True)  # 1 at the top
        raw = (archive / record["files"][0]).read_bytes()
        for field, value in record["identifiers"].items():
            assert value.encode() in raw, field
        assert ds.PatientID == record["patient_id"] and ds.StudyInstanceUID == record["study_uid"]
        assert ds[0x0011, 0x1001].value == record["patient_id"]  # also in a private tag
        for h in headers:
            assert pydicom.uid.UID(h.SOPInstanceUID).is_valid
            uids.add(h.SOPInstanceUID)
        assert record["instance_order"] == ("shuffled" if n == 0 else "superior_first")
    assert len(uids) == sum(len(r["files"]) for r in truth["ct"])


def test_localizer_and_secondary_capture(archive: Path, truth: dict) -> None:
    for record in truth["ct"]:
        for f in record["localizer"]["files"]:
            ds = pydicom.dcmread(archive / f)
            assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"] and ds.SeriesNumber == 1
            assert ds.SOPClassUID == CT_IMAGE and ds.StudyInstanceUID == record["study_uid"]
            assert ds.SeriesInstanceUID == record["localizer"]["series_uid"] != record["series_uid"]
            assert float(ds.ImageOrientationPatient[5]) == -1.0  # coronal or sagittal, head up
            assert ds.pixel_array.max() > 0
        first = pydicom.dcmread(archive / record["localizer"]["files"][0])
        assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
        sc = pydicom.dcmread(archive / record["secondary_capture"]["files"][0])
        assert sc.SOPClassUID == SECONDARY_CAPTURE and list(sc.ImageType) == ["DERIVED", "SECONDARY"]
        assert sc.SeriesNumber == 900 and sc.StudyInstanceUID == record["study_uid"]
        assert sc.pixel_array.dtype == np.uint8 and "ImagePositionPatient" not in sc


def test_truncated_file_header_reads_but_pixels_do_not(archive: Path, truth: dict) -> None:
    entry = truth["ct_truncated"]
    path = archive / entry["file"]
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.SeriesNumber == 99 and ds.SeriesInstanceUID == entry["series_uid"]
    assert ds.PatientID == truth["ct"][0]["patient_id"]
    assert ds.SeriesInstanceUID not in {r["series_uid"] for r in truth["ct"]}
    assert path.stat().st_size < ds.Rows * ds.Columns * 2  # shorter than its pixel data alone
    with pytest.raises(Exception):
        pydicom.dcmread(path).pixel_array


# --- brain MRI --------------------------------------------------------------------------------

def test_brain_files_labels_and_contrasts(archive: Path, truth: dict) -> None:
    for record in truth["brain"]:
        images = {s: nifti(archive / f) for s, f in record["files"].items()}
        seg_img = nifti(archive / record["seg"])
        seg = np.asanyarray(seg_img.dataobj)
        assert seg.dtype == np.uint8 and set(np.unique(seg).tolist()) <= {0, 1, 2, 4}
        assert all(np.allclose(img.affine, seg_img.affine) and img.shape == seg.shape for img in images.values())
        assert (seg > 0).any() == record["tumor"]
        assert record["label_voxels"] == {str(v): int((seg == v).sum()) for v in BRATS_LABELS.values()}
        data = {s: np.asanyarray(img.dataobj).astype(np.float32) for s, img in images.items()}
        wm = (data["t1"] > 700) & (data["t2"] < 600)  # white matter: T1 bright, T2 dark
        csf = data["t2"] > 1150
        assert data["flair"][csf & (seg == 0)].mean() < data["flair"][wm & (seg == 0)].mean()
        if record["tumor"]:
            rim = seg == BRATS_LABELS["enhancing tumour"]
            assert data["t1c"][rim].mean() > 1.5 * data["t1"][rim].mean()
            oedema = seg == BRATS_LABELS["oedema"]
            assert data["flair"][oedema].mean() > 1.5 * data["flair"][wm & (seg == 0)].mean()
            # BraTS nesting: the necrotic core lies inside the enhancing rim.
            core = seg == BRATS_LABELS["necrotic core"]
            assert not (ndimage.binary_dilation(core) & (seg == 0)).any()


def test_brain_phantom_matches_files(archive: Path, truth: dict) -> None:
    p = brain_phantom(0, 0)
    on_disk = nifti(archive / truth["brain"][0]["files"]["t1c"])
    assert np.array_equal(np.asanyarray(on_disk.dataobj), p.images["t1c"])
    assert np.allclose(on_disk.affine, p.affine)


# --- chest X-ray --------------------------------------------------------------------------------

def test_cxr_labels_table(archive: Path, truth: dict) -> None:
    with (archive / "cxr" / "labels.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["image", "patient_id", *CXR_LABELS]
    assert len(CXR_LABELS) == 18
    for row, record in zip(rows, truth["cxr"]["images"]):
        assert row["image"] == record["image"] and (archive / "cxr" / row["image"]).is_file()
        assert [k for k in CXR_LABELS if row[k] == "1"] == record["positives"]
        assert set(record["positives"]) <= set(FINDINGS) and len(record["positives"]) <= 3
    per_patient: dict[str, int] = {}
    for row in rows:
        per_patient[row["patient_id"]] = per_patient.get(row["patient_id"], 0) + 1
    assert 2 in per_patient.values()
    for finding in FINDINGS:
        share = sum(row[finding] == "1" for row in rows) / len(rows)
        assert 0.15 <= share <= 0.6, finding


def test_cxr_findings_are_visible(archive: Path, truth: dict) -> None:
    from PIL import Image

    for index, record in enumerate(truth["cxr"]["images"]):
        sample = cxr_phantom(0, index)
        with Image.open(archive / "cxr" / record["image"]) as im:
            image = np.asarray(im)
        assert image.shape == (256, 256) and np.array_equal(image, sample.image)
        assert (cardiothoracic_ratio(image) > 0.5) == ("Cardiomegaly" in record["positives"])
        for side in ("right", "left"):
            effusion = record["findings"].get("Effusion", {}).get("side") == side
            assert (costophrenic_density(image, sample.chest, side) > 80) == effusion, (index, side)
            pneumothorax = record["findings"].get("Pneumothorax", {}).get("side") == side
            assert (apical_air_pixels(image, sample.chest, side) > 20) == pneumothorax, (index, side)
        for name in ("Nodule", "Mass"):
            if name in record["findings"]:
                r, c = record["findings"][name]["centre_rc"]
                assert image[r - 2:r + 3, c - 2:c + 3].mean() > 100  # opaque where lung is ~55–85


# --- archives of any size -----------------------------------------------------------------

@pytest.mark.slow
def test_a_large_archive_copies_cases_under_new_identities(tmp_path: Path) -> None:
    from curation.ingest.index import build_index
    from curation.manifest import BuildSpec

    out = tmp_path / "big"
    summary = write_demo_archive(out, cases=1, ct_cases=3, brain_cases=2, cxr_images=20, distinct=1, jobs=2)
    truth = json.loads((out / "ground_truth.json").read_text())
    ct = truth["ct"]
    assert [c.get("copy_of") for c in ct] == [None, 0, 0] and summary["ct"]["patients"] == 3
    assert len({c["patient_id"] for c in ct}) == len({c["series_uid"] for c in ct}) == len({c["study_uid"] for c in ct}) == 3
    drawn = [v for v in ct[0]["identifiers"].values() if len(v) > 3]
    for copy in ct[1:]:
        for f in copy["files"][:2] + copy["localizer"]["files"] + copy["secondary_capture"]["files"]:
            ds = pydicom.dcmread(out / f, stop_before_pixels=True)
            assert ds.PatientID == copy["patient_id"] and ds.StudyInstanceUID == copy["study_uid"]
            assert not [v for v in drawn if v in str(ds)], f  # no identifier of the drawn patient, private tags included
        assert (out / copy["label_file"]).is_file() and copy["label_file"].endswith(f"{copy['series_uid']}.nii.gz")
    assert [b.get("copy_of") for b in truth["brain"]] == [None, truth["brain"][0]["case_id"]]
    assert len(truth["cxr"]["images"]) == 20 and truth["cxr"]["images"][16]["copy_of"] == truth["cxr"]["images"][0]["image"]
    spec = BuildSpec(name="big", sources=[
        {"name": "ct", "kind": "dicom", "root": out / "ct", "labels": out / "ct_labels"},
        {"name": "brain", "kind": "nifti_group", "root": out / "brain", "channels": list(SEQUENCES), "labels": "seg"},
        {"name": "cxr", "kind": "image2d", "root": out / "cxr", "labels": out / "cxr" / "labels.csv"}])
    items = build_index(spec).items
    series = [i for i in items if i.source == "ct"]
    assert len(series) == 3 and len({i.patient_key for i in series}) == 3 and all(i.label_uri for i in series)
    assert sum(i.source == "brain" for i in items) == 2 and sum(i.source == "cxr" for i in items) == 20


def test_the_ct_at_scanner_size_is_the_same_patient() -> None:
    small = build_ct(0, 0)
    big = small.at_scanner_size(matrix=256, slices=90)
    assert big.hu.shape == (256, 256, 90) and big.hu.dtype == np.int16
    assert set(np.unique(big.labels)) == set(np.unique(small.labels))
    assert big.pixel_spacing == pytest.approx(small.pixel_spacing / 2, abs=1e-6)
    assert 89 * big.slice_spacing == pytest.approx((small.hu.shape[2] - 1) * small.slice_spacing, abs=1e-3)
    assert big.origin == small.origin
