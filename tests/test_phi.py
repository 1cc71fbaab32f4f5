"""No identifier of the archive reaches a shareable output (DESIGN "Guarantees").

A one-case demo archive is made hostile: every attribute of DICOM PS3.15 Table E.1-1 in every
CT file (plus a private attribute and an overlay comment) holds its own sentinel, as do the
folder and file names of every source, the archive's root folder, a NIfTI header's
`descrip`, a PNG's text chunk, the labels table's patient IDs and the manifest's secret key.
A real build (Ray, the weight-free experts, the real renderer) runs over it; then every byte
of the shareable folder `OUT/dataset/` and of a LLaVA export is searched: raw bytes, the decoded
Parquet (every string of every row), and the PNGs' own text chunks. None may be there.

The search is shown to work: a copy of the shareable folder with one sentinel put into one
row's findings (written compressed, as shards are) is caught.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from build_helpers import demo_manifest
from phi_fields import E1_1_TAGS
from PIL import Image, PngImagePlugin
from pydicom import config as dicom_config
from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset

from curation.demo import write_demo_archive

pytestmark = [pytest.mark.ray, pytest.mark.slow]

MARK = "7Q"  # every text sentinel is PHI…7Q
UID_ROOT = "1.2.826.0.1.3680043.10.999"


@dataclass
class Sentinels:
    """What was planted: `text` must not appear in any decoded string; `raw` (long enough not to
    occur by chance) must not appear in any byte either."""

    text: set[str] = field(default_factory=set)
    raw: set[str] = field(default_factory=set)
    unsearchable: set[str] = field(default_factory=set)  # planted, but a binary number: nothing to search

    def add(self, value: str) -> str:
        self.text.add(value)
        if len(value) >= 8:
            self.raw.add(value)
        return value


def dicom_value(tag: int, n: int, series: int, file: int, s: Sentinels) -> tuple[str, object] | None:
    """A value of the attribute's VR holding a sentinel (None for a number with nothing to search)."""
    vr = dictionary_VR(tag).split(" or ")[0]
    if vr == "UI":
        uid = f"{UID_ROOT}.{n}.{series}" + (f".{file}" if tag in (0x00080018, 0x00020003) else "")
        return vr, s.add(uid)
    if vr == "DA":
        day = (dt.date(1901, 1, 1) + dt.timedelta(days=n)).strftime("%Y%m%d")
        s.add(f"{day[:4]}-{day[4:6]}-{day[6:]}")
        return vr, s.add(day)
    if vr == "DT":
        return vr, s.add((dt.date(1902, 1, 1) + dt.timedelta(days=n)).strftime("%Y%m%d") + f"235959.{n:06d}")
    if vr == "TM":
        return vr, s.add(f"2358{n % 60:02d}.{n + 100000:06d}")
    if vr == "DS":
        return vr, s.add(f"7{n:04d}.25")
    if vr == "IS":
        return vr, s.add(f"7{n:05d}")
    if vr == "AS":
        return vr, s.add(f"{n % 1000:03d}W")
    if vr == "PN":
        return vr, f"{s.add(f'PHIPN{n:04d}{MARK}')}^{s.add(f'PHIGIVEN{n:04d}{MARK}')}"
    if vr in ("OB", "OW", "UN"):
        return vr, s.add(f"PHI{vr}{n:04d}{MARK}").encode()
    if vr == "SQ":
        item = Dataset()
        item.CodeMeaning = s.add(f"PHISQ{n:04d}{MARK}")
        return vr, [item]
    if vr in ("US", "SS", "UL", "SL", "FL", "FD"):
        s.unsearchable.add(f"({tag >> 16:04X},{tag & 0xFFFF:04X})")
        return vr, 7
    return vr, s.add(f"PHI{vr}{n:04d}{MARK}")  # AE CS LO LT SH ST UC UR UT


