import json

import numpy as np
import pytest
from scipy import ndimage

from curation.findings import ClassResult, Findings, png_digest
from expert_runners.brats import brats_findings
from expert_runners.measure import measure_label_map, measure_structures
from expert_runners.segmentation import segmentation_findings

AFFINE = np.diag([-2.0, -2.0, 3.0, 1.0])  # LPS-ordered voxels, 2×2×3 mm → 12 µL… 0.012 mL per voxel
NAMES = {1: "liver", 26: "hepatic tumor"}


def label_map() -> np.ndarray:
    labels = np.zeros((32, 30, 12), np.uint8)
    labels[2:10, 5:15, 2:8] = 1  # low i = patient's right
    labels[22:26, 5:9, 3:5] = 26
    labels[22:25, 20:23, 8:10] = 26  # a second tumour component
    return labels


def findings(labels: np.ndarray, **kw) -> Findings:
    image = np.full(labels.shape, 40.0, np.float32)
    return segmentation_findings(expert="VISTA3D", runner="test", arg="hepatic tumor", modality="CT", image=image,
                                 label_map=labels, affine=AFFINE, names=NAMES, **kw)


def test_measurements():
    structures = {s.name: s for s in measure_structures(label_map(), AFFINE, NAMES)}
    liver, tumour = structures["liver"], structures["hepatic tumor"]
    assert liver.voxels == 8 * 10 * 6 and liver.volume_ml == round(480 * 0.012, 2)
    assert liver.bbox == [2, 5, 2, 10, 15, 8]
    assert liver.side == "right" and tumour.side == "left"
    assert tumour.components == 2 and tumour.component_volumes_ml == [round(32 * 0.012, 2), round(18 * 0.012, 2)]
    assert tumour.key_slice in (3, 4)
    x, y, z = liver.centroid_ras
    assert (x, y, z) == (-11.0, -19.0, 13.5)


def test_segmentation_findings_round_trip_through_json():
    f = findings(label_map())
    assert f.legend == {"red": "liver", "blue": "hepatic tumor"}
    assert [i.kind for i in f.images[:2]] == ["key_slice", "overlay"] and all(i.png.startswith(b"\x89PNG") for i in f.images)
    d = f.to_dict()
    text = json.dumps(d)
    assert "png_base64" not in text and all(i["digest"] == png_digest(img.png) for i, img in zip(d["images"], f.images))
    back = Findings.from_dict(json.loads(json.dumps(f.to_dict(with_png=True))))
    assert back == f
    f.classes.append(ClassResult("Effusion", 0.7, True))
    assert Findings.from_dict(f.to_dict(with_png=True)).classes[0].present


def test_every_structure_has_its_own_slice_and_each_picture_knows_what_it_shows():
    labels = label_map()
    f = findings(labels)
    slices = [i.slice for i in f.images if i.kind == "overlay"]
    main = 3  # the first of the slices with the largest labelled area (liver and tumour)
    assert slices == [main, *sorted({s.key_slice for s in f.structures} - {main})]
    for img in f.images:
        on = set(np.unique(labels[:, :, img.slice]).tolist())
        assert img.labels == [NAMES[k] for k in sorted(on - {0})], img  # in drawing order
        assert img.truth is None  # no reference given
    liver_only = next(i for i in f.images if i.kind == "overlay" and i.slice == f.structure("liver").key_slice)
    assert liver_only.slice == 2 and liver_only.labels == ["liver"]  # its own slice shows it alone
    labels[2:10, 5:15, 7] = 0  # no liver on slice 7: a tumour alone there, with its own slice
    labels[10:30, 20:29, 9] = 26
    f = findings(labels)
    alone = next(i for i in f.images if i.kind == "overlay" and i.slice == f.structure("hepatic tumor").key_slice)
    assert alone.slice == 9 and alone.labels == ["hepatic tumor"]


def test_specks_are_not_findings():
    labels = label_map()
    labels[30, 28, 11] = 26  # one voxel, 0.012 mL: a speck far from the tumours
    kept = measure_label_map(labels, AFFINE, NAMES, min_ml=0.1)[0]
    assert kept[30, 28, 11] == 0 and (kept == 26).sum() == 50 and (kept == 1).sum() == 480
    f = findings(labels, min_size_ml=0.1)
    tumour = f.structure("hepatic tumor")
    assert tumour.components == 2 and tumour.voxels == 50
    assert all(i.slice != 11 for i in f.images)  # the speck's slice is no one's key slice
    only_speck = np.zeros_like(labels)
    only_speck[3, 3, 3] = 26
    assert findings(only_speck, min_size_ml=0.1).structures == []


def test_reference_is_measured_alike_and_chooses_the_main_slice():
    predicted = label_map()
    truth = label_map()
    truth[22:25, 20:23, 8:10] = 0  # the second tumour is a false positive of the expert …
    truth[10:30, 16:30, 10] = 26  # … which missed this large one on slice 10
    f = findings(predicted, truth_map=truth)
    assert f.truth is not None and [s.name for s in f.truth.structures] == ["liver", "hepatic tumor"]
    assert all(s.colour is None for s in f.truth.structures)
    assert f.images[0].slice == 10 != findings(predicted).images[0].slice  # the reference's largest area, not the expert's
    assert f.images[1].labels == [] and f.images[1].truth == ["hepatic tumor"]  # the expert drew nothing there
    by_slice = {i.slice: i for i in f.images if i.kind == "key_slice"}
    for s in f.truth.structures:
        assert s.name in by_slice[s.key_slice].truth
    missed = by_slice[f.truth.structures[1].key_slice]
    assert "hepatic tumor" in missed.truth


