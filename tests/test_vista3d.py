"""VISTA3D through its runner: the published bundle configs, the real `vista3d132` network with
seeded random weights, a small CT phantom with a class prompt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch

from curation.errors import CurationError, ItemError
from curation.items import Volume
from curation.manifest import ExpertSpec
from expert_runners.base import ExpertInput, make_runner
from expert_runners.vista3d import DEFAULT_EVERYTHING, DEFAULT_SUBCLASS, Vista3DRunner, label_groups
from experts_factory import REFERENCE, ct_volume, study_item, threshold_bundle, vista3d_bundle, write_bundle

SHARED_REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


def small_bundle(root: Path, weights: dict | None = None) -> Path:
    """The real configs with a stand-in weights file: enough for everything but running."""
    ref = REFERENCE / "vista3d"
    return write_bundle(root, inference=ref / "inference.json", metadata=ref / "metadata.json", weights=weights or {"w": torch.zeros(1)})


def spec(bundle: Path, **options) -> ExpertSpec:
    return ExpertSpec(name="VISTA3D", runner="vista3d", bundle=bundle, options={"patch_size": 48, **options})


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> Iterator[Vista3DRunner]:
    """One bundle (870 MB of seeded random weights) and one runner for the module."""
    bundle = vista3d_bundle(tmp_path_factory.mktemp("vista3d"), seed=0)
    r = make_runner(spec(bundle))
    assert isinstance(r, Vista3DRunner)
    r.setup("cpu")
    yield r
    shutil.rmtree(bundle)  # pytest keeps the last three sessions' temporary folders


@pytest.fixture(scope="module")
def ct():
    volume, masks = ct_volume()
    return study_item(volume, item_id="ct-001"), volume


def test_reference_copies_are_the_published_configs():
    if not SHARED_REFERENCE.is_dir():
        pytest.skip("../shared/reference not present")
    for rel in ("vista3d/inference.json", "vista3d/metadata.json", "brats_mri_segmentation/inference.json", "brats_mri_segmentation/metadata.json"):
        assert (REFERENCE / rel).read_bytes() == (SHARED_REFERENCE / rel).read_bytes(), rel
    packaged = Path(__file__).resolve().parents[1] / "expert_runners" / "data" / "vista3d_label_groups.json"
    assert json.loads(packaged.read_text()) == json.loads((SHARED_REFERENCE / "vista3d" / "label_groups.json").read_text())


def test_reads_the_published_config(tmp_path):
    r = make_runner(spec(small_bundle(tmp_path)))
    b = r.bundle
    assert [s.name for s in b.preprocessing] == ["Spacingd", "CropForegroundd", "VistaPreTransformd", "ScaleIntensityRanged", "Orientationd"]
    assert b.preprocessing[0].args == {"pixdim": [1.5, 1.5, 1.5], "mode": "bilinear"}
    assert b.preprocessing[3].args["a_min"] == pytest.approx(-963.8247715525971)
    assert b.patch_size == [128, 128, 128] and b.overlap == 0.3 and b.ignored == []
    assert r.everything == DEFAULT_EVERYTHING and len(r.everything) == 117
    assert r.subclass == DEFAULT_SUBCLASS
    assert r.names[26] == "hepatic tumor" and 0 not in r.names
    assert r.prompt("") == ("everything", DEFAULT_EVERYTHING)
    assert r.prompt("  Hepatic  Tumor ") == ("hepatic tumor", [1, 26])
    assert set(r.arguments()) == {"everything", *label_groups()}


@pytest.mark.slow  # the full-size vista3d network: 870 MB of weights to make and load
def test_hepatic_tumor_findings(runner, ct):
    item, volume = ct
    findings = runner.run(ExpertInput(item, volume), "hepatic tumor")
    d = findings.to_dict()
    json.dumps(d)  # plain data
    assert d["expert"] == "VISTA3D" and d["runner"] == "vista3d" and d["arg"] == "hepatic tumor" and d["modality"] == "CT"
    assert {s["label"] for s in d["structures"]} <= {1, 26}
    assert all(s["name"] == {1: "liver", 26: "hepatic tumor"}[s["label"]] for s in d["structures"])
    assert set(d["legend"]) == {s["colour"] for s in d["structures"]}
    assert [i["kind"] for i in d["images"]] == ["key_slice", "overlay"]
    assert findings.images[1].png.startswith(b"\x89PNG")
    assert {"preprocess", "inference", "postprocess"} <= set(d["timing"])
    # measured on the item's own grid: voxel volume 1.8 × 1.8 × 2.4 mm
    for s in d["structures"]:
        assert s["volume_ml"] == pytest.approx(s["voxels"] * 1.8 * 1.8 * 2.4 / 1000, abs=0.01)
        assert all(0 <= lo < hi <= n for lo, hi, n in zip(s["bbox"][:3], s["bbox"][3:], volume.array.shape))


@pytest.mark.slow  # the full-size vista3d network: 870 MB of weights to make and load
def test_label_map_on_original_grid_with_subclasses(runner, ct):
    _, volume = ct
    arg, prompt = runner.prompt("lung tumor")
    assert 20 in prompt  # "lung", a subclass key
    label_map = runner.segment(volume, prompt)
    assert label_map.shape == volume.array.shape
    assert set(np.unique(label_map).tolist()) <= {0, 23, 28, 29, 30, 31, 32}  # 20 expanded to its lobes


@pytest.mark.slow  # the full-size vista3d network: 870 MB of weights to make and load
def test_unknown_argument_names_item_and_choices(runner, ct):
    item, volume = ct
    with pytest.raises(ItemError) as e:
        runner.run(ExpertInput(item, volume), "kidney stones")
    message = str(e.value)
    assert message.startswith("ct-001: ") and "'kidney stones'" in message
    assert "hepatic tumor" in message and "everything" in message


def test_not_for_mr(tmp_path, ct):
    item, volume = ct
    r = make_runner(spec(small_bundle(tmp_path)))
    mr = study_item(volume, item_id="mr-1", modality="MR")
    assert "CT" in (r.accepts(mr) or "")
    with pytest.raises(ItemError, match="mr-1"):
        r.run(ExpertInput(mr, volume), "organs")


def test_fingerprint_follows_weights_config_and_options(tmp_path):
    bundle = small_bundle(tmp_path / "b", {"w": torch.zeros(3)})
    first = make_runner(spec(bundle)).fingerprint()
    assert make_runner(spec(bundle)).fingerprint() == first
    torch.save({"w": torch.ones(5)}, bundle / "models" / "model.pt")
    second = make_runner(spec(bundle)).fingerprint()
    assert second != first
    assert make_runner(spec(bundle, overlap=0.5)).fingerprint() != second
    config = bundle / "configs" / "inference.json"
    config.write_text(config.read_text().replace('"overlap": 0.3', '"overlap": 0.5'))
    assert make_runner(spec(bundle)).fingerprint() != second


def test_fingerprint_is_the_bundle_wherever_it_lies(tmp_path):
    """A bundle copied elsewhere (a cache moved with it, a node that mounts it at another path)
    keeps its fingerprint: its files' contents define it, not their place."""
    import shutil

    bundle = small_bundle(tmp_path / "here", {"w": torch.zeros(3)})
    moved = shutil.copytree(bundle, tmp_path / "elsewhere" / "vista3d")
    assert make_runner(spec(moved)).fingerprint() == make_runner(spec(bundle)).fingerprint()