def plant_dicom(path: Path, series: int, file: int, s: Sentinels) -> bool:
    """Every PS3.15 E.1-1 attribute, a private one and an overlay comment, in one file."""
    try:
        ds = dcmread(path)
    except Exception:  # the demo's truncated file: it stays as it is (renamed)
        return False
    for n, tag in enumerate(E1_1_TAGS):
        if tag >> 16 == 0x0000:  # command elements (Affected SOP Instance UID…): never in a stored file
            continue
        got = dicom_value(tag, n, series, file, s)
        if got is None:
            continue
        vr, value = got
        (ds.file_meta if tag >> 16 == 0x0002 else ds).add_new(tag, vr, value)
    block = ds.private_block(0x0009, s.add(f"PHIPRIVCREATOR{MARK}"), create=True)
    block.add_new(0x01, "LO", s.add(f"PHIPRIVATE{series:02d}{MARK}"))
    ds.add_new(0x60004000, "LT", s.add(f"PHIOVERLAYCOMMENT{MARK}"))
    ds.save_as(path, enforce_file_format=False)
    return True


def make_hostile_archive(base: Path) -> tuple[Path, Sentinels]:
    s = Sentinels()
    root = base / s.add(f"PHIROOTFOLDER{MARK}")
    write_demo_archive(root, cases=1, seed=0)
    _hostile_ct(root, s)
    _hostile_brain(root, s)
    _hostile_cxr(root, s)
    _nifti_volume(root, s)
    return root, s


def _hostile_ct(root: Path, s: Sentinels) -> None:
    dicom_config.settings.writing_validation_mode = dicom_config.IGNORE
    labels = root / "ct_labels"
    for p, patient in enumerate(sorted((root / "ct").iterdir())):
        new_patient = root / "ct" / s.add(f"PHIPATIENTDIR{p}{MARK}")
        patient.rename(new_patient)
        for k, series in enumerate(sorted(new_patient.iterdir())):
            files = sorted(series.iterdir())
            old_uid = next((dcmread(f, stop_before_pixels=True).SeriesInstanceUID for f in files if _readable(f)), None)
            for i, f in enumerate(files):
                planted = plant_dicom(f, k, i, s)
                f.rename(series / (s.add(f"PHIFILE{k}{i:03d}{MARK}") + ".dcm" if planted else f"PHIBROKEN{i}{MARK}.dcm"))
            series.rename(new_patient / s.add(f"PHISERIESDIR{k}{MARK}"))
            label = labels / f"{old_uid}.nii.gz"
            if old_uid and label.exists():  # label maps are named by SeriesInstanceUID: now a sentinel
                label.rename(labels / f"{UID_ROOT}.{E1_1_TAGS.index(0x0020000E)}.{k}.nii.gz")


def _readable(path: Path) -> bool:
    try:
        dcmread(path, stop_before_pixels=True)
        return True
    except Exception:
        return False


def _hostile_brain(root: Path, s: Sentinels) -> None:
    for c, case in enumerate(sorted((root / "brain").iterdir())):
        name = s.add(f"PHICASE{c}{MARK}")
        for f in sorted(case.iterdir()):
            img = nib.load(f)
            img.header["descrip"] = s.add(f"PHINIFTIDESC{c}{f.name.split('_')[-1][:3]}{MARK}").encode()
            nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header), case / f"{name}_{f.name.split('_', 1)[1]}")
            f.unlink()
        case.rename(case.parent / name)


