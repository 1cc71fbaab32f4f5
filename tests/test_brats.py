"""BRATS through its runner: the published bundle configs (SegResNet 1,2,2,4 / 16 filters,
4 → 3 channels), seeded random weights, a 4-sequence 48³ phantom."""

from __future__ import annotations

import json

import numpy as np
import pytest
from monai.networks.nets import SegResNet

from curation.errors import CurationError, ItemError
from curation.items import Volume
from curation.manifest import ExpertSpec
from expert_runners.base import ExpertInput, make_runner
from expert_runners.brats import COLOURS, NAMES, TUMOR_CORE, WHOLE_TUMOR, BratsRunner, brats_findings, brats_labels, channel_order
from experts_factory import brats_bundle, mr_group_volume, study_item


@pytest.fixture(scope="module")
def runner(tmp_path_factory) -> BratsRunner:
    r = make_runner(ExpertSpec(name="BRATS", runner="brats", bundle=brats_bundle(tmp_path_factory.mktemp("brats"), seed=0)))
    assert isinstance(r, BratsRunner)
    return r


def mr_item(channels=("t1c", "t1", "t2", "flair"), item_id="case-001"):
    volume = mr_group_volume(channels=channels)
    return study_item(volume, item_id=item_id, kind="nifti_group", modality="MR"), volume


def test_bundle_network_is_the_published_segresnet(runner):
    runner.setup("cpu")
    net = runner.net
    assert isinstance(net, SegResNet)
    assert tuple(net.blocks_down) == (1, 2, 2, 4) and tuple(net.blocks_up) == (1, 1, 1)
    assert net.init_filters == 16 and net.in_channels == 4 and net.conv_final[2].conv.out_channels == 3
    assert [s.name for s in runner.bundle.preprocessing] == ["NormalizeIntensityd"]
    assert runner.bundle.preprocessing[0].args == {"nonzero": True, "channel_wise": True}
    assert runner.bundle.patch_size == [240, 240, 160]


def test_findings_on_a_four_sequence_volume(runner):
    item, volume = mr_item(channels=("flair", "t1ce", "t1", "t2"))  # any order, usual aliases
    findings = runner.run(ExpertInput(item, volume), "")
    d = findings.to_dict()
    json.dumps(d)
    regions = [s for s in d["structures"] if s["label"] in NAMES]
    assert {s["label"] for s in regions} <= {1, 2, 4}
    for s in regions:
        assert s["name"] == NAMES[s["label"]] and s["colour"] == COLOURS[s["label"]]
    assert d["legend"] == {s["colour"]: s["name"] for s in regions}
    voxels = {s["label"]: s["voxels"] for s in d["structures"]}
    if voxels.get(1, 0) + voxels.get(4, 0):
        assert voxels[TUMOR_CORE] == voxels.get(1, 0) + voxels.get(4, 0)
    if regions:
        assert voxels[WHOLE_TUMOR] == sum(s["voxels"] for s in regions)
    assert [(i["kind"], i["caption"]) for i in d["images"][2:]] == [("sequence", s) for s in ("T1c", "T1", "T2", "FLAIR")]
    assert {"preprocess", "inference", "postprocess"} <= set(d["timing"])


def test_label_map_on_the_item_grid(runner):
    _, volume = mr_item()
    label_map = runner.segment(volume.array, volume.affine)
    assert label_map.shape == volume.array.shape[:3]
    assert set(np.unique(label_map).tolist()) <= {0, 1, 2, 4}


def test_colours_and_derived_regions_as_vila_m3_describes():
    _, volume = mr_item()
    label_map = np.zeros(volume.array.shape[:3], np.uint8)
    label_map[20:28, 20:28, 20:28] = 2  # oedema around
    label_map[22:26, 22:26, 22:26] = 1  # necrotic core
    label_map[22:26, 22:26, 24:26] = 4  # enhancing rim
    f = brats_findings(expert="BRATS", arg="", modality="MR", array=volume.array, affine=volume.affine, label_map=label_map)
    # "yellow and red: tumor core, only yellow: enhancing tumor, all colors: whole tumor"
    assert f.legend == {"red": "necrotic tumor core", "green": "peritumoral edema", "yellow": "enhancing tumor"}
    by_name = {s.name: s for s in f.structures}
    assert by_name["tumor core"].voxels == 4 * 4 * 4 and by_name["tumor core"].label == TUMOR_CORE
    assert by_name["whole tumor"].voxels == 8 * 8 * 8 and by_name["whole tumor"].colour is None
    assert by_name["enhancing tumor"].voxels == 4 * 4 * 2
    assert by_name["whole tumor"].volume_ml == pytest.approx(0.512, abs=0.005)


def test_missing_sequence_is_named(runner):
    item, volume = mr_item(channels=("t1", "t2", "flair"), item_id="case-007")
    with pytest.raises(ItemError) as e:
        runner.run(ExpertInput(item, volume))
    assert str(e.value).startswith("case-007: ") and "missing T1c" in str(e.value) and "t1, t2, flair" in str(e.value)


def test_channel_names_can_be_mapped(tmp_path):
    assert channel_order(["post", "pre", "t2", "flair"], {"T1c": "post", "T1": "pre"}) == ([0, 1, 2, 3], [])
    with pytest.raises(CurationError, match="options.channels has \\['T1ce'\\]"):
        make_runner(ExpertSpec(name="BRATS", runner="brats", bundle=brats_bundle(tmp_path), options={"channels": {"T1ce": "x"}}))


def test_not_for_ct(runner):
    item, volume = mr_item()
    ct = study_item(Volume(volume.array[..., 0], volume.affine), item_id="ct-1", kind="nifti", modality="CT")
    assert runner.accepts(item) is None
    assert runner.accepts(ct) == f"{runner.name} takes MR, not CT"


def test_bundle_labels_rule():
    tc, wt, et = (np.array(v) for v in ([1, 1, 0, 0, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]))
    assert brats_labels(tc, wt, et).tolist() == [4, 1, 2, 0, 1]
