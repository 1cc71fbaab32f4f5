"""The `labels` runner: ground truth from the demo phantoms through segmentation_findings."""

from __future__ import annotations

import json

import numpy as np
import pytest

from curation.demo.brain import SEQUENCES, brain_phantom
from curation.demo.ct import CT_LABELS, build_ct
from curation.errors import CurationError, ItemError
from curation.items import StudyItem, Volume
from curation.manifest import ExpertSpec
from expert_runners.base import ExpertInput, make_runner
from expert_runners.labels import LabelsRunner, preset_names


def item(item_id: str, kind: str, modality: str, shape: tuple[int, ...], **extra) -> StudyItem:
    return StudyItem(item_id=item_id, patient_key="p", study_key="s", source="demo", kind=kind, modality=modality,
                     shape=list(shape), spacing=[1.0] * len(shape), n_files=1, uris=[f"{item_id}.nii.gz"], **extra)


def runner(**options) -> LabelsRunner:
    r = make_runner(ExpertSpec(name="VISTA3D", runner="labels", options=options), image_max_side=128)
    assert isinstance(r, LabelsRunner)
    return r


@pytest.fixture(scope="module")
def ct():
    """A CT phantom case that carries hepatic tumours."""
    for case in range(4):
        p = build_ct(0, case)
        if p.tumours:
            return p
    raise AssertionError("no demo CT case with tumours among the first four")


@pytest.fixture(scope="module")
def brain():
    for case in range(4):
        p = brain_phantom(0, case)
        if p.seg.any():
            return p
    raise AssertionError("no demo brain case with a tumour among the first four")


def ct_input(p, item_id: str = "ct-1", labels: Volume | None = None) -> ExpertInput:
    return ExpertInput(item(item_id, "dicom", "CT", p.hu.shape), Volume(p.hu, p.affine), labels or Volume(p.labels, p.affine))


def test_ct_ground_truth_measured_with_vista3d_names(ct):
    findings = runner(preset="vista3d").run(ct_input(ct))
    by_name = {s.name: s for s in findings.structures}
    assert set(by_name) == set(CT_LABELS)
    for name, label in CT_LABELS.items():
        s = by_name[name]
        assert s.label == label and s.voxels == int((ct.labels == label).sum())
        assert s.volume_ml == pytest.approx(s.voxels * ct.voxel_ml, abs=0.01)
    assert by_name["hepatic tumor"].components == len(ct.tumours)
    assert by_name["liver"].side == "right" and by_name["spleen"].side == "left"
    d = json.loads(json.dumps(findings.to_dict()))
    assert d["legend"]["red"].startswith("liver") and d["runner"] == "labels"
    assert {"load", "preprocess", "postprocess"} <= set(findings.timing)
    assert [i.kind for i in findings.images[:2]] == ["key_slice", "overlay"]
    assert {s.key_slice for s in findings.structures} <= {i.slice for i in findings.images if i.kind == "overlay"}
    # ground truth is its own reference
    assert findings.truth is not None and findings.truth.structures == findings.structures
    assert all(i.truth == i.labels for i in findings.images)


def test_argument_selects_labels(ct):
    r = runner(preset="vista3d")
    tumour = r.run(ct_input(ct), "hepatic tumor")
    assert {s.name for s in tumour.structures} <= {"liver", "hepatic tumor"} and tumour.structure("hepatic tumor")
    pair = r.run(ct_input(ct), "liver, 26")
    assert [s.name for s in pair.structures] == ["liver", "hepatic tumor"]
    with pytest.raises(ItemError, match=r"^ct-1: .*'pancreas x' is neither a label group nor a label name"):
        r.run(ct_input(ct), "pancreas x")


def test_label_file_with_flipped_axes_is_turned_back(ct):
    lps = np.ascontiguousarray(ct.labels[::-1, ::-1, :])
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = [ct.labels.shape[0] - 1, ct.labels.shape[1] - 1]
    stored = Volume(lps, ct.affine @ flip)  # the same voxels, stored with x and y reversed
    r = runner(preset="vista3d")
    a, b = r.run(ct_input(ct)), r.run(ct_input(ct, labels=stored))
    assert a.to_dict()["structures"] == b.to_dict()["structures"]


