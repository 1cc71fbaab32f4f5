"""`monai_bundle` and the bundle reader on a tiny bundle with known behaviour: a 1×1×1
convolution that thresholds the windowed intensity, so the right answer is known."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from curation.errors import CurationError, ItemError
from curation.manifest import ExpertSpec
from expert_runners.base import ExpertInput, make_runner
from expert_runners.bundle import load_state_dict, read_bundle
from expert_runners.monai_bundle import MonaiBundleRunner
from experts_factory import THRESHOLD_WEIGHTS, ct_volume, mr_group_volume, study_item, threshold_bundle, write_bundle


def spec(bundle, **options) -> ExpertSpec:
    return ExpertSpec(name="Organs", runner="monai_bundle", bundle=bundle, options=options)


@pytest.fixture
def ct():
    volume, masks = ct_volume()
    return study_item(volume, item_id="ct-002"), volume, masks


def centroid_ras(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (affine @ np.append(np.argwhere(mask).mean(axis=0), 1.0))[:3]


def test_findings_match_the_known_answer(tmp_path, ct):
    item, volume, masks = ct
    runner = make_runner(spec(threshold_bundle(tmp_path)))
    assert isinstance(runner, MonaiBundleRunner) and runner.modalities == ("CT",)
    d = runner.run(ExpertInput(item, volume)).to_dict()
    json.dumps(d)
    by_name = {s["name"]: s for s in d["structures"]}
    assert set(by_name) == {"liver", "spleen"}  # channel_def names; background never a structure
    voxel_ml = 1.8 * 1.8 * 2.4 / 1000
    for name, truth in (("liver", masks["organ_a"]), ("spleen", masks["organ_b"])):
        s = by_name[name]
        assert s["volume_ml"] == pytest.approx(truth.sum() * voxel_ml, rel=0.25)
        # resampled to 2 mm RAS and back: the organ is where it was, not mirrored
        assert np.allclose(s["centroid_ras"], centroid_ras(truth, volume.affine), atol=2.0)
        assert s["components"] == 1
    assert by_name["liver"]["side"] == "right" and by_name["spleen"]["side"] == "left"
    assert d["legend"] == {"red": "liver", "blue": "spleen"}
    assert {"load", "preprocess", "inference", "postprocess"} <= set(d["timing"])


def test_label_map_on_the_item_grid(tmp_path, ct):
    _, volume, masks = ct
    label_map = make_runner(spec(threshold_bundle(tmp_path))).segment(volume)
    assert label_map.shape == volume.array.shape
    dice = 2 * (masks["organ_a"] & (label_map == 1)).sum() / (masks["organ_a"].sum() + (label_map == 1).sum())
    assert dice > 0.8


def test_unsupported_preprocessing_is_reported(tmp_path, ct):
    item, volume, _ = ct
    extra = [{"_target_": "GaussianSmoothd", "keys": "@image_key", "sigma": 1.0}, {"_target_": "RandFlipd", "keys": "label", "prob": 0.5}]
    runner = make_runner(spec(threshold_bundle(tmp_path, extra_transforms=extra)))
    assert runner.bundle.ignored == ["GaussianSmoothd"]  # the label-only step is not ours to apply
    with pytest.warns(UserWarning, match="not applied: GaussianSmoothd"):
        runner.setup("cpu")


def test_sigmoid_channels_paint_label_k_plus_one(tmp_path, ct):
    item, volume, _ = ct
    runner = make_runner(spec(threshold_bundle(tmp_path), activation="sigmoid", labels={3: "dense organ"}))
    assert runner.names == {1: "background", 2: "liver", 3: "dense organ"}
    label_map = runner.segment(volume)
    # channel 1 (10x − 4) is on above 100 HU, channel 2 (20x − 10) above 150 HU and wins
    assert set(np.unique(label_map).tolist()) <= {0, 1, 2, 3}
    assert (label_map == 3).sum() > 0 and (label_map[volume.array < 0] == 0).all()


@pytest.mark.parametrize(
    "layout",
    [
        lambda sd: {"model": sd},
        lambda sd: {"state_dict": sd, "epoch": torch.tensor(3)},
        lambda sd: {f"module.{k}": v for k, v in sd.items()},
    ],
    ids=["checkpoint-model", "checkpoint-state_dict", "dataparallel"],
)
def test_weight_layouts(tmp_path, layout):
    bundle = threshold_bundle(tmp_path)
    torch.save(layout(THRESHOLD_WEIGHTS), bundle / "models" / "model.pt")
    assert set(load_state_dict(bundle / "models" / "model.pt")) == set(THRESHOLD_WEIGHTS)
    net = read_bundle(bundle).build_network("cpu")
    assert torch.equal(net.state_dict()["conv.bias"], THRESHOLD_WEIGHTS["conv.bias"])


def test_missing_network_def_and_metadata_are_named(tmp_path):
    bundle = threshold_bundle(tmp_path)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    del config["network_def"]
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(CurationError, match="no `network_def`"):
        read_bundle(bundle).build_network()
    (bundle / "configs" / "metadata.json").unlink()
    with pytest.raises(CurationError, match=r"missing configs/metadata\.json"):
        read_bundle(bundle)
    with pytest.raises(CurationError, match="bundle folder not found"):
        read_bundle(tmp_path / "nowhere")


def test_unreadable_expression_is_named(tmp_path):
    bundle = threshold_bundle(tmp_path)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["inferer"]["roi_size"] = "$[32] * undefined_name"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with pytest.raises(CurationError, match="cannot read `inferer#roi_size`"):
        read_bundle(bundle)


def test_wrong_channel_count_names_item(tmp_path):
    volume = mr_group_volume(shape=(32, 32, 32))
    item = study_item(volume, item_id="case-9", kind="nifti_group", modality="CT")
    with pytest.raises(ItemError, match="case-9: .*1 channel"):
        make_runner(spec(threshold_bundle(tmp_path))).run(ExpertInput(item, volume))


def test_unknown_option_lists_valid_ones(tmp_path):
    with pytest.raises(CurationError, match=r"options.activaton: unknown option \(valid options: .*activation"):
        make_runner(spec(threshold_bundle(tmp_path), activaton="sigmoid"))


def test_expression_network_def(tmp_path, ct):
    """`network_def` as a `$` expression with an `@` reference, as VISTA3D's config writes it."""
    item, volume, _ = ct
    bundle = threshold_bundle(tmp_path)
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    config["out_channels"] = 3
    config["network_def"] = "$monai.networks.blocks.Convolution(spatial_dims=3, in_channels=1, out_channels=@out_channels, kernel_size=1, conv_only=True)"
    (bundle / "configs" / "inference.json").write_text(json.dumps(config))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing ignored, nothing to warn about
        label_map = make_runner(spec(bundle)).segment(volume)
    assert set(np.unique(label_map).tolist()) == {0, 1, 2}


def test_write_bundle_without_weights_is_refused(tmp_path):
    bundle = write_bundle(tmp_path, inference={"network_def": {}}, metadata={"network_data_format": {"inputs": {"image": {}}, "outputs": {"pred": {}}}}, weights=None)
    with pytest.raises(CurationError, match=r"missing models/model\.pt"):
        read_bundle(bundle)
