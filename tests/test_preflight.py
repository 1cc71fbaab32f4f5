"""`curation.preflight`: each kind of manifest mistake, found without an expert, Ray or a model,
as one error naming the manifest file and the key. (`tests/test_mistakes.py` runs the common
ones as a user would, as whole commands.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from curation.errors import CurationError
from curation.manifest import load_manifest
from curation.preflight import preflight, writable_file, writable_folder

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def scene(tmp_path: Path) -> Path:
    (tmp_path / "ct" / "P1").mkdir(parents=True)
    (tmp_path / "ct" / "P1" / "IM1.dcm").write_bytes(b"\0" * 132)
    (tmp_path / "brain" / "C1").mkdir(parents=True)
    for ch in ("t1c", "t1", "t2", "flair"):
        (tmp_path / "brain" / "C1" / f"C1_{ch}.nii.gz").write_bytes(b"")
    (tmp_path / "cxr").mkdir()
    (tmp_path / "cxr" / "a.png").write_bytes(b"")
    (tmp_path / "cxr" / "labels.csv").write_text("image\na.png\n")
    return tmp_path


def manifest(scene: Path, **change) -> Path:
    data = {
        "name": "t",
        "sources": [{"name": "ct", "kind": "dicom", "root": "ct"},
                    {"name": "brain", "kind": "nifti_group", "root": "brain", "channels": ["t1c", "t1", "t2", "flair"]},
                    {"name": "cxr", "kind": "image2d", "root": "cxr", "labels": "labels.csv"}],
        "experts": [{"name": "CTTissue", "runner": "ct_tissue"},
                    {"name": "BRATS", "runner": "brats", "bundle": str(REPO / "expert_runners/demo_bundles/brats_demo")}],
        "tasks": [{"template": "findings/volume.j2", "source": "ct", "expert": "CTTissue"},
                  {"template": "brats/four_sequences.j2", "source": "brain", "expert": "BRATS"}],
        "output": {"dir": "out"},
    }
    for key, value in change.items():
        value(data) if callable(value) else data.__setitem__(key, value)
    path = scene / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def check(path: Path, **kw) -> None:
    preflight(load_manifest(path), path, **{"rows": True, **kw})


def test_a_good_manifest_passes(scene):
    check(manifest(scene))


@pytest.mark.parametrize("change, message", [
    (dict(prompts=["mine"]), r"prompts\[0\]: folder not found: .*/mine"),
    (dict(x=lambda d: d["experts"].append({"name": "X", "runner": "vista4d"})), r"experts\[2\].runner: unknown runner 'vista4d'"),
    (dict(x=lambda d: d["experts"][1].update(bundle="cxr")), r"experts\[1\].bundle: not a MONAI bundle: .*configs/metadata.json is missing"),
    (dict(x=lambda d: d["experts"].append({"name": "C", "runner": "cxr_ensemble", "bundle": "cxr", "models": [{"path": "m.pt"}]})),
     r"experts\[2\].models\[0\].path: file not found: .*/cxr/m.pt"),
    (dict(x=lambda d: d["sources"].append({"name": "q", "kind": "qa", "root": "cxr", "file": "qa.json"})), r"sources\[3\].file: file not found"),
    (dict(x=lambda d: d["sources"][0].update(labels="../ct_labels")), r"sources\[0\].labels: folder not found: .*/ct_labels"),
    (dict(x=lambda d: d["sources"][2].update(labels=".")), r"sources\[2\].labels: .* is a folder, not a file"),
    (dict(x=lambda d: d["sources"][0].update(root="cxr/a.png")), r"sources\[0\].root: .*a.png is a file, not a folder"),
    (dict(x=lambda d: d["sources"][1].update(channels=["T1c", "T1", "T2", "FLAIR"])),
     r"tasks\[1\].source: source 'brain' \(nifti_group\) yields no items: no file matching pattern .* for channel 'T1c'"),
    (dict(x=lambda d: d["tasks"].append({"template": "brats/four_sequences.j2", "source": "ct", "expert": "BRATS"})),
     r"m.yaml: tasks\[2\] \(template brats/four_sequences.j2\)"),
    (dict(output={"dir": "out", "cache": "cxr/a.png"}), r"m.yaml: output.cache .*a.png: a file is there, not a folder"),
    # outputs apart from the sources, and the cache out of the dataset each build replaces and users share
    (dict(output={"dir": "cxr/out"}), r"m.yaml: output.dir: .*/cxr/out is inside sources\[2\].root .*/cxr: what a build writes would be "
                                      r"read as the archive's next time; keep outputs and sources apart"),
    (dict(output={"dir": "out", "cache": "brain/cache"}), r"m.yaml: output.cache: .*/brain/cache is inside sources\[1\].root"),
    (dict(output={"dir": "."}), r"m.yaml: output.dir: sources\[0\].root .*/ct is inside it"),
    (dict(output={"dir": "out", "cache": "out/dataset/cache"}), r"m.yaml: output.cache: .*/out/dataset/cache is inside the dataset folder "
                                                                 r".*/out/dataset, which each build replaces whole"),
])
def test_each_mistake_names_the_manifest_and_the_key(scene, change, message):
    path = manifest(scene, **change)
    with pytest.raises(CurationError, match=message) as e:
        check(path)
    assert str(e.value).startswith(str(path)) and "\n" not in str(e.value)


def test_tasks_are_checked_only_where_rows_are_made(scene):
    path = manifest(scene, tasks=[])
    check(path, rows=False)
    with pytest.raises(CurationError, match="tasks: none"):
        check(path)


def test_outputs(scene):
    with pytest.raises(CurationError, match=r"--out .*a.png: a file is there, not a folder"):
        check(manifest(scene), out=scene / "cxr" / "a.png")
    with pytest.raises(CurationError, match=r"--out .*a.png/x/y: .*a.png is a file, so no folder can be made there"):
        writable_folder(scene / "cxr" / "a.png" / "x" / "y", "--out")
    with pytest.raises(CurationError, match=r"--html .*cxr: a folder is there, not a file"):
        writable_file(scene / "cxr", "--html")
    writable_folder(scene / "new" / "deeper", "--out")
    assert not (scene / "new").exists()  # checked, not made
    assert not list(scene.glob(".m3-curate-probe-*"))


def test_a_build_stops_on_a_mistake_before_ray_starts(scene, monkeypatch):
    from curation.build import pipeline

    monkeypatch.setattr(pipeline, "ray_session", lambda *a, **k: pytest.fail("Ray started before the manifest was checked"))
    with pytest.raises(CurationError, match=r"tasks\[0\].template: no template 'findings/nope.j2'"):
        pipeline.build(manifest(scene, x=lambda d: d["tasks"][0].update(template="findings/nope.j2")), progress=False)


def test_with_bundles_to_read_a_build_checks_template_fit_as_it_prepares(scene):
    """Reading a MONAI bundle imports MONAI (about 4 s): a build's preflight leaves fitting
    templates to their experts to the build, which does it while Ray starts; the mistake is
    still one error naming the manifest and the task. Without bundles, preflight checks it."""
    from curation.build.pipeline import _prepare
    from curation.store.layout import Layout

    misfit = manifest(scene, x=lambda d: d["tasks"].append({"template": "brats/four_sequences.j2", "source": "ct", "expert": "BRATS"}))
    check(misfit, experts="cached_or_build")  # left to the build
    with pytest.raises(CurationError, match=r"m.yaml: tasks\[2\] \(template brats/four_sequences.j2\)"):
        _prepare(load_manifest(misfit), Layout(scene / "out"), limit=None, infos=None, origin=f"{misfit}: ")
    weight_free = manifest(scene, x=lambda d: (d["experts"].pop(), d["tasks"].pop(),
                                               d["tasks"].append({"template": "brats/four_sequences.j2", "source": "ct", "expert": "CTTissue"})))
    with pytest.raises(CurationError, match=r"m.yaml: tasks\[1\] \(template brats/four_sequences.j2\)"):
        check(weight_free, experts="cached_or_build")


def test_a_source_is_looked_for_with_its_readers_own_file_rule(scene):
    """image2d takes DICOM files without an extension (`IM0001`), as its reader does."""
    from curation.preflight import _taker

    takes = _taker(load_manifest(manifest(scene)).source("cxr"))
    assert takes("a.png") and takes("IM0001") and takes("b.dcm")
    assert not takes("labels.csv") and not takes("notes.txt")
