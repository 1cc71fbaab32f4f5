"""One size rule (`curation.ingest.base.size_problem`): the same oversize file reads the same in
the ledger wherever it is caught — by the scan, by a loader given an item that an index made
under other caps, and by a loader given a file that grew since it was indexed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from curation.errors import ItemError
from curation.ingest import SourceReader, readers_for
from curation.ingest.index import list_files
from curation.items import StudyItem
from curation.manifest import load_manifest
from fault_archive import huge_nifti_header, huge_rle_series, png, radiograph, small_nifti, small_png


def reader(tmp_path: Path, source: dict) -> SourceReader:
    path = tmp_path / f"{source['name']}.yaml"
    path.write_text(yaml.safe_dump({"name": "caps", "sources": [source]}))
    return readers_for(load_manifest(path))[source["name"]]


def scan_reasons(r: SourceReader) -> dict[str, str]:
    return {e.uri: e.reason for e in r.scan(list_files(r.root)).ledger}


def indexed(r: SourceReader, uri: str) -> StudyItem:
    (item,) = [i for i in r.scan(list_files(r.root)).items if uri in i.uris]
    return item


def load_reason(r: SourceReader, item: StudyItem, labels: bool = False) -> str:
    with pytest.raises(ItemError) as e:
        r.load_labels(item) if labels else r.load(item)
    return e.value.reason


def test_a_picture_over_max_pixels(tmp_path: Path) -> None:
    png(tmp_path / "cxr" / "bomb.png", 12000, 12000, complete=False)  # a 12000² header over one row
    source = {"name": "cxr", "kind": "image2d", "root": str(tmp_path / "cxr")}
    capped, roomy = reader(tmp_path, source), reader(tmp_path, {**source, "name": "roomy", "max_pixels": 150_000_000})
    reason = scan_reasons(capped)["bomb.png"]
    assert reason == "declared size 12000×12000 (144 M pixels) exceeds max_pixels (50 M)"
    assert load_reason(capped, indexed(roomy, "bomb.png")) == reason
    small_png(tmp_path / "cxr" / "grows.png")
    item = indexed(capped, "grows.png")
    png(tmp_path / "cxr" / "grows.png", 12000, 12000, complete=False)
    assert load_reason(capped, item) == scan_reasons(capped)["grows.png"] == reason


def test_a_volume_over_max_voxels(tmp_path: Path) -> None:
    vols = tmp_path / "vols"
    huge_nifti_header(vols / "claims.nii")
    source = {"name": "vols", "kind": "nifti", "root": str(vols)}
    capped, roomy = reader(tmp_path, source), reader(tmp_path, {**source, "name": "roomy", "max_voxels": 10**14})
    reason = scan_reasons(capped)["claims.nii"]
    assert reason == "declared size 4096×4096×1024 (17.2 G voxels) exceeds max_voxels (1.07 G)"
    assert load_reason(capped, indexed(roomy, "claims.nii")) == reason
    small_nifti(vols / "grows.nii")
    item = indexed(capped, "grows.nii")
    huge_nifti_header(vols / "grows.nii")
    assert load_reason(capped, item) == scan_reasons(capped)["grows.nii"] == reason


def test_a_label_map_that_grew_reads_as_the_volume_it_now_is(tmp_path: Path) -> None:
    brain = tmp_path / "brain"
    for channel in ("t1", "seg"):
        small_nifti(brain / "C1" / f"C1_{channel}.nii")
    group = reader(tmp_path, {"name": "brain", "kind": "nifti_group", "root": str(brain), "channels": ["t1"],
                              "labels": "seg", "pattern": "{case}/{case}_{channel}.nii"})
    (item,) = group.scan(list_files(brain)).items
    huge_nifti_header(brain / "C1" / "C1_seg.nii")
    as_volume = scan_reasons(reader(tmp_path, {"name": "vols", "kind": "nifti", "root": str(brain)}))["C1/C1_seg.nii"]
    assert load_reason(group, item, labels=True) == as_volume
    assert as_volume.startswith("declared size 4096×4096×1024")


def test_a_dicom_series_over_max_voxels(tmp_path: Path) -> None:
    huge_rle_series(tmp_path / "ct" / "huge")  # 8 slices of 65535²
    source = {"name": "ct", "kind": "dicom", "root": str(tmp_path / "ct")}
    capped, roomy = reader(tmp_path, source), reader(tmp_path, {**source, "name": "roomy", "max_voxels": 10**14})
    reasons = set(scan_reasons(capped).values())
    assert reasons == {"declared size 65535×65535×8 (34.4 G voxels) exceeds max_voxels (1.07 G)"}
    assert load_reason(capped, indexed(roomy, "huge/IM0001.dcm")) == reasons.pop()


def test_a_radiograph_over_max_pixels(tmp_path: Path) -> None:
    radiograph(tmp_path / "cxr" / "a.dcm", patient_id="P")  # 20 × 24
    source = {"name": "cxr", "kind": "image2d", "root": str(tmp_path / "cxr"), "max_pixels": 100}
    capped, roomy = reader(tmp_path, source), reader(tmp_path, {**source, "name": "roomy", "max_pixels": 1000})
    reason = scan_reasons(capped)["a.dcm"]
    assert reason == "declared size 20×24 (480 pixels) exceeds max_pixels (100)"
    assert load_reason(capped, indexed(roomy, "a.dcm")) == reason
