"""User mistakes give one line on stderr and exit status 2, never a traceback."""

from pathlib import Path

from curation.cli import main


def run(capsys, *argv: str) -> tuple[int, str]:
    code = main(["-q", *argv])
    err = capsys.readouterr().err
    return code, err


def one_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_missing_manifest(capsys, tmp_path):
    code, err = run(capsys, "index", str(tmp_path / "nope.yaml"))
    assert code == 2 and "manifest not found" in one_line(err)


def test_typo_in_manifest(capsys, write_manifest):
    path = write_manifest({"name": "x", "sources": [{"name": "a", "kind": "nifti", "root": "a", "modalty": "CT"}]})
    code, err = run(capsys, "index", str(path))
    assert code == 2 and "sources[0].nifti.modalty: unknown key" in one_line(err)


def test_missing_root(capsys, write_manifest):
    path = write_manifest({"name": "x", "sources": [{"name": "a", "kind": "nifti", "root": "gone"}]})
    code, err = run(capsys, "index", str(path))
    assert code == 2 and "m.yaml: sources[0].root: folder not found" in one_line(err)


def test_empty_folder(capsys, write_manifest, tmp_path):
    (tmp_path / "empty").mkdir()
    path = write_manifest({"name": "x", "sources": [{"name": "a", "kind": "dicom", "root": "empty"}]})
    code, err = run(capsys, "convert", str(path), "--out", str(tmp_path / "o"))
    assert code == 2 and "source 'a': no files under" in one_line(err)


def test_unreadable_labels_table(capsys, write_manifest, tmp_path):
    root = tmp_path / "cxr"
    root.mkdir()
    (root / "labels.csv").write_bytes(b"\xff\xfe\x00binary\x00\xff")
    path = write_manifest({"name": "x", "sources": [{"name": "c", "kind": "image2d", "root": "cxr", "labels": "labels.csv"}]})
    code, err = run(capsys, "index", str(path))
    assert code == 2 and "labels.csv: cannot read the labels table" in one_line(err)


def test_index_writes_tables(capsys, write_manifest, tmp_path: Path):
    import nibabel as nib
    import numpy as np

    (tmp_path / "v").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "v" / "a.nii.gz")
    path = write_manifest({"name": "x", "sources": [{"name": "v", "kind": "nifti", "root": "v"}]})
    assert main(["-q", "index", str(path), "--out", str(tmp_path / "o")]) == 0
    assert (tmp_path / "o" / "internal" / "index.parquet").is_file() and (tmp_path / "o" / "internal" / "ledger.parquet").is_file()
    assert "1 items from 1 files" in capsys.readouterr().out
