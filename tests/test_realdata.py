"""The DICOM reader against real scanner data: dcm_qa_ts (Siemens Trio mosaic, one image in nine
transfer syntaxes) and the NIfTI files dcm2niix made of it.

dcm2niix stores rows bottom-up (its y column points the other way from DICOM's row order); our
reader does the same, so the arrays are identical as stored, and the affines differ by at most
~1.2e-5 mm (the Ref sform is stored as float32).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import pyarrow.parquet as pq

from curation.ingest.convert import convert
from curation.ingest.dicom import DicomReader
from curation.items import StudyItem, Volume
from curation.keys import Keyer
from curation.manifest import DicomSourceSpec, load_manifest

DCM_QA_TS = Path(__file__).resolve().parents[2] / "shared/realdata/dcm_qa_ts"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(not (DCM_QA_TS / "In").is_dir(), reason=f"real DICOM test set not found at {DCM_QA_TS} (see shared/realdata/SOURCE.md)"),
]


@pytest.fixture(scope="module")
def loaded() -> list[tuple[StudyItem, Volume]]:
    root = DCM_QA_TS / "In"
    reader = DicomReader(DicomSourceSpec(name="dcm_qa_ts", kind="dicom", root=root), Keyer("test"))
    scan = reader.scan(sorted(p.name for p in root.iterdir() if p.is_file()))
    assert all(e.status == "indexed" for e in scan.ledger), [e for e in scan.ledger if e.status != "indexed"]
    return [(item, reader.load(item)) for item in scan.items]


def test_nine_series_nine_items(loaded: list[tuple[StudyItem, Volume]]) -> None:
    assert sorted(item.uris[0] for item, _ in loaded) == [f"{n}.dcm" for n in range(1, 10)]
    assert len({item.item_id for item, _ in loaded}) == 9
    for item, _ in loaded:
        assert item.shape == [64, 64, 35] and item.attrs["mosaic"] is True and item.modality == "MR"
        assert item.spacing == pytest.approx([3.25, 3.25, 3.6])


def test_all_transfer_syntaxes_decode_to_the_same_voxels(loaded: list[tuple[StudyItem, Volume]]) -> None:
    first = loaded[0][1]
    for _, volume in loaded[1:]:
        np.testing.assert_array_equal(volume.array, first.array)
        np.testing.assert_allclose(volume.affine, first.affine, atol=1e-9)


@pytest.mark.parametrize("n", range(1, 10))
def test_matches_dcm2niix(loaded: list[tuple[StudyItem, Volume]], n: int) -> None:
    item, volume = next((i, v) for i, v in loaded if i.uris[0] == f"{n}.dcm")
    ref = nib.load(DCM_QA_TS / "Ref" / f"{n}.nii")
    assert volume.array.shape == ref.shape == (64, 64, 35)
    assert volume.array.dtype == ref.get_data_dtype() == np.int16
    np.testing.assert_array_equal(volume.array, np.asarray(ref.dataobj))
    np.testing.assert_allclose(volume.affine, ref.affine, atol=1e-3)


def test_convert_writes_what_dcm2niix_writes(tmp_path: Path, write_manifest) -> None:
    """The command users run: `convert` over the nine files, each output equal to Ref/N.nii."""
    manifest = write_manifest({"name": "qa", "sources": [{"name": "ts", "kind": "dicom", "root": str(DCM_QA_TS / "In")}]})
    spec = load_manifest(manifest)
    result = convert(spec, tmp_path / "nifti")
    assert len(result.written) == 9 and not result.failed
    index = pq.read_table(tmp_path / "nifti" / "index.parquet").to_pylist()
    for row in index:
        n = row["uris"][0].removesuffix(".dcm")
        ours = nib.load(tmp_path / "nifti" / f"{row['item_id']}.nii.gz")
        ref = nib.load(DCM_QA_TS / "Ref" / f"{n}.nii")
        assert ours.shape == (64, 64, 35)
        np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(ref.dataobj))
        np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-3)
        assert nib.aff2axcodes(ours.affine) == nib.aff2axcodes(ref.affine)
