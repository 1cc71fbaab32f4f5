"""The DICOM reader against small synthetic archives whose truth is known: what was written is
what must come back, in the right place, and every file gets one ledger row with its reason."""

from __future__ import annotations

import doctest
import shutil
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.uid import RLELossless, generate_uid

import dicom_factory as fac
from curation.errors import ItemError
from curation.ingest import dicom, dicom_geometry, dicom_headers, dicom_pixels
from curation.ingest.base import Scan
from curation.ingest.dicom import DicomReader
from curation.ingest.dicom_geometry import is_uneven, order_slices
from curation.ingest.dicom_csa import CsaError, read_csa
from curation.ingest.dicom_headers import Header, read_header
from curation.ingest.dicom_pixels import rescale
from curation.ingest.dicom_quick import quick_header
from curation.ingest.image2d import Image2DReader
from curation.imaging import flip_axis
from curation.items import StudyItem, Volume
from curation.keys import Keyer
from curation.manifest import DicomSourceSpec, Image2DSourceSpec, SeriesRules

OBLIQUE = fac.oblique_orientation(20.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def reader_for(root: Path, **spec: object) -> DicomReader:
    return DicomReader(DicomSourceSpec(name="ct", kind="dicom", root=root, **spec), Keyer("test-secret"))  # type: ignore[arg-type]


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


@dataclass
class Archive:
    """A written archive, the reader over it, its scan, and what was written (by name)."""

    root: Path
    reader: DicomReader
    scan: Scan
    series: dict[str, fac.Series]
    truncated_uri: str
    truncated_left: int
    rle_cut_uri: str

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def item(self, name: str) -> StudyItem:
        """The one item made of (some of) the files of the series written as `name`."""
        written = {self.rel(p) for p in self.series[name].paths}
        found = [it for it in self.scan.items if set(it.uris) & written]
        assert len(found) == 1, f"{name}: expected one item, found {len(found)}"
        return found[0]

    def reason(self, uri: str) -> tuple[str, str]:
        return reason_of(self.scan, uri)


def reason_of(scan: Scan, uri: str) -> tuple[str, str]:
    rows = [e for e in scan.ledger if e.uri == uri]
    assert len(rows) == 1, f"{uri}: {len(rows)} ledger rows"
    return rows[0].status, rows[0].reason


def compress_rle(paths: list[Path]) -> None:
    for p in paths:
        ds = dcmread(p)
        ds.compress(RLELossless)
        ds.save_as(p)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Archive:
    """One archive with one of everything the reader must tell apart."""
    base = tmp_path_factory.mktemp("dicom")
    root = base / "archive"
    series: dict[str, fac.Series] = {}
    series["oblique"] = fac.write_series(root / "oblique", orientation=OBLIQUE, seed=1, patient_id="P1")
    duplicate = dcmread(series["oblique"].paths[3])
    duplicate.SOPInstanceUID = generate_uid()
    duplicate.InstanceNumber = 99
    fac.write(duplicate, root / "oblique" / "zz_duplicate.dcm")
    series["tilted"] = fac.write_series(root / "tilted", seed=2, slice_shift=(0.0, 0.6, 0.0))
    series["uneven"] = fac.write_series(root / "uneven", seed=3, slice_steps=[2.5] * 4 + [5.0] + [2.5] * 4)
    two = generate_uid()
    series["axial_half"] = fac.write_series(root / "two" / "a", series_uid=two, seed=4, name="ax")
    series["coronal_half"] = fac.write_series(root / "two" / "c", series_uid=two, orientation=CORONAL, seed=5, name="co")
    series["trunc"] = fac.write_series(root / "trunc", seed=6)
    truncated_left = fac.truncate(series["trunc"].paths[5])
    series["localizer"] = fac.write_series(root / "loc", n_slices=1, seed=7, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    series["derived"] = fac.write_series(root / "derived", seed=8, image_type=("DERIVED", "SECONDARY", "AXIAL"))
    series["few"] = fac.write_series(root / "few", n_slices=3, seed=9)
    series["mr"] = fac.write_series(root / "mr", seed=10, modality="MR", sop_class="1.2.840.10008.5.1.4.1.1.4", intercept=0.0, dtype=np.uint16)
    fac.write_secondary_capture(root / "misc" / "sc.dcm")
    fac.write_structured_report(root / "misc" / "report.dcm")
    (root / "misc" / "junk.bin").write_bytes(np.random.default_rng(0).bytes(3000))
    (root / "misc" / "README.txt").write_text("not DICOM, not claimed")
    series["implicit"] = fac.write_series(root / "implicit", seed=13, implicit_vr=True, nested_sequences=True)
    latin1 = {"SpecificCharacterSet": "ISO_IR 100", "PatientID": "M\u00dcLLER-7"}
    series["latin1"] = fac.write_series(root / "latin1", seed=14, nested_sequences=True, extra=latin1)
    series["multiframe"] = fac.write_multiframe(root / "enhanced" / "mf.dcm", frame_order=[4, 0, 8, 2, 6, 1, 3, 7, 5])
    series["dx"] = fac.write_radiograph(root / "dx" / "chest.dcm")
    series["rle"] = fac.write_series(root / "rle", seed=11, n_slices=8, name="r")
    compress_rle(series["rle"].paths)
    series["rlecut"] = fac.write_series(root / "rlecut", seed=12, n_slices=8, name="c")
    cut = series["rlecut"].paths[0]
    compress_rle([cut])
    cut.write_bytes(cut.read_bytes()[:-100])
    (base / "labels").mkdir()
    (base / "labels" / f"{series['oblique'].series_uid}.nii.gz").write_bytes(b"label")
    reader = reader_for(root, labels=base / "labels", select=SeriesRules(modalities=["CT", "DX"]), workers=4)
    return Archive(
        root, reader, reader.scan(files_under(root)), series,
        truncated_uri=series["trunc"].paths[5].relative_to(root).as_posix(),
        truncated_left=truncated_left,
        rle_cut_uri=cut.relative_to(root).as_posix(),
    )


def test_every_claimed_file_has_exactly_one_ledger_row(archive: Archive) -> None:
    uris = [e.uri for e in archive.scan.ledger]
    assert len(uris) == len(set(uris))
    assert set(uris) == set(files_under(archive.root)) - {"misc/README.txt"}  # left to the indexer
    indexed = {e.uri: e.item_id for e in archive.scan.ledger if e.status == "indexed"}
    assert indexed == {u: it.item_id for it in archive.scan.items for u in it.uris}
    assert all(e.item_id is None for e in archive.scan.ledger if e.status != "indexed")


def test_selection_reasons_are_distinct_and_specific(archive: Archive) -> None:
    first = {name: archive.rel(s.paths[0]) for name, s in archive.series.items()}
    assert archive.reason(first["localizer"]) == ("skipped", "localizer (ImageType contains LOCALIZER)")
    assert archive.reason("misc/sc.dcm") == ("skipped", f"secondary capture (SOPClassUID {fac.SECONDARY_CAPTURE})")
    assert archive.reason("misc/report.dcm") == ("skipped", f"no pixel data (SOPClassUID {fac.BASIC_TEXT_SR})")
    assert archive.reason(first["derived"]) == ("skipped", "ImageType lacks ORIGINAL/PRIMARY: DERIVED\\SECONDARY\\AXIAL")
    assert {archive.reason(archive.rel(p)) for p in archive.series["few"].paths} == {("skipped", "too few slices: 3 < 8")}
    assert archive.reason(first["mr"]) == ("skipped", "modality MR not in CT/DX")
    status, reason = archive.reason("misc/junk.bin")
    assert status == "quarantined" and reason.startswith("corrupt: not a DICOM file")
    assert archive.reason("oblique/zz_duplicate.dcm") == ("skipped", "duplicate slice position")


def test_truncated_files_are_quarantined_at_scan(archive: Archive) -> None:
    expected = f"corrupt: truncated pixel data ({archive.truncated_left} of 384 bytes)"  # 16 x 12 x 2 bytes
    assert archive.reason(archive.truncated_uri) == ("quarantined", expected)
    status, reason = archive.reason(archive.rle_cut_uri)
    assert status == "quarantined" and reason.startswith("corrupt: truncated pixel data (fragment")
    rest = archive.item("trunc")
    assert rest.n_files == 9 and archive.truncated_uri not in rest.uris


def test_one_uid_with_two_orientations_makes_two_items(archive: Archive) -> None:
    axial, coronal = archive.item("axial_half"), archive.item("coronal_half")
    uid = archive.series["axial_half"].series_uid
    assert [axial.item_id, coronal.item_id] == [archive.reader.keyer("item", uid, 0), archive.reader.keyer("item", uid, 1)]
    assert axial.n_files == coronal.n_files == 10


def test_oblique_series_sorted_by_position_and_loaded_exactly(archive: Archive) -> None:
    truth = archive.series["oblique"]
    item = archive.item("oblique")
    assert item.uris == [archive.rel(p) for p in truth.paths]  # position order ...
    assert [dcmread(archive.root / u).InstanceNumber for u in item.uris] != list(range(1, 11))  # ... not InstanceNumber
    assert item.shape == [16, 12, 10] and item.kind == "dicom" and item.modality == "CT"
    assert item.spacing == pytest.approx([0.7, 0.8, 2.5])
    keyer = archive.reader.keyer
    assert item.item_id == keyer("item", truth.series_uid, 0)
    assert (item.patient_key, item.study_key) == (keyer("patient", "P1"), keyer("study", truth.study_uid))
    assert item.label_uri == f"../labels/{truth.series_uid}.nii.gz"
    assert item.attrs == {"gantry_tilt_deg": 0.0, "uneven_spacing": False, "slice_spacings": [2.5, 2.5]}
    volume = as_written(archive.reader, item)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, truth.hu)
    assert_affine_places_voxels(volume.affine, truth)


def as_written(reader: DicomReader, item: StudyItem) -> Volume:
    """The loaded volume with rows back in DICOM's top-down order (the reader stores them
    bottom-up, as dcm2niix does), to compare with the pixels the factory wrote."""
    volume = reader.load(item)
    array, affine = flip_axis(volume.array, volume.affine, axis=1)
    return Volume(array=array, affine=affine)


def assert_affine_places_voxels(affine: np.ndarray, truth: fac.Series) -> None:
    """Voxel (i, j, k) must land on the RAS (LPS flipped) of the written position of slice k
    moved i columns along the row cosine and j rows along the column cosine."""
    row_dir, col_dir = np.array(truth.orientation[:3]), np.array(truth.orientation[3:])
    row_spacing, col_spacing = truth.pixel_spacing
    cols, rows = truth.hu.shape[:2]
    for k, position in enumerate(truth.positions):
        for i, j in [(0, 0), (cols - 1, 0), (0, rows - 1), (cols - 1, rows - 1)]:
            lps = position + i * col_spacing * row_dir + j * row_spacing * col_dir
            np.testing.assert_allclose((affine @ [i, j, k, 1])[:3], lps * [-1, -1, 1], atol=1e-3)


def test_gantry_tilt_is_recorded_and_placed(archive: Archive) -> None:
    item = archive.item("tilted")
    assert item.attrs["gantry_tilt_deg"] == pytest.approx(np.degrees(np.arctan(0.6 / 2.5)), abs=1e-3)
    volume = as_written(archive.reader, item)
    np.testing.assert_array_equal(volume.array, archive.series["tilted"].hu)
    assert_affine_places_voxels(volume.affine, archive.series["tilted"])


def test_uneven_spacing_is_flagged(archive: Archive) -> None:
    item = archive.item("uneven")
    assert item.attrs["uneven_spacing"] is True and item.attrs["slice_spacings"] == [2.5, 5.0]
    assert archive.item("tilted").attrs["uneven_spacing"] is False


def test_multiframe_is_one_item_in_position_order(archive: Archive) -> None:
    truth = archive.series["multiframe"]
    item = archive.item("multiframe")
    assert item.shape == [14, 10, 9] and item.n_files == 1 and item.attrs["multiframe"] is True
    assert item.spacing == pytest.approx([0.6, 0.9, 3.0])
    volume = as_written(archive.reader, item)
    np.testing.assert_array_equal(volume.array, truth.hu)
    assert_affine_places_voxels(volume.affine, truth)


def test_compressed_series_loads_like_uncompressed(archive: Archive) -> None:
    volume = as_written(archive.reader, archive.item("rle"))
    np.testing.assert_array_equal(volume.array, archive.series["rle"].hu)


def test_radiograph_is_a_2d_item(archive: Archive) -> None:
    item = archive.item("dx")
    assert item.kind == "image2d" and item.shape == [24, 20] and item.spacing == pytest.approx([0.2, 0.15])
    volume = archive.reader.load(item)
    np.testing.assert_array_equal(volume.array, archive.series["dx"].hu[:, :, 0])


def test_monochrome1_radiograph_is_inverted(tmp_path: Path) -> None:
    truth = fac.write_radiograph(tmp_path / "cr.dcm", monochrome1=True)
    reader = reader_for(tmp_path)
    (item,) = reader.scan(["cr.dcm"]).items
    assert item.attrs == {"monochrome1_inverted": True}
    stored = truth.hu[:, :, 0].astype(np.int64)
    np.testing.assert_array_equal(reader.load(item).array, stored.max() + stored.min() - stored)


@pytest.mark.parametrize("monochrome1", [False, True])
def test_a_radiograph_loads_alike_from_a_dicom_and_an_image2d_source(tmp_path: Path, monochrome1: bool) -> None:
    """One 2D DICOM file, one way to load it: rescaled, and inverted within its range when
    MONOCHROME1, whichever kind of source names it."""
    truth = fac.write_radiograph(tmp_path / "x.dcm", monochrome1=monochrome1, slope=2.0, intercept=-100.0)
    shown = truth.hu[:, :, 0].astype(np.int64) * 2 - 100
    if monochrome1:
        shown = shown.max() + shown.min() - shown
    as_series = reader_for(tmp_path)
    as_picture = Image2DReader(Image2DSourceSpec(name="cxr", kind="image2d", root=tmp_path), Keyer("test-secret"))
    for reader in (as_series, as_picture):
        (item,) = reader.scan(["x.dcm"]).items
        np.testing.assert_array_equal(reader.load(item).array, shown, err_msg=type(reader).__name__)


def test_attrs_hold_no_identifiers(archive: Archive) -> None:
    text = " ".join(str(it.attrs) for it in archive.scan.items)
    assert "1.2." not in text and "P1" not in text and "2024" not in text


def test_scan_is_deterministic(archive: Archive) -> None:
    again = archive.reader.scan(files_under(archive.root))
    assert [it.to_row() for it in again.items] == [it.to_row() for it in archive.scan.items]
    assert again.ledger == archive.scan.ledger


def test_load_failure_names_the_file(archive: Archive, tmp_path: Path) -> None:
    item = archive.item("uneven")
    root = tmp_path / "copy"
    shutil.copytree(archive.root, root)
    broken = item.uris[4]
    (root / broken).write_bytes((root / broken).read_bytes()[:-50])
    with pytest.raises(ItemError) as err:
        reader_for(root).load(item)
    assert err.value.where == broken and err.value.reason.startswith("truncated pixel data")


def header_fields(h: Header) -> dict[str, object]:
    return {f.name: np.asarray(v).tolist() if isinstance(v, np.ndarray) else v for f in fields(h) for v in [getattr(h, f.name)]}


def test_fast_header_path_agrees_with_pydicom(archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """The struct walk (dicom_quick) and pydicom must give the same Header for every file,
    whichever path a file takes; the fast path must really be taken for plain files."""
    uris = files_under(archive.root)
    fast = [read_header(archive.root, u) for u in uris]
    monkeypatch.setattr(dicom_headers, "quick_header", lambda fp, size: None)
    slow = [read_header(archive.root, u) for u in uris]
    for uri, a, b in zip(uris, fast, slow):
        if a.problem and b.problem:  # both refuse the file; the wording may differ
            continue
        assert header_fields(a) == header_fields(b), uri
    monkeypatch.undo()

    def quick(uri: str) -> object:
        with open(archive.root / uri, "rb") as fp:
            return quick_header(fp, (archive.root / uri).stat().st_size)

    for name in ("oblique", "implicit", "rle", "dx"):
        assert quick(archive.rel(archive.series[name].paths[0])) is not None, name
    assert quick(archive.rel(archive.series["latin1"].paths[0])) is None  # non-ASCII PatientID: pydicom decodes it
    assert quick("misc/junk.bin") is None


def test_layout_replay_gives_what_a_walk_gives(archive: Archive, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path reuses the previous file's element layout when every element header matches
    byte for byte: reading the archive in any order with that memory gives the same headers as
    walking every file afresh (different series, syntaxes and layouts mixed in)."""
    import curation.ingest.dicom_quick as quick_module

    uris = files_under(archive.root)
    for order in (uris, uris[::-1], sorted(uris, key=lambda u: u.rsplit("/", 1)[-1])):
        remembered = [header_fields(read_header(archive.root, u)) for u in order]
        fresh = []
        for u in order:
            monkeypatch.setattr(quick_module, "_last_layout", None)
            fresh.append(header_fields(read_header(archive.root, u)))
        assert remembered == fresh



def test_a_slice_laid_out_like_the_last_is_read_by_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import curation.ingest.dicom_quick as quick_module

    first = fac.write_series(tmp_path / "s", n_slices=1, seed=3).paths[0]
    ds = dcmread(first)
    ds.ImagePositionPatient = [ds.ImagePositionPatient[0], ds.ImagePositionPatient[1], 987.5]  # "100.0" → "987.5": same length
    ds.SOPInstanceUID = ds.SOPInstanceUID[:-1] + ("1" if ds.SOPInstanceUID[-1] != "1" else "2")
    ds.save_as(tmp_path / "s" / "second.dcm")
    monkeypatch.setattr(quick_module, "_last_layout", None)
    a = read_header(tmp_path, first.relative_to(tmp_path).as_posix())
    layout = quick_module._last_layout
    b = read_header(tmp_path, "s/second.dcm")
    assert quick_module._last_layout is layout  # the second file was read by replay, not walked
    assert b.positions[0][2] == 987.5 and header_fields(a) | {"uri": "", "positions": None} == header_fields(b) | {"uri": "", "positions": None}


def test_non_ascii_patient_id_keys_like_pydicom_reads_it(archive: Archive) -> None:
    assert archive.item("latin1").patient_key == archive.reader.keyer("patient", "M\u00dcLLER-7")


def test_implicit_vr_with_nested_sequences_loads(archive: Archive) -> None:
    np.testing.assert_array_equal(as_written(archive.reader, archive.item("implicit")).array, archive.series["implicit"].hu)


def test_label_maps_inside_the_root_are_claimed(tmp_path: Path) -> None:
    series = fac.write_series(tmp_path / "series", seed=20)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / f"{series.series_uid}.nii.gz").write_bytes(b"x")
    (tmp_path / "labels" / "1.2.3.nii.gz").write_bytes(b"x")
    scan = reader_for(tmp_path, labels=tmp_path / "labels").scan(files_under(tmp_path))
    (item,) = scan.items
    assert item.label_uri == f"labels/{series.series_uid}.nii.gz"
    assert reason_of(scan, item.label_uri) == ("indexed", "label map")
    assert reason_of(scan, "labels/1.2.3.nii.gz") == ("skipped", "label map without an indexed series")


def test_dataset_without_preamble_is_read(tmp_path: Path) -> None:
    """Old archives hold bare datasets (no 128-byte preamble, no 'DICM', no file meta)."""
    series = fac.write_series(tmp_path / "raw", n_slices=2, seed=21)
    for path in series.paths:
        ds = dcmread(path)
        del ds.file_meta
        ds.preamble = None
        dcmwrite(path, ds, implicit_vr=True, little_endian=True)
        assert path.read_bytes()[128:132] != b"DICM"
    reader = reader_for(tmp_path, select=SeriesRules(min_slices=2))
    (item,) = reader.scan(files_under(tmp_path)).items
    np.testing.assert_array_equal(as_written(reader, item).array, series.hu)


def test_order_slices_ignores_input_order_and_keeps_first_duplicate() -> None:
    normal = np.array([0.0, 0.0, 1.0])
    positions = np.array([[0, 0, 7.5], [0, 0, 2.5], [9, 9, 5.0], [0, 0, 2.5004], [0, 0, 0.0]])
    keep, duplicates = order_slices(positions, normal)
    assert keep.tolist() == [4, 1, 2, 0] and duplicates.tolist() == [3]


def test_uneven_rule_tolerates_rounded_positions() -> None:
    assert not is_uneven(np.array([0.625, 0.63, 0.62]))
    assert is_uneven(np.array([1.0, 1.0, 1.25]))


def test_rescale_keeps_int16_when_lossless_else_widens() -> None:
    stored = np.array([[[0, 4095]], [[10, 20]]], np.uint16)
    out = rescale(stored.copy(), np.ones(2), np.array([-1024.0, -1000.0]))
    assert out.dtype == np.int16 and out.tolist() == [[[-1024, 3071]], [[-990, -980]]]
    assert rescale(np.array([[[60000]]], np.uint16), np.ones(1), np.zeros(1)).dtype == np.uint16
    assert rescale(np.array([[[60000]]], np.uint16), np.ones(1), np.array([-1.0])).tolist() == [[[59999]]]
    out = rescale(np.array([[[3]]], np.int16), np.array([0.5]), np.array([1.0]))
    assert out.dtype == np.float32 and out.tolist() == [[[2.5]]]


@pytest.mark.parametrize("module", [dicom, dicom_geometry, dicom_pixels], ids=lambda m: m.__name__)
def test_docstring_examples_run(module: object) -> None:
    failures, _ = doctest.testmod(module)  # type: ignore[arg-type]
    assert failures == 0


def test_reader_counts(archive: Archive) -> None:
    """A summary of the whole archive, to catch a rule that starts claiming too much."""
    # indexed: oblique, tilted, uneven, axial, coronal, trunc (9 of 10), implicit, latin1,
    #          multi-frame, DX, RLE
    # skipped: duplicate, localizer, derived, few, MR, SC, SR, rlecut's 7 intact files (too few)
    # quarantined: the truncated file, the junk file, the cut RLE file
    expected = Counter(indexed=10 + 10 + 10 + 10 + 10 + 9 + 10 + 10 + 1 + 1 + 8, skipped=1 + 1 + 10 + 3 + 10 + 1 + 1 + 7, quarantined=3)
    assert Counter(e.status for e in archive.scan.ledger) == expected
    assert len(archive.scan.items) == 11


# -- Siemens mosaics: the CSA header read without pydicom, the geometry as nibabel computes it ----


def nibabel_tile_positions(path: Path) -> np.ndarray:
    """The reference: nibabel's MosaicWrapper over pydicom's reading of the file."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom.dicomwrappers import MosaicWrapper

        wrapper = MosaicWrapper(dcmread(path, stop_before_pixels=True))
        lps = np.asarray(wrapper.affine, float)
    return lps[:3, 3] + np.arange(wrapper.n_mosaic)[:, None] * lps[:3, 2]


@pytest.mark.parametrize("csa, implicit_vr, orientation", [(2, False, OBLIQUE), (2, True, CORONAL), (1, False, fac.AXIAL)],
                         ids=["csa2-oblique", "csa2-implicit-coronal", "csa1-axial"])
def test_mosaic_is_read_without_pydicom_and_placed_like_nibabel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, csa: int,
                                                               implicit_vr: bool, orientation: tuple[float, ...]) -> None:
    truth = fac.write_mosaic(tmp_path / "m" / "mosaic.dcm", csa=csa, implicit_vr=implicit_vr, orientation=orientation)
    fast = read_header(tmp_path, "m/mosaic.dcm")
    monkeypatch.setattr(dicom_headers, "quick_header", lambda fp, size: None)
    slow = read_header(tmp_path, "m/mosaic.dcm")  # the pydicom path: the same CSA code over a Dataset
    monkeypatch.undo()
    assert fast.unsupported is None and fast.tiles == 7
    assert header_fields(fast) == header_fields(slow)
    np.testing.assert_allclose(fast.positions, truth.positions, atol=1e-6)
    if csa == 2:  # nibabel reads CSA1 only when the first tag has no items (it takes the second tag's count)
        np.testing.assert_allclose(fast.positions, nibabel_tile_positions(truth.paths[0]), atol=1e-9)

    def no_pydicom(fp: object) -> None:
        raise AssertionError("a plain mosaic must not need a pydicom Dataset")

    monkeypatch.setattr(dicom_headers, "_read_dataset", no_pydicom)
    reader = DicomReader(DicomSourceSpec(name="mr", kind="dicom", root=tmp_path, select=SeriesRules(min_slices=1)), Keyer("k"))
    (item,) = reader.scan(["m/mosaic.dcm"]).items
    assert item.shape == [8, 6, 7] and item.attrs["mosaic"] is True and item.spacing == pytest.approx([2.5, 3.0, 3.5])
    volume = as_written(reader, item)
    np.testing.assert_array_equal(volume.array, truth.hu)
    assert_affine_places_voxels(volume.affine, truth)


def test_mosaic_without_csa_header_is_skipped_with_its_reason(tmp_path: Path) -> None:
    fac.write_mosaic(tmp_path / "mosaic.dcm", csa=None)
    reader = DicomReader(DicomSourceSpec(name="mr", kind="dicom", root=tmp_path, select=SeriesRules(min_slices=1)), Keyer("k"))
    scan = reader.scan(["mosaic.dcm"])
    assert not scan.items
    assert reason_of(scan, "mosaic.dcm") == ("skipped", "unsupported: mosaic without usable CSA header (no CSA image header)")


def test_csa_reader_agrees_with_nibabel() -> None:
    """Text and numbers, several values, a numeric tag cut short by an empty item, and a tag
    with no items: what nibabel's csareader makes of the same bytes."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nibabel.nicom import csareader

    header = fac.csa_header([("ImaCoilString", "LO", ["HEA;HEP"]), ("NumberOfImagesInMosaic", "US", ["35"]),
                             ("SliceNormalVector", "FD", ["0.0", "-0.25", "0.968"]), ("B_value", "IS", []),
                             ("MosaicRefAcqTimes", "FD", ["12.5", "", ""])])
    ours = read_csa(header)
    theirs = {name: tag["items"] for name, tag in csareader.read(header)["tags"].items()}
    assert ours == theirs
    assert ours["NumberOfImagesInMosaic"] == [35] and ours["MosaicRefAcqTimes"] == [12.5]
    with pytest.raises(CsaError, match="cut short|runs past"):
        read_csa(header[:-20])
