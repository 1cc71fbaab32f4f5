"""The committed demo bundles (`expert_runners/demo_bundles/`): they read as ordinary bundles,
run through the same runners as the real ones, and the CT one finds the phantom's liver.

Fast: one phantom per bundle, made in memory with the demo archive's own functions (seed 0, the
demo archive's seed, which the bundles were not trained on). The full quality figures are
`bench/demo_experts_quality.py`'s.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from curation.demo import CT_LABELS, CXR_LABELS, SEQUENCES, brain_phantom, ct_phantom, cxr_phantom
from curation.demo.identity import has_lesion
from curation.items import Volume
from curation.manifest import ExpertSpec, load_manifest
from expert_runners.base import ExpertInput, make_runner
from expert_runners.bundle import read_bundle
from expert_runners.demo_training.common import dice, draws, file_size
from experts_factory import study_item

REPO = Path(__file__).resolve().parents[1]
BUNDLES = REPO / "expert_runners" / "demo_bundles"
SEED = 0


def ct_item(case: int):
    hu, labels, affine = ct_phantom(SEED, case)
    volume = Volume(array=hu, affine=affine)
    return study_item(volume, item_id=f"ct-{case}", kind="dicom", modality="CT"), volume, labels


@pytest.mark.parametrize("name", ["ct_organs", "brats_demo", "cxr_demo"])
def test_bundle_folders_are_ordinary_and_small(name):
    from monai.bundle import ConfigParser

    root = BUNDLES / name
    bundle = read_bundle(root)
    # the volumetric runners apply every step; cxr_ensemble transposes and resizes by itself
    # (the model entry's `size`), which the volumetric reader reports as steps it leaves out
    assert bundle.ignored == ([] if name != "cxr_demo" else ["Transposed", "Resized"]), bundle.ignored
    assert bundle.build_network("cpu") is not None  # weights fit network_def
    metadata = json.loads((root / "configs" / "metadata.json").read_text())
    assert "phantom" in metadata["intended_use"] and metadata["training"]["seed"] != SEED
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    parser.get_parsed_content("preprocessing")  # MONAI's own parser builds every transform
    assert file_size(root) < 2_200_000


def test_ct_bundle_finds_the_liver():
    case = 0
    item, volume, labels = ct_item(case)
    runner = make_runner(ExpertSpec(name="VISTA3D", runner="vista3d", bundle=BUNDLES / "ct_organs"))
    runner.setup("cpu")
    assert runner.prompted is False  # a plain segmentation network, channel k = label k
    label_map = runner.segment(volume, runner.prompt("everything")[1])
    assert label_map.shape == labels.shape
    assert dice(label_map == CT_LABELS["liver"], labels == CT_LABELS["liver"]) > 0.8
    assert not (label_map == CT_LABELS["hepatic tumor"]).any()  # "everything" leaves tumours out, as VISTA3D
    findings = runner.run(ExpertInput(item, volume), "hepatic tumor")
    names = {s.name for s in findings.structures}
    assert "liver" in names and names <= {"liver", "hepatic tumor"}
    slices = {findings.images[0].slice} | {s.key_slice for s in findings.structures}
    assert len(findings.images) == 2 * len(slices)  # the main slice and each structure's own, plain and overlaid
    assert "inference" not in findings.timing  # the same volume: the network's output is reused
    # the phantom's own labels are the reference, limited to what the argument covers
    reference = Volume(array=labels.astype(np.int16), affine=volume.affine)
    everything = runner.run(ExpertInput(item, volume, reference), "everything")
    truth = {s.name for s in everything.truth.structures}
    assert "liver" in truth and "hepatic tumor" not in truth  # VISTA3D's "everything" leaves tumours out
    tumour = runner.run(ExpertInput(item, volume, reference), "hepatic tumor")
    assert {s.name for s in tumour.truth.structures} <= {"liver", "hepatic tumor"}
    assert all(i.truth is not None for i in tumour.images)


def test_brats_bundle_segments_a_tumour():
    case = next(c for c in range(4) if has_lesion(SEED, "brain", c))
    p = brain_phantom(SEED, case)
    volume = Volume(array=np.stack([p.images[s] for s in SEQUENCES], axis=-1).astype(np.float32), affine=p.affine, channels=SEQUENCES)
    item = study_item(volume, item_id=f"brain-{case}", kind="nifti_group", modality="MR")
    runner = make_runner(ExpertSpec(name="BRATS", runner="brats", bundle=BUNDLES / "brats_demo"))
    findings = runner.run(ExpertInput(item, volume))
    whole = findings.structure("whole tumor")
    assert whole is not None
    truth_ml = float((p.seg > 0).sum()) * 8 / 1000  # 2 mm voxels
    assert whole.volume_ml == pytest.approx(truth_ml, rel=0.3)
    assert [i.caption for i in findings.images if i.kind == "sequence"] == ["T1c", "T1", "T2", "FLAIR"]


def test_cxr_bundle_answers_all_labels():
    s = cxr_phantom(SEED, 0)
    volume = Volume(array=s.image.T.copy(), affine=np.eye(4))  # the image2d reader's (x, y) layout
    item = study_item(volume, item_id="cxr-0", kind="image2d", modality="CR")
    runner = make_runner(ExpertSpec(name="CXR", runner="cxr_ensemble", bundle=BUNDLES / "cxr_demo",
                                    models=[{"path": "models/model.pt2", "kind": "torch_export", "size": 256}]))
    findings = runner.run(ExpertInput(item, volume))
    assert [c.name for c in findings.classes] == list(CXR_LABELS)
    assert all(0.0 <= c.probability <= 1.0 for c in findings.classes)


def test_demo_manifest_experts_build():
    spec = load_manifest(REPO / "manifests" / "demo.yaml")
    runners = {e.name: make_runner(e) for e in spec.experts}
    assert {"VISTA3D", "BRATS", "CXR", "CTTissue"} <= set(runners)
    assert runners["VISTA3D"].bundle.root == BUNDLES / "ct_organs"  # type: ignore[attr-defined]
    for runner in runners.values():
        assert len(runner.fingerprint()) == 16


def test_training_draws_full_batches_each_index_once_per_pass():
    batches = draws(np.random.default_rng(0), 8, 4)
    passes = [next(batches) + next(batches) for _ in range(3)]
    assert all(sorted(p) == list(range(8)) for p in passes) and len({tuple(p) for p in passes}) == 3
    uneven = draws(np.random.default_rng(0), 10, 4)  # 2 left over after two batches: a fresh pass
    assert all(len(next(uneven)) == 4 for _ in range(5))


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_stopping_the_demo_training_ends_it_and_its_trainings_with_one_line(tmp_path, how):
    """`python -m expert_runners.demo_training --jobs 2` trains two bundles in worker processes,
    minutes each. Ctrl-C (SIGINT to the whole group) or a SIGTERM to the command alone ends it
    with its one line and status, and its workers with it: before, the command waited for the
    trainings and each process printed a traceback."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "expert_runners.demo_training", str(tmp_path / "bundles"), "--cases", "2",
                             "--only", "brats_demo,cxr_demo", "--jobs", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline, workers = time.monotonic() + 120, []
    while proc.poll() is None and time.monotonic() < deadline:  # until both trainings have begun: torch imported, at work
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "resource_tracker" not in " ".join(p.cmdline())]
        if len(workers) >= 2 and all(sum(p.cpu_times()[:2]) > 4.0 for p in workers):
            break
        time.sleep(0.2)
    assert proc.poll() is None and len(workers) >= 2, "the trainings did not start"
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert (proc.returncode, stderr.strip()) == ((130, "demo training: interrupted") if how == "ctrl-c" else
                                                 (143, "demo training: terminated (SIGTERM)")), stderr[-3000:]
    _, alive = psutil.wait_procs(workers, timeout=10)
    assert not alive, f"training processes left running: {alive}"
