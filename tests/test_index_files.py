"""Indexing of NIfTI, NIfTI-group and 2D-image sources, and the ledger's accounting."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from curation.errors import CurationError
from curation.ingest.index import build_index, write_index
from curation.ingest import readers_for
from curation.items import items_from_table
from curation.manifest import load_manifest

import pyarrow.parquet as pq

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def save(path: Path, array: np.ndarray, affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    vols = tmp_path / "vols"
    save(vols / "p1_ct.nii.gz", rng.normal(size=(8, 9, 10)).astype(np.float32))
    save(vols / "sub" / "p2_ct.nii", rng.integers(-1000, 1000, size=(8, 9, 10)).astype(np.int16))
    save(vols / "p3_fmri.nii.gz", rng.normal(size=(8, 9, 10, 3)).astype(np.float32))
    (vols / "broken.nii.gz").write_bytes(b"not a nifti file")
    (vols / "notes.txt").write_text("hello")
    brain = tmp_path / "brain"
    for case in ("C1", "C2"):
        for ch in ("t1c", "t1", "t2", "flair", "seg"):
            if case == "C2" and ch == "flair":
                continue
            save(brain / case / f"{case}_{ch}.nii.gz", rng.normal(size=(6, 7, 5)).astype(np.float32))
    save(brain / "C1" / "C1_dwi.nii.gz", np.zeros((6, 7, 5), np.float32))
    cxr = tmp_path / "cxr"
    (cxr / "images").mkdir(parents=True)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 30), dtype=np.uint8)).save(cxr / "images" / f"x{i}.png")
    (cxr / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (cxr / "labels.csv").write_text("image,patient_id,Cardiomegaly,Effusion\nimages/x0.png,P1,1,0\nimages/x1.png,P1,0,1\n")
    return tmp_path


@pytest.fixture
def manifest(archive: Path, write_manifest) -> Path:
    return write_manifest(
        {
            "name": "files",
            "key": "test-secret",
            "sources": [
                {"name": "vols", "kind": "nifti", "root": "vols", "patient_pattern": r"(?P<patient>p\d+)_"},
                {"name": "brain", "kind": "nifti_group", "root": "brain", "channels": ["t1c", "t1", "t2", "flair"], "labels": "seg"},
                {"name": "cxr", "kind": "image2d", "root": "cxr", "labels": "labels.csv"},
            ],
        }
    )


def test_every_file_is_ledgered_once_with_reasons(manifest: Path, archive: Path):
    index = build_index(load_manifest(manifest))
    files = sorted(p for p in archive.rglob("*") if p.is_file() and p.suffix != ".yaml")
    ledgered = sorted((e.source, e.uri) for e in index.ledger)
    assert len(ledgered) == len(set(ledgered)) == len(files)
    by_uri = {e.uri: e for e in index.ledger}
    assert by_uri["broken.nii.gz"].status == "quarantined" and by_uri["broken.nii.gz"].reason.startswith("corrupt")
    assert by_uri["notes.txt"].status == "skipped" and "unsupported" in by_uri["notes.txt"].reason
    assert by_uri["C2/C2_t1c.nii.gz"].reason == "incomplete case: missing flair"
    assert "channel 'dwi'" in by_uri["C1/C1_dwi.nii.gz"].reason
    assert by_uri["images/bad.png"].status == "quarantined"
    assert by_uri["labels.csv"].status == "indexed"
    assert by_uri["C1/C1_seg.nii.gz"].reason == "ground-truth label map"


def test_items(manifest: Path):
    index = build_index(load_manifest(manifest))
    by_source: dict[str, list] = {}
    for item in index.items:
        by_source.setdefault(item.source, []).append(item)
    vols = by_source["vols"]
    assert len(vols) == 2 + 3  # two 3D volumes and a 4D file split into three
    assert sorted(i.frame for i in vols if i.frame is not None) == [0, 1, 2]
    p1 = next(i for i in vols if i.uris == ["p1_ct.nii.gz"])
    assert p1.shape == [8, 9, 10] and p1.spacing == [2.0, 2.0, 3.0] and p1.modality == "CT"
    assert p1.series_number is None
    (group,) = by_source["brain"]
    assert group.channels == ["t1c", "t1", "t2", "flair"]
    assert group.uris == [f"C1/C1_{c}.nii.gz" for c in group.channels]
    assert group.label_uri == "C1/C1_seg.nii.gz"
    cxr = by_source["cxr"]
    assert len(cxr) == 3
    x0 = next(i for i in cxr if i.uris == ["images/x0.png"])
    assert x0.shape == [30, 40] and x0.attrs["labels"] == {"Cardiomegaly": 1, "Effusion": 0}
    # the two images of patient P1 share a patient key; raw ids appear nowhere
    x1 = next(i for i in cxr if i.uris == ["images/x1.png"])
    assert x0.patient_key == x1.patient_key
    for item in index.items:
        assert "P1" not in item.patient_key and "p1" not in item.patient_key and len(item.item_id) == 16


def test_keys_depend_on_the_secret(manifest: Path, monkeypatch):
    a = {i.uris[0] + str(i.frame): i.item_id for i in build_index(load_manifest(manifest)).items}
    monkeypatch.setenv("M3_CURATE_KEY", "another-secret")
    b = {i.uris[0] + str(i.frame): i.item_id for i in build_index(load_manifest(manifest)).items}
    assert a.keys() == b.keys() and all(a[k] != b[k] for k in a)


def test_written_index_round_trips_and_loads(manifest: Path, tmp_path: Path):
    spec = load_manifest(manifest)
    index = build_index(spec)
    index_path, ledger_path = write_index(index, tmp_path / "out" / "index.parquet", tmp_path / "out" / "ledger.parquet")
    table = pq.read_table(index_path)
    for column in ("item_id", "patient_key", "study_key", "source", "kind", "modality", "shape", "spacing", "n_files", "uris", "series_number"):
        assert column in table.column_names
    assert pq.read_table(ledger_path).num_rows == len(index.ledger)
    items = items_from_table(table)
    assert items == index.items
    readers = readers_for(spec)
    for item in items:
        volume = readers[item.source].load(item)
        expected = list(item.shape) + ([len(item.channels)] if item.channels else [])
        assert list(volume.array.shape) == expected
        assert volume.affine.shape == (4, 4)
    group = next(i for i in items if i.kind == "nifti_group")
    assert readers["brain"].load_labels(group).array.shape == tuple(group.shape)


def test_user_errors(tmp_path: Path, write_manifest):
    missing = write_manifest({"name": "m", "sources": [{"name": "a", "kind": "nifti", "root": "nowhere"}]}, "missing.yaml")
    with pytest.raises(CurationError, match="source 'a': root folder not found"):
        build_index(load_manifest(missing))
    (tmp_path / "empty").mkdir()
    empty = write_manifest({"name": "m", "sources": [{"name": "a", "kind": "nifti", "root": "empty"}]}, "empty.yaml")
    with pytest.raises(CurationError, match="source 'a': no files under"):
        build_index(load_manifest(empty))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "labels.csv").write_text("file,Effusion\na.png,1\n")
    badcsv = write_manifest({"name": "m", "sources": [{"name": "c", "kind": "image2d", "root": "c", "labels": "labels.csv"}]}, "csv.yaml")
    with pytest.raises(CurationError, match="needs a header row with an 'image' column"):
        build_index(load_manifest(badcsv))


def test_a_case_set_aside_has_the_status_of_the_check_it_failed(tmp_path: Path, write_manifest, monkeypatch):
    """A case without all its sequences or over the size cap is skipped; one with an unreadable
    file or sequences that disagree is quarantined. The status follows the check, not its words."""
    from curation.ingest import base
    from curation.ingest.index import list_files
    from curation.ingest.nifti import NiftiGroupReader

    brain, rng = tmp_path / "brain", np.random.default_rng(1)
    cases = {"missing": {"t1": (4, 4, 4)}, "unreadable": {"t1": (4, 4, 4), "t2": None}, "four_d": {"t1": (4, 4, 4), "t2": (4, 4, 4, 2)},
             "shape": {"t1": (4, 4, 4), "t2": (4, 4, 5)}, "affine": {"t1": (4, 4, 4), "t2": "moved"}, "large": {"t1": (10, 10, 10), "t2": (10, 10, 10)},
             "fine": {"t1": (4, 4, 4), "t2": (4, 4, 4)}}
    for case, files in cases.items():
        for channel, shape in files.items():
            path = brain / case / f"{case}_{channel}.nii.gz"
            if shape is None:
                path.write_bytes(b"not a nifti file")
            else:
                moved = shape == "moved"
                save(path, rng.normal(size=(4, 4, 4) if moved else shape).astype(np.float32), AFFINE + (np.eye(4, k=1) if moved else 0))
    spec = load_manifest(write_manifest({"name": "m", "sources": [
        {"name": "brain", "kind": "nifti_group", "root": "brain", "channels": ["t1", "t2"], "max_voxels": 1000}]}))
    expected = {"missing": "skipped", "unreadable": "quarantined", "four_d": "quarantined", "shape": "quarantined",
                "affine": "quarantined", "large": "skipped", "fine": "indexed"}

    def statuses() -> dict[str, str]:
        scan = readers_for(spec)["brain"].scan(list_files(brain))
        by_case: dict[str, set[str]] = {}
        for e in scan.ledger:
            by_case.setdefault(e.uri.split("/")[0], set()).add(e.status)
        assert all(len(s) == 1 for s in by_case.values()), by_case  # a case's files share its fate
        return {case: s.pop() for case, s in by_case.items()}

    assert statuses() == expected
    disagreement = NiftiGroupReader._disagreement  # the same findings, other words
    monkeypatch.setattr(NiftiGroupReader, "_disagreement", staticmethod(
        lambda headers: None if (p := disagreement(headers)) is None else p.replace("disagree", "differ").replace("not 3D", "4D")))
    size_problem = base.size_problem
    monkeypatch.setattr(base, "size_problem", lambda *a, **k: None if (p := size_problem(*a, **k)) is None else f"sequences disagree with the cap: {p}")
    assert statuses() == expected
