"""The shareable card without a build: HF features derived from the row schema, the README's
front matter as `datasets` and `huggingface_hub` read it, and the public forms of the manifest
and of set-aside reasons. (`tests/test_phi.py` checks all of it on a real build.)"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from curation.manifest import BuildSpec
from curation.rows import ROW_SCHEMA
from curation.store.hf import hf_features, hf_yaml_features, schema_with_hf_metadata
from curation.store.layout import Layout
from curation.store.public import PATH_MARK, SECRET_MARK, Redactor, public_counts, public_manifest
from curation.store.readme import dataset_readme, front_matter, write_dataset_card

datasets = pytest.importorskip("datasets")


def test_features_follow_the_row_schema_whatever_its_columns():
    """Derived, not listed: a column added to ROW_SCHEMA (as `meta` was) is in the features."""
    assert "meta" in ROW_SCHEMA.names
    for schema in (ROW_SCHEMA, ROW_SCHEMA.append(pa.field("a_later_column", pa.string()))):
        features = datasets.Features.from_dict(hf_features(schema))
        assert list(features) == schema.names
        assert features["images"] == datasets.List(datasets.Image())
        assert features.arrow_schema.equals(schema)
        assert datasets.Features._from_yaml_list(hf_yaml_features(schema)) == features
        assert features._to_yaml_list() == hf_yaml_features(schema)


def test_a_shard_with_the_metadata_opens_with_pil_images(tmp_path):
    from shards_factory import make_rows

    part = tmp_path / "data" / "train" / "part-00000.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(make_rows(4), schema=ROW_SCHEMA).cast(schema_with_hf_metadata(ROW_SCHEMA)), part)
    ds = datasets.load_dataset("parquet", data_files=str(part), split="train")
    from PIL import Image

    assert isinstance(ds[0]["images"][0], Image.Image)


def card(splits=("train", "val")) -> dict:
    spec = BuildSpec(name="mine", license="cc-by-4.0", description="Phantoms only.",
                     sources=[{"name": "ct", "kind": "dicom", "root": "/archive/ct"}],
                     experts=[{"name": "CTTissue", "runner": "ct_tissue"}],
                     tasks=[{"template": "findings/volume.j2", "source": "ct", "expert": "CTTissue"}])
    rows = {s: 3 for s in splits}
    return {
        "name": "mine",
        "counts": {"files": {"discovered": 9, "used": 7, "skipped": 1, "quarantined": 1},
                   "items": {"used": 4, "by_split": {s: 2 for s in splits}}, "patients": {"by_split": {s: 1 for s in splits}},
                   "rows": {"total": sum(rows.values()), "by_split": rows, "by_task": {"findings/volume.j2": 6}, "by_modality": {"CT": 6}},
                   "shards": {"files": [f"data/{s}/part-00000.parquet" for s in splits], "bytes_by_split": {s: 1000 for s in splits}},
                   "set_aside": {"quarantined: <path>: truncated": 1}},
        "experts": {"CTTissue": {"runner": "ct_tissue", "fingerprint": "0123456789abcdef", "runs": 4, "cached": 0}},
        "provenance": {"code_version": "0.1.0+abc", "manifest_hash": "feedface"},
        "manifest": public_manifest(spec),
    }


def test_the_readme_front_matter_is_a_valid_hub_card():
    from huggingface_hub import DatasetCard

    text = dataset_readme(card())
    parsed = DatasetCard(text)
    meta = parsed.data.to_dict()
    assert meta["license"] == "cc-by-4.0" and meta["size_categories"] == ["n<1K"]
    assert meta["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train/part-*.parquet"},
                                                                          {"split": "val", "path": "data/val/part-*.parquet"}]}]
    assert meta["dataset_info"]["splits"] == [{"name": "train", "num_bytes": 1000, "num_examples": 3},
                                              {"name": "val", "num_bytes": 1000, "num_examples": 3}]
    info = datasets.DatasetInfo._from_yaml_dict(meta["dataset_info"])  # what load_dataset reads (no "malformed splits" warning)
    assert {name: (s.num_examples, s.num_bytes) for name, s in info.splits.items()} == {"train": (3, 1000), "val": (3, 1000)}
    assert datasets.Features._from_yaml_list(meta["dataset_info"]["features"]) == datasets.Features.from_dict(hf_features(ROW_SCHEMA))
    body = parsed.text
    for needle in ("Phantoms only.", "`findings/volume.j2`", "`0123456789abcdef`", "split by patient", "`cc-by-4.0`", "1 × quarantined"):
        assert needle in body, needle


def test_a_build_without_rows_has_no_data_files_to_configure():
    meta = front_matter(card(splits=()))
    assert "configs" not in meta and meta["dataset_info"]["splits"] == []


def test_the_readme_is_written_before_the_json_card_and_the_same_card_gives_the_same_bytes(tmp_path):
    layout = Layout(tmp_path)
    write_dataset_card(card(), layout)
    first = layout.readme.read_bytes()
    assert layout.card.stat().st_mtime_ns >= layout.readme.stat().st_mtime_ns
    write_dataset_card(card(), layout)
    assert layout.readme.read_bytes() == first
    assert yaml.safe_load(first.decode().split("---")[1])["pretty_name"] == "mine"


def test_the_public_manifest_has_no_path_and_no_secret(tmp_path):
    spec = BuildSpec(name="x", key="s3cret", prompts=[str(tmp_path / "p")],
                     sources=[{"name": "c", "kind": "image2d", "root": "/archive/DOE^JOHN", "labels": "/archive/l.csv"},
                              {"name": "q", "kind": "qa", "root": "/archive", "file": "/archive/qa.json"}],
                     experts=[{"name": "CXR", "runner": "cxr_ensemble", "bundle": "/models/cxr",
                               "models": [{"path": "/models/a.pt", "kind": "torchscript"}], "options": {"note": "C:\\x"}}],
                     output={"dir": "/out", "cache": "/cache"})
    public = public_manifest(spec)
    text = yaml.safe_dump(public)
    for secret in ("s3cret", "/archive", "DOE^JOHN", "/models", "/out", "/cache", "C:", str(tmp_path)):
        assert secret not in text, secret
    assert public["key"] == SECRET_MARK and public["sources"][0]["root"] == PATH_MARK
    assert public["experts"][0]["models"][0] == {"path": PATH_MARK, "kind": "torchscript"}
    assert public["sources"][0]["kind"] == "image2d" and public["experts"][0]["runner"] == "cxr_ensemble"


def test_reasons_lose_every_archive_name_however_a_reader_wrote_them():
    uris = ["DOE^JOHN_MRN12345/series1/IM0006.dcm", "Smith John/scan.nii.gz", "1.2.840.99.5/x.dcm"]
    redact = Redactor(uris, roots=[Path("/data/hospital_a")], keep=["vista3d/segment_and_answer.j2"])
    cases = {
        "quarantined: DOE^JOHN_MRN12345/series1/IM0006.dcm: truncated": "quarantined: <path>: truncated",
        "quarantined: IM0006.dcm (in DOE^JOHN_MRN12345): truncated": "quarantined: <name> (in <name>): truncated",
        "load failed: cannot read 'scan.nii.gz' of Smith John": "load failed: cannot read '<name>' of <name>",
        "series 1.2.840.99.5 has 3 slices": "series <uid> has 3 slices",
        "template vista3d/segment_and_answer.j2, line 9: no key": "template vista3d/segment_and_answer.j2, line 9: no key",
        "C:\\archive\\hospital_a\\x.dcm unreadable": "<path> unreadable",
    }
    for reason, want in cases.items():
        assert redact(reason) == want
    assert public_counts({"quarantined: a/IM0006.dcm: x": 2, "quarantined: b/IM0007.dcm: x": 1}, Redactor([])) == {"quarantined: <path>: x": 3}
