"""ct_tissue on the demo CT phantoms: lung volume against the phantom's ground truth."""

from __future__ import annotations

import json

import numpy as np
import pytest

from curation.demo.ct import CT_LABELS, ct_phantom
from curation.errors import CurationError, ItemError
from curation.items import StudyItem, Volume
from curation.manifest import ExpertSpec
from expert_runners.base import ExpertInput, make_runner
from expert_runners.ct_tissue import BONE, FAT, LUNG, SOFT_TISSUE, CtTissueRunner, TissueThresholds, tissue_labels

LUNG_IDS = [CT_LABELS["left lung lower lobe"], CT_LABELS["right lung lower lobe"]]


def item(item_id: str, hu: np.ndarray, modality: str = "CT") -> StudyItem:
    return StudyItem(item_id=item_id, patient_key="p", study_key="s", source="demo", kind="nifti", modality=modality,
                     shape=list(hu.shape), spacing=[3.0, 3.0, 5.0], n_files=1, uris=[f"{item_id}.nii.gz"])


@pytest.fixture(scope="module")
def phantoms() -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    return [ct_phantom(0, case) for case in range(3)]


@pytest.fixture(scope="module")
def runner() -> CtTissueRunner:
    r = make_runner(ExpertSpec(name="CT_TISSUE", runner="ct_tissue"), image_max_side=128)
    assert isinstance(r, CtTissueRunner)
    return r


def voxel_ml(affine: np.ndarray) -> float:
    return float(abs(np.linalg.det(affine[:3, :3]))) / 1000.0


@pytest.mark.parametrize("case", [0, 1, 2], ids=lambda c: f"case{c}")
def test_lung_volume_within_5_percent(runner, phantoms, case):
    hu, labels, affine = phantoms[case]
    findings = runner.run(ExpertInput(item(f"ct{case}", hu), Volume(hu, affine)))
    truth_ml = np.isin(labels, LUNG_IDS).sum() * voxel_ml(affine)
    lung = findings.structure("lung")
    assert lung is not None and truth_ml > 100
    assert abs(lung.volume_ml - truth_ml) / truth_ml < 0.05
    assert lung.components == 2  # two lung bases, each its own component


def test_bowel_gas_is_not_lung(phantoms):
    hu, labels, affine = phantoms[0]
    hu = hu.copy()
    # A gas pocket (about 15 mL) in the liver-free lower abdomen, well inside the body.
    x, y, z = np.ogrid[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
    pocket = (x - 64) ** 2 + (y - 50) ** 2 + ((z - 6) * 5 / 3.1) ** 2 < 5**2
    assert not np.isin(labels[pocket], LUNG_IDS).any()
    hu[pocket] = -1000
    tissue, body = tissue_labels(hu, affine)
    assert not (tissue[pocket] == LUNG).any() and body[pocket].all()
    truth = np.isin(labels, LUNG_IDS).sum()
    assert abs((tissue == LUNG).sum() - truth) / truth < 0.05


def test_tissue_classes_agree_with_phantom(phantoms):
    hu, labels, affine = phantoms[1]
    tissue, body = tissue_labels(hu, affine)
    vertebrae = labels >= CT_LABELS["vertebrae L3"]
    assert (tissue[vertebrae] == BONE).mean() > 0.98
    assert not (tissue[labels == CT_LABELS["aorta"]] == BONE).any()  # enhancing vessel, not bone
    assert (tissue[labels == CT_LABELS["liver"]] == SOFT_TISSUE).mean() > 0.95
    assert (tissue == FAT).sum() > 0 and not body[0, 0, 0]
    assert set(np.unique(tissue[~body])) == {0}


def test_findings_schema_timing_and_args(runner, phantoms):
    hu, _, affine = phantoms[2]
    inp = ExpertInput(item("ct2", hu), Volume(hu, affine))
    findings = runner.run(inp)
    d = json.loads(json.dumps(findings.to_dict()))
    names = [s["name"] for s in d["structures"]]
    assert names == ["lung", "bone", "fat", "soft tissue", "body"]
    body = findings.structure("body")
    assert body is not None and body.colour is None and "body" not in d["legend"].values()
    assert body.volume_ml > sum(s.volume_ml for s in findings.structures if s.name != "body")
    assert set(d["legend"].values()) == {"lung", "bone", "fat", "soft tissue"}
    assert {"load", "preprocess", "inference", "postprocess"} <= set(findings.timing)
    assert [i.kind for i in findings.images[:2]] == ["key_slice", "overlay"] and findings.images[0].png[:4] == b"\x89PNG"
    assert findings.truth is None  # HU classes have no reference annotation
    only = runner.run(inp, "lungs, fat")
    assert [s.name for s in only.structures] == ["lung", "fat"]
    assert only.structure("lung").volume_ml == findings.structure("lung").volume_ml


def test_thresholds_from_options_change_result(phantoms):
    hu, _, affine = phantoms[0]
    tight = make_runner(ExpertSpec(name="T", runner="ct_tissue", options={"lung_hu": -800, "fat_hu": [-150, -50]}))
    assert tight.thresholds == TissueThresholds(lung_hu=-800.0, fat_hu=(-150.0, -50.0))
    default = make_runner(ExpertSpec(name="T", runner="ct_tissue"))
    assert tight.fingerprint() != default.fingerprint()
    inp = ExpertInput(item("ct0", hu), Volume(hu, affine))
    assert tight.run(inp).structure("lung").volume_ml < default.run(inp).structure("lung").volume_ml


@pytest.mark.parametrize("options, message", [
    ({"lung_threshold": -400}, "unknown option 'lung_threshold'"),
    ({"fat_hu": -100}, "option 'fat_hu' must be a [low, high] pair"),
    ({"window": "brain"}, "option 'window' must be one of"),
], ids=["unknown-key", "bad-range", "bad-window"])
def test_bad_options_are_named(options, message):
    with pytest.raises(CurationError, match=message.replace("[", r"\[")):
        make_runner(ExpertSpec(name="T", runner="ct_tissue", options=options))


def test_failing_item_names_the_item(runner):
    flat = np.zeros((8, 8), dtype=np.int16)
    with pytest.raises(ItemError, match=r"^broken-1: expert CT_TISSUE failed: .*3D volume"):
        runner.run(ExpertInput(item("broken-1", flat), Volume(flat, np.eye(4))))
    hu = np.zeros((8, 8, 8), dtype=np.int16)
    with pytest.raises(ItemError, match=r"^mr-1: CT_TISSUE takes CT, not MR"):
        runner.run(ExpertInput(item("mr-1", hu, modality="MR"), Volume(hu, np.eye(4))))
    with pytest.raises(ItemError, match="unknown structure"):
        runner.run(ExpertInput(item("ct-x", hu), Volume(hu, np.eye(4))), "liver")
