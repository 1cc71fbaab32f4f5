"""The NIfTI-1 writer `convert` uses: what nibabel reads back from it is what nibabel itself would
have written (voxels, shape, type, sform, qform, zooms), whatever the array's memory layout."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from curation.ingest.nifti_write import write_nifti


def rotation(ax: float, ay: float) -> np.ndarray:
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    return rx @ ry


def affine(kind: str) -> np.ndarray:
    a = np.eye(4)
    a[:3, 3] = [-120.5, 33.25, -400.0]
    zooms = np.diag([0.7, 0.8, 2.5])
    if kind == "axial":
        a[:3, :3] = np.diag([-0.7, -0.8, 2.5])
    elif kind == "oblique":
        a[:3, :3] = rotation(0.3, -0.2) @ zooms
    elif kind == "left-handed":
        a[:3, :3] = rotation(0.1, 0.4) @ zooms @ np.diag([1, -1, 1])
    else:  # sheared, as a tilted CT gantry gives: the qform keeps the closest rotation
        a[:3, :3] = zooms + np.array([[0, 0, 0], [0, 0, 0.6], [0, 0, 0]])
    return a


@pytest.mark.parametrize("kind", ["axial", "oblique", "left-handed", "sheared"])
@pytest.mark.parametrize("dtype", [np.int16, np.float32, np.float64, np.uint8])
def test_nibabel_reads_what_it_would_have_written(tmp_path: Path, kind: str, dtype: type) -> None:
    data = (np.random.default_rng(0).normal(size=(7, 5, 4)) * 100).astype(dtype)
    ours = nib.load(write_nifti(tmp_path / "ours.nii", data, affine(kind)))
    ref_img = nib.Nifti1Image(data.astype(np.float32) if dtype == np.float64 else data, affine(kind))
    ref_img.set_qform(affine(kind), code=1)
    ref_img.set_sform(affine(kind), code=1)
    nib.save(ref_img, tmp_path / "ref.nii")
    ref = nib.load(tmp_path / "ref.nii")
    np.testing.assert_array_equal(np.asarray(ours.dataobj), np.asarray(ref.dataobj))
    assert ours.get_data_dtype() == ref.get_data_dtype()
    np.testing.assert_allclose(ours.get_sform(), affine(kind), atol=1e-4)
    np.testing.assert_allclose(ours.get_qform(), ref.get_qform(), atol=1e-4)
    assert ours.header.get_zooms() == pytest.approx(ref.header.get_zooms(), abs=1e-5)
    assert ours.header["sform_code"] == ours.header["qform_code"] == 1


@pytest.mark.parametrize("layout", ["C", "F", "flipped", "4D"])
def test_any_memory_layout_is_written_in_nifti_order(tmp_path: Path, layout: str) -> None:
    base = np.arange(6 * 5 * 4 * 3, dtype=np.int16).reshape(6, 5, 4, 3)
    data = {"C": np.ascontiguousarray(base[..., 0]), "F": np.asfortranarray(base[..., 0]),
            "flipped": np.flip(np.asfortranarray(base[..., 0]), axis=1), "4D": base}[layout]
    img = nib.load(write_nifti(tmp_path / "x.nii.gz", data, affine("axial")))
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)


def test_compressed_bytes_depend_on_the_voxels_alone(tmp_path: Path) -> None:
    data = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    a = write_nifti(tmp_path / "a.nii.gz", data, np.eye(4)).read_bytes()
    b = write_nifti(tmp_path / "b.nii.gz", data, np.eye(4)).read_bytes()
    assert a == b and a[:2] == b"\x1f\x8b"
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("name", ["x.nii", "x.nii.gz"])
def test_a_write_that_fails_midway_leaves_no_file_behind(tmp_path: Path, name: str, monkeypatch) -> None:
    """`convert` sets such an item aside and goes on: neither a partial NIfTI nor a temporary file stays."""
    from curation.ingest import nifti_write

    def fail(out, header, array):
        out.write(header)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(nifti_write, "_write_all", fail)
    with pytest.raises(Exception, match="No space left on device"):
        write_nifti(tmp_path / name, np.zeros((4, 4, 4), np.int16), np.eye(4))
    assert list(tmp_path.iterdir()) == []


def test_convert_command_leaves_unused_libraries_out(tmp_path: Path, write_manifest) -> None:
    """`m3-curate convert` races dcm2niix, so its process imports only what converting needs:
    a mosaic's CSA header and an RLE series (pydicom's decoders) bring in neither nibabel nor
    pandas (pyarrow's probe) nor requests (pydicom's downloader). Run as a user runs it, in a
    process of its own."""
    import subprocess
    import sys

    from pydicom import dcmread
    from pydicom.uid import RLELossless

    import dicom_factory as fac

    fac.write_mosaic(tmp_path / "in" / "mosaic" / "m.dcm")
    for path in fac.write_series(tmp_path / "in" / "rle", n_slices=4).paths:
        ds = dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    manifest = write_manifest({"name": "c", "sources": [{"name": "s", "kind": "dicom", "root": str(tmp_path / "in"),
                                                         "select": {"min_slices": 1}}]})
    probe = ("import sys\nfrom curation.cli import main\n"  # the command's `main`: `run` would end the process before the print
             f"assert main(['-q', 'convert', {str(manifest)!r}, '--out', {str(tmp_path / 'out')!r}]) == 0\n"
             "print(sorted(m for m in ('nibabel', 'pandas', 'requests', 'pydicom') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "['pydicom']"
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 2


def test_a_second_convert_into_a_folder_leaves_only_its_own_files_and_the_users(tmp_path: Path, write_manifest) -> None:
    """The last convert's files that this one does not write again (an item not indexed now,
    the other suffix) are removed, or they would read as items of this index; files convert
    never wrote stay."""
    import dicom_factory as fac
    from curation.ingest.convert import convert
    from curation.ingest.index import Index, build_index
    from curation.manifest import load_manifest

    for k, name in enumerate(("a", "b")):
        fac.write_series(tmp_path / "in" / name, n_slices=4, series_uid=f"1.2.3.{k + 1}")
    spec = load_manifest(write_manifest({"name": "c", "sources": [{"name": "s", "kind": "dicom", "root": str(tmp_path / "in"),
                                                                   "select": {"min_slices": 1}}]}))
    out = tmp_path / "out"
    index = build_index(spec)
    first = convert(spec, out, index=index)
    assert len(first.written) == 2
    (out / "mine.nii.gz").write_bytes(b"a user's own file")
    kept = index.items[:1]
    second = convert(spec, out, compress=False, index=Index(items=kept, ledger=[e for e in index.ledger if e.item_id == kept[0].item_id]))
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{kept[0].item_id}.nii", "mine.nii.gz", "index.parquet", "ledger.parquet", ".m3-curate.lock"])
    assert second.written == [out / f"{kept[0].item_id}.nii"]


def test_a_write_the_file_system_refuses_stops_convert_rather_than_setting_every_item_aside(tmp_path: Path, write_manifest) -> None:
    """A full disk (here a file-size limit: the same failing write, with EFBIG) is not the
    item's fault and no later item would fare better: one line naming the file, status 2,
    instead of every item quarantined and status 0."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    import dicom_factory as fac

    for k in range(3):
        fac.write_series(tmp_path / "in" / f"s{k}", rows=64, cols=64, n_slices=8, series_uid=f"1.2.3.{k + 1}")
    manifest = write_manifest({"name": "c", "sources": [{"name": "s", "kind": "dicom", "root": str(tmp_path / "in"), "select": {"min_slices": 1}}]})

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "curation", "-q", "convert", str(manifest), "--out", str(tmp_path / "out"), "--uncompressed"],
                          capture_output=True, text=True, preexec_fn=small_files, timeout=120, env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    said = done.stderr.strip().splitlines()[-1]
    assert said.startswith(f"m3-curate: error: cannot write {tmp_path / 'out'}/") and said.endswith(
        ".nii: File too large (the file exceeds the size limit of this process or file system)"), said
    assert not (tmp_path / "out" / "ledger.parquet").exists()  # no ledger that calls the items quarantined
