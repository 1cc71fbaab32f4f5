import json

import numpy as np

from curation.findings import ClassResult, Findings
from expert_runners.measure import measure_structures
from expert_runners.segmentation import segmentation_findings

AFFINE = np.diag([-2.0, -2.0, 3.0, 1.0])  # LPS-ordered voxels, 2×2×3 mm → 12 µL… 0.012 mL per voxel


def label_map() -> np.ndarray:
    labels = np.zeros((32, 30, 12), np.uint8)
    labels[2:10, 5:15, 2:8] = 1  # low i = patient's right
    labels[22:26, 5:9, 3:5] = 26
    labels[22:25, 20:23, 8:10] = 26  # a second tumour component
    return labels


def test_measurements():
    structures = {s.name: s for s in measure_structures(label_map(), AFFINE, {1: "liver", 26: "hepatic tumor"})}
    liver, tumour = structures["liver"], structures["hepatic tumor"]
    assert liver.voxels == 8 * 10 * 6 and liver.volume_ml == round(480 * 0.012, 2)
    assert liver.bbox == [2, 5, 2, 10, 15, 8]
    assert liver.side == "right" and tumour.side == "left"
    assert tumour.components == 2 and tumour.component_volumes_ml == [round(32 * 0.012, 2), round(18 * 0.012, 2)]
    assert tumour.key_slice in (3, 4)
    x, y, z = liver.centroid_ras
    assert (x, y, z) == (-11.0, -19.0, 13.5)


def test_segmentation_findings_round_trip_through_json():
    image = np.full(label_map().shape, 40.0, np.float32)
    f = segmentation_findings(expert="VISTA3D", runner="test", args="hepatic tumor", modality="CT", image=image,
                              label_map=label_map(), affine=AFFINE, names={1: "liver", 26: "hepatic tumor"})
    assert f.legend == {"red": "liver", "blue": "hepatic tumor"}
    assert [i.kind for i in f.images] == ["key_slice", "overlay"] and all(i.png.startswith(b"\x89PNG") for i in f.images)
    text = json.dumps(f.to_dict())
    assert "png" not in text
    back = Findings.from_dict(json.loads(json.dumps(f.to_dict(with_png=True))))
    assert back == f
    f.classes.append(ClassResult("Effusion", 0.7, True))
    assert Findings.from_dict(f.to_dict(with_png=True)).classes[0].present