def _hostile_cxr(root: Path, s: Sentinels) -> None:
    folder = root / "cxr"
    rows = list(csv.DictReader((folder / "labels.csv").open()))
    for n, row in enumerate(rows):
        old = folder / row["image"]
        new = f"images/{s.add(f'PHICXRFILE{n:02d}{MARK}')}.png"
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", s.add(f"PHIPNGTEXT{n:02d}{MARK}"))
        info.add_text("Author", s.add(f"PHIPNGAUTHOR{n:02d}{MARK}"))
        Image.open(old).save(folder / new, pnginfo=info)
        old.unlink()
        row["image"], row["patient_id"] = new, s.add(f"PHICXRPATIENT{n // 2:02d}{MARK}")
    with (folder / "labels.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _nifti_volume(root: Path, s: Sentinels) -> None:
    """One CT-like NIfTI volume (body, bone) whose folder, file name and description are sentinels."""
    grid = np.mgrid[:40, :40, :24].astype(np.float32)
    body = ((grid[0] - 20) ** 2 / 300 + (grid[1] - 20) ** 2 / 200) < 1
    hu = np.where(body, 40.0, -1000.0) + np.where(((grid[0] - 20) ** 2 + (grid[1] - 28) ** 2) < 9, 700.0, 0.0)
    img = nib.Nifti1Image(hu.astype(np.int16), np.diag([2.0, 2.0, 3.0, 1.0]))
    img.header["descrip"] = s.add(f"PHINIFTIVOLDESC{MARK}").encode()
    folder = root / "vols" / s.add(f"PHIVOLDIR{MARK}")
    folder.mkdir(parents=True)
    nib.save(img, folder / f"{s.add(f'PHIVOLFILE{MARK}')}.nii.gz")
    # A volume whose header reads but whose voxels are cut short: it fails when loaded, and the
    # reader's reason may quote its path. The card must not.
    broken = folder / f"{s.add(f'PHIBROKENVOL{MARK}')}.nii"
    nib.save(nib.Nifti1Image(np.zeros((40, 40, 24), np.int16), np.eye(4)), broken)
    broken.write_bytes(broken.read_bytes()[:2000])


# --- the search ---------------------------------------------------------------------------------


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _strings(v)]
    if isinstance(value, list):
        return [t for v in value for t in _strings(v)]
    return []


def _png_texts(data: bytes) -> list[str]:
    import io

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception:
        return []
    return [str(v) for v in {**img.info, **getattr(img, "text", {})}.values() if isinstance(v, (str, bytes))]


def find_sentinels(folder: Path, s: Sentinels) -> dict[str, set[str]]:
    """Every sentinel found under `folder`, by the file that holds it: raw bytes, every string
    of every Parquet row, every PNG's text chunks (PNG files and PNG bytes in rows)."""
    found: dict[str, set[str]] = {}

    def look(where: str, texts: list[str], raw: bytes = b"") -> None:
        joined = "\n".join(texts)
        hits = {x for x in s.text if x in joined} | {x for x in s.raw if x.encode() in raw}
        if hits:
            found.setdefault(where, set()).update(hits)

    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        rel = path.relative_to(folder).as_posix()
        look(rel, [rel, data.decode("utf-8", "replace")], data)
        if path.suffix == ".png":
            look(rel, _png_texts(data))
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            look(f"{rel} (schema metadata)", [k.decode("utf-8", "replace") + v.decode("utf-8", "replace")
                                              for k, v in (table.schema.metadata or {}).items()])
            for row in table.to_pylist():
                look(f"{rel} (row {row.get('id')})", _strings(row))
                for image in row.get("images") or []:
                    look(f"{rel} (row {row.get('id')} image)", _png_texts(image["bytes"]), image["bytes"])
    return found


# --- the build ----------------------------------------------------------------------------------


@dataclass
class Built:
    archive: Path
    out: Path
    sentinels: Sentinels
    card: dict


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    ray = pytest.importorskip("ray")
    base = tmp_path_factory.mktemp("phi")
    archive, s = make_hostile_archive(base)
    out = base / "out"
    data = demo_manifest(archive, out, rows_per_shard=50)
    data["key"] = s.add(f"PHISECRETKEY{MARK}")
    data["sources"].append({"name": "vols", "kind": "nifti", "root": str(archive / "vols"), "modality": "CT"})
    data["tasks"] += [{"template": "findings/volume.j2", "source": "vols", "expert": "CT_TISSUE"},
                      {"template": "brats/what_is_this.j2", "source": "brain", "expert": "BRATS"}]
    manifest = base / "m.yaml"
    manifest.write_text(yaml.safe_dump(data))
    from curation.build.pipeline import build

    if ray.is_initialized():
        ray.shutdown()
    result = build(manifest, progress=False)
    return Built(archive=archive, out=out, sentinels=s, card=result.card)