def test_missing_weights_file_is_named(tmp_path):
    ref = REFERENCE / "vista3d"
    bundle = write_bundle(tmp_path, inference=ref / "inference.json", metadata=ref / "metadata.json", weights=None)
    with pytest.raises(CurationError, match=r"missing models/model\.pt.*nothing is downloaded"):
        make_runner(spec(bundle))


def test_weights_that_do_not_fit_are_named(tmp_path, ct):
    item, volume = ct
    r = make_runner(spec(small_bundle(tmp_path, {"not.a.layer": torch.zeros(2)})))
    with pytest.raises(CurationError, match=r"model\.pt: weights do not fit"):
        r.setup("cpu")


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"patch_size": 40}, "multiples of 16"),
        ({"patch_sise": 64}, "options.patch_sise: unknown option"),
        ({"window": "brain"}, "options.window 'brain'"),
        ({"overlap": 1.5}, "options.overlap"),
    ],
    ids=["patch-not-multiple", "misspelt", "window", "overlap"],
)
def test_bad_options(tmp_path, options, expected):
    with pytest.raises(CurationError, match=expected):
        make_runner(spec(small_bundle(tmp_path), **options))


def test_plain_segmentation_network_keeps_the_prompted_labels(tmp_path, ct):
    """A bundle whose network is not VISTA3D (the demo bundles) outputs VISTA3D label ids per
    channel; the argument selects which of them are kept."""
    item, volume = ct
    bundle = threshold_bundle(tmp_path)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    metadata["network_data_format"]["outputs"]["pred"]["channel_def"] = {"0": "background", "1": "liver", "2": "kidney"}
    (bundle / "configs" / "metadata.json").write_text(json.dumps(metadata))
    runner = make_runner(ExpertSpec(name="VISTA3D", runner="vista3d", bundle=bundle))
    liver = runner.run(ExpertInput(item, volume), "hepatic tumor")
    assert [(s.label, s.name) for s in liver.structures] == [(1, "liver")]
    assert not runner.prompted
    organs = runner.run(ExpertInput(item, volume), "organs")
    assert [(s.label, s.name) for s in organs.structures] == [(1, "liver"), (2, "kidney")]  # 2 is asked before expansion to 14, 5
    assert runner.run(ExpertInput(item, volume), "bone lesion").structures == []
    assert organs.timing.get("inference", 0.0) == 0.0 and liver.timing["inference"] > 0  # one network run for the item's groups
    fresh = make_runner(ExpertSpec(name="VISTA3D", runner="vista3d", bundle=bundle)).run(ExpertInput(item, volume), "organs")
    assert fresh.to_dict()["structures"] == organs.to_dict()["structures"]
    other = Volume(array=volume.array.copy(), affine=volume.affine)  # another item: the network runs again
    assert runner.run(ExpertInput(item, other), "organs").timing["inference"] > 0
