"""The demo archive through index and convert: what the generator made is what the experts see."""

from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from curation.ingest.convert import convert
from curation.demo import ct_phantom, write_demo_archive
from curation.ingest.index import build_index
from curation.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("demo")
    write_demo_archive(root / "data" / "demo", cases=2, seed=0)
    manifest = root / "manifests" / "demo.yaml"
    manifest.parent.mkdir()
    manifest.write_text((REPO / "manifests" / "demo.yaml").read_text())
    for table in (REPO / "manifests").glob("*.csv"):  # the demo's question–answer set
        (manifest.parent / table.name).write_text(table.read_text())
    return root, load_manifest(manifest)


@pytest.mark.slow
def test_every_file_is_ledgered_exactly_once(demo):
    root, spec = demo
    index = build_index(spec)
    data = root / "data" / "demo"
    on_disk = Counter()
    for source in spec.sources:
        on_disk.update((source.name, p.relative_to(source.root).as_posix()) for p in Path(source.root).rglob("*") if p.is_file())
    ledgered = Counter((e.source, e.uri) for e in index.ledger)
    assert ledgered == on_disk
    assert all(n == 1 for n in ledgered.values())
    assert (data / "ground_truth.json").is_file()


def test_set_aside_files_have_distinct_reasons(demo):
    _, spec = demo
    ledger = [e for e in build_index(spec).ledger if e.source == "ct"]
    reasons = {e.status + ": " + e.reason for e in ledger if e.status != "indexed"}
    localizer = {r for r in reasons if "localizer" in r}
    capture = {r for r in reasons if "secondary capture" in r}
    truncated = {r for r in reasons if "truncated" in r}
    assert len(localizer) == len(capture) == len(truncated) == 1, reasons
    assert next(iter(truncated)).startswith("quarantined: corrupt")
    assert next(iter(localizer)).startswith("skipped")
    assert sum("truncated" in e.reason for e in ledger) == 1


@pytest.mark.slow
def test_ct_converts_to_the_generators_volume(demo, tmp_path):
    _, spec = demo
    index = build_index(spec)
    result = convert(spec, tmp_path, index=index)
    assert not result.failed
    ct_items = [i for i in index.items if i.source == "ct"]
    assert len(ct_items) == 2
    seen = set()
    for item in ct_items:
        img = nib.load(tmp_path / f"{item.item_id}.nii.gz")
        volume = np.asarray(img.dataobj)
        for case in range(2):
            hu, _, affine = ct_phantom(0, case)
            if hu.shape == volume.shape and np.array_equal(volume, hu):
                np.testing.assert_allclose(img.affine, affine, atol=1e-3)
                seen.add(case)
        assert item.label_uri is not None
        labels = nib.load(Path(spec.source("ct").root) / item.label_uri)
        np.testing.assert_allclose(labels.affine, img.affine, atol=1e-3)
    assert seen == {0, 1}


def test_keys_and_attrs_hold_no_raw_identifiers(demo):
    """`uris` are paths inside the archive (the index must find the files again); everything
    else in an index row is pseudonymous."""
    import json

    root, spec = demo
    truth = json.loads((root / "data" / "demo" / "ground_truth.json").read_text())
    rows = [{k: v for k, v in i.to_row().items() if k not in ("uris", "label_uri")} for i in build_index(spec).items]
    text = json.dumps(rows)
    values = [v for case in truth["ct"] for v in case["identifiers"].values()]
    values += [v for case in truth["ct"] for v in (case["study_uid"], case["series_uid"])]
    assert len(values) > 20
    for value in values:
        assert value not in text, value