def test_labels_off_the_image_grid_are_refused(ct):
    shifted = ct.affine.copy()
    shifted[0, 3] += 3.0
    with pytest.raises(ItemError, match=r"^ct-9: .*resample the labels onto the image grid"):
        runner().run(ct_input(ct, "ct-9", Volume(ct.labels, shifted)))
    half = ct.labels.astype(np.float32) * 0.5
    with pytest.raises(ItemError, match="probability map"):
        runner().run(ct_input(ct, "ct-9", Volume(half, ct.affine)))


def test_brats_group_with_display_channel(brain):
    group = np.stack([brain.images[s] for s in SEQUENCES], axis=-1)
    inp = ExpertInput(item("brain-1", "nifti_group", "MR", group.shape, channels=list(SEQUENCES)),
                      Volume(group, brain.affine, tuple(SEQUENCES)), Volume(brain.seg, brain.affine))
    first = runner(preset="brats").run(inp, "")
    flair = runner(preset="brats", display_channel="flair").run(inp, "")
    names = {s.label: s.name for s in first.structures}
    assert names == {k: v for k, v in preset_names("brats").items() if k in np.unique(brain.seg)}
    assert {s.name: s.colour for s in first.structures} == {n: c for n, c in
                                                           {"necrotic tumor core": "red", "peritumoral edema": "green",
                                                            "enhancing tumor": "yellow"}.items() if n in names.values()}
    assert first.images[0].png != flair.images[0].png  # T1c drawn first, then FLAIR
    # every sequence at the key slice, captioned as BRATS templates ask for them
    sequences = [i for i in first.images if i.kind == "sequence"]
    assert [i.caption for i in sequences] == ["T1c", "T1", "T2", "FLAIR"]
    assert {i.slice for i in sequences} == {first.images[0].slice} and len({i.png for i in sequences}) == 4
    assert runner(preset="brats", display_channel=3).run(inp).images[0].png == flair.images[0].png
    with pytest.raises(ItemError, match=r"^brain-1: .*'display_channel' is 'dwi'"):
        runner(display_channel="dwi").run(inp)


def test_2d_labels_become_certain_classes():
    picture = np.arange(64 * 48, dtype=np.uint32).reshape(64, 48) % 256
    table = {"Cardiomegaly": 1, "Effusion": 0, "Pleural_Thickening": 1}
    inp = ExpertInput(item("cxr-1", "image2d", "CR", picture.shape, attrs={"labels": table}),
                      Volume(picture.astype(np.uint8), np.eye(4)))
    findings = runner().run(inp)
    assert [(c.name, c.probability, c.present, c.threshold) for c in findings.classes] == [
        ("Cardiomegaly", 1.0, True, 0.5), ("Effusion", 0.0, False, 0.5), ("Pleural_Thickening", 1.0, True, 0.5)]
    assert findings.structures == [] and findings.images[0].png[:4] == b"\x89PNG"
    json.dumps(findings.to_dict())
    assert [c.name for c in runner().run(inp, "effusion").classes] == ["Effusion"]


def test_2d_label_map_gives_structures():
    picture = np.zeros((40, 30), dtype=np.uint8)
    mask = np.zeros((40, 30), dtype=np.uint8)
    mask[5:15, 10:20] = 3
    inp = ExpertInput(item("seg-2d", "image2d", "CR", picture.shape), Volume(picture, np.diag([0.5, 0.5, 1.0, 1.0])),
                      Volume(mask, np.diag([0.5, 0.5, 1.0, 1.0])))
    s = runner(names={3: "nodule"}).run(inp).structure("nodule")
    assert s is not None and s.voxels == 100 and s.volume_ml == pytest.approx(100 * 0.25 / 1000, abs=0.01)


def test_missing_label_map_names_the_item(ct):
    inp = ExpertInput(item("ct-nolabels", "dicom", "CT", ct.hu.shape), Volume(ct.hu, ct.affine))
    with pytest.raises(ItemError, match=r"^ct-nolabels: expert VISTA3D \(runner labels\) needs ground truth.*`labels:`"):
        runner().run(inp)


def test_options_validated_and_fingerprinted():
    assert runner(preset="vista3d", names={"26": "liver lesion"}).names[26] == "liver lesion"
    assert runner(preset="vista3d").fingerprint() != runner(preset="brats").fingerprint()
    for options, message in [({"preset": "totalseg"}, "option 'preset' must be one of"),
                             ({"colours": {1: "chartreuse"}}, "unknown colour"),
                             ({"names": {"liver": 1}}, "not an integer label id"),
                             ({"label_names": {}}, "unknown option")]:
        with pytest.raises(CurationError, match=message):
            runner(**options)