def test_the_archive_is_hostile_and_the_build_used_every_source(built: Built) -> None:
    s = built.sentinels
    assert len(s.text) > 600 and len(s.unsearchable) <= 3
    assert any(f"PHIPATIENTDIR0{MARK}" in str(p) for p in built.archive.rglob("*.dcm"))
    by_source = built.card["counts"]["rows"]["by_source"]
    assert {"ct", "brain", "cxr", "vols"} <= {k for k, v in by_source.items() if v > 0}, by_source
    assert built.card["counts"]["files"]["quarantined"] >= 2  # the truncated DICOM file and NIfTI volume


def test_no_sentinel_reaches_any_shareable_byte(built: Built) -> None:
    found = find_sentinels(built.out / "dataset", built.sentinels)
    assert not found, "identifiers in the shareable folder:\n" + "\n".join(f"  {w}: {sorted(h)[:8]}" for w, h in found.items())


def test_no_sentinel_reaches_an_export_and_every_record_loads_in_vila(built: Built, tmp_path: Path) -> None:
    from vila_loaders import LAYOUT_LOADERS, LOADERS

    from curation.export import export_llava

    for layout in ("vila", "llava-next"):
        out = tmp_path / layout
        counts = export_llava(built.out, out, layout=layout).rows
        assert sum(counts.values()) == built.card["counts"]["rows"]["total"]
        found = find_sentinels(out, built.sentinels)
        assert not found, found
        for split in counts:
            for record in json.loads((out / f"{split}.json").read_text()):
                for name in LAYOUT_LOADERS[layout]:
                    LOADERS[name](record, str(out))


def test_the_shareable_folder_loads_with_pil_images_and_its_card_is_valid(built: Built) -> None:
    datasets = pytest.importorskip("datasets")
    from huggingface_hub import DatasetCard

    shared = built.out / "dataset"
    ds = datasets.load_dataset(str(shared))
    assert set(ds) == set(built.card["counts"]["rows"]["by_split"])
    row = ds["train"][0]
    assert row["images"] and all(isinstance(i, Image.Image) for i in row["images"])
    also = datasets.load_dataset("parquet", data_dir=str(shared / "data"))
    assert isinstance(next(iter(also.values()))[0]["images"][0], Image.Image)

    card = DatasetCard.load(shared / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "other" and meta["pretty_name"] == "tiny"
    for config in meta["configs"]:
        for entry in config["data_files"]:
            assert re.fullmatch(r"\w+", entry["split"]) and list(shared.glob(entry["path"]))
    features = datasets.Features._from_yaml_list(meta["dataset_info"]["features"])
    assert features == datasets.Features.from_arrow_schema(pq.read_schema(next(shared.glob("data/*/*.parquet"))))
    assert {s["name"]: s["num_examples"] for s in meta["dataset_info"]["splits"]} == built.card["counts"]["rows"]["by_split"]
    assert "CT_TISSUE" in card.text and built.card["experts"]["CT_TISSUE"]["fingerprint"] in card.text


def test_the_search_finds_a_sentinel_let_through(built: Built, tmp_path: Path) -> None:
    """One PS3.15 field's sentinel put into one row, written compressed as shards are: caught."""
    copy = tmp_path / "dataset"
    shutil.copytree(built.out / "dataset", copy)
    part = next(copy.glob("data/train/*.parquet"))
    table = pq.read_table(part)
    leak = f"PHILO{E1_1_TAGS.index(0x00080080):04d}{MARK}"  # Institution Name
    assert leak in built.sentinels.text
    rows = table.to_pylist()
    rows[0]["findings"] = json.dumps({**json.loads(rows[0]["findings"]), "institution": leak})
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), part, compression="zstd")
    found = find_sentinels(copy, built.sentinels)
    assert found.get(f"{part.relative_to(copy).as_posix()} (row {rows[0]['id']})") == {leak}  # the decoded search
    assert all(hits == {leak} for hits in found.values())