def test_brats_derived_regions_on_pictures_and_reference():
    labels = np.zeros((20, 20, 10), np.uint8)
    labels[5:15, 5:15, 2:8] = 2
    labels[8:12, 8:12, 3:7] = 1
    labels[9:11, 9:11, 4:6] = 4
    array = np.random.default_rng(0).random((20, 20, 10, 4)).astype(np.float32) * 100
    f = brats_findings(expert="BRATS", arg="", modality="MR", array=array, affine=np.diag([2.0, 2.0, 2.0, 1.0]),
                       label_map=labels, truth_map=labels)
    names = [s.name for s in f.structures]
    assert names == ["necrotic tumor core", "peritumoral edema", "enhancing tumor", "tumor core", "whole tumor"]
    assert [s.name for s in f.truth.structures] == names
    main = f.images[0]
    assert main.slice == 2 and main.labels == main.truth == ["peritumoral edema", "whole tumor"]  # edema alone there
    at_core = next(i for i in f.images if i.kind == "overlay" and i.slice == f.structure("enhancing tumor").key_slice)
    assert at_core.labels == names and at_core.truth == names
    assert [i.caption for i in f.images if i.kind == "sequence"] == ["T1c", "T1", "T2", "FLAIR"]
    assert all(i.slice == main.slice and i.labels == main.labels for i in f.images if i.kind == "sequence")


def masks_with_specks() -> list[np.ndarray]:
    """Label maps whose structures have large parts and specks (0.012 mL voxels): a speck far out
    (it would widen the box), a label made of specks only, a part just over the cut, random blobs."""
    first = np.zeros((20, 18, 12), np.uint8)
    first[2:8, 2:8, 2:6] = 1  # 144 voxels
    first[10:12, 10:12, 8:10] = 1  # 8 voxels, 0.096 mL: under 0.1 mL
    first[10:13, 2:5, 8:10] = 1  # 18 voxels, 0.216 mL: kept
    first[19, 17, 11] = 1  # a speck in the far corner
    first[15, 3, 3] = first[15, 6, 3] = 2  # specks only: the label goes
    first[14:18, 12:16, 1:4] = 3
    rng = np.random.default_rng(7)
    blobs = [ndimage.label(rng.random((16, 14, 10)) > t)[0].clip(0, 5).astype(np.uint8) for t in (0.6, 0.75)]
    return [first, *blobs]


@pytest.mark.parametrize("n", range(3))
def test_dropping_and_measuring_in_one_pass_equals_dropping_then_measuring(n):
    labels = masks_with_specks()[n]
    kept, structures = measure_label_map(labels, AFFINE, NAMES, min_ml=0.1)
    assert kept.dtype == labels.dtype and ((kept == labels) | (kept == 0)).all()  # parts are dropped, nothing else changes
    assert structures == measure_structures(kept, AFFINE, NAMES)  # what dropping then measuring gave, measured afresh
    assert measure_label_map(kept, AFFINE, NAMES, min_ml=0.1)[0] is kept  # nothing left to drop
    for s in structures:
        assert min(s.component_volumes_ml) >= 0.1
    assert measure_label_map(labels, AFFINE, NAMES)[0] is labels  # 0 keeps all
    if n == 0:
        liver = structures[0]
        assert [s.label for s in structures] == [1, 3] and not (kept == 2).any()
        assert liver.voxels == 144 + 18 and liver.components == 2 and liver.component_volumes_ml == [1.73, 0.22]
        assert liver.bbox == [2, 2, 2, 13, 8, 10]  # the corner speck no longer widens it
        assert kept[19, 17, 11] == 0 and (kept[10:12, 10:12, 8:10] == 0).all()


def test_each_structure_is_labelled_once(monkeypatch):
    labels = masks_with_specks()[0]
    calls: list[int] = []
    label = ndimage.label
    monkeypatch.setattr(ndimage, "label", lambda mask, *a, **k: calls.append(int(mask.sum())) or label(mask, *a, **k))
    f = findings(labels, min_size_ml=0.1, truth_map=labels)
    assert len(calls) == 2 * 3  # labels 1, 2 and 3, in the expert's map and the reference
    assert len(f.structures) == len(f.truth.structures) == 2
    calls.clear()
    brats = np.zeros((20, 20, 10), np.uint8)
    brats[5:15, 5:15, 2:8], brats[8:12, 8:12, 3:7], brats[9:11, 9:11, 4:6], brats[0, 0, 0] = 2, 1, 4, 1
    array = np.random.default_rng(0).random((20, 20, 10, 4)).astype(np.float32) * 100
    f = brats_findings(expert="BRATS", arg="", modality="MR", array=array, affine=np.diag([2.0, 2.0, 2.0, 1.0]),
                       label_map=brats, truth_map=brats, min_size_ml=0.1)
    assert len(calls) == 2 * (3 + 2)  # three sub-regions and two derived regions, in each map
    assert f.structure("necrotic tumor core").components == 1
