"""What runners declare without running: modules import without torch, `describe()` gives the
plain `ExpertInfo` the plan and the renderer use, one `accepts` rule, one placement rule, one
device rule, and the weight-free `picture` runner."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

from curation.expert_info import NEEDS, ExpertInfo
from curation.findings import Findings
from curation.items import ITEM_KIND, ITEM_KINDS, SOURCE_KINDS, StudyItem, Volume
from curation.manifest import ExpertSpec
from expert_runners.base import BUILTIN, ExpertInput, make_runner, pick_device, runner_class

REPO = Path(__file__).resolve().parents[1]


def item(kind: str = "dicom", modality: str = "CT", shape: tuple[int, ...] = (16, 16, 8)) -> StudyItem:
    return StudyItem(item_id="it", patient_key="p", study_key="s", source="x", kind=kind, modality=modality,  # type: ignore[arg-type]
                     shape=list(shape[:3]), spacing=[1.0, 1.0, 1.0], n_files=1, uris=["a"])


def test_runner_modules_import_without_torch() -> None:
    modules = sorted({target.partition(":")[0] for target in BUILTIN.values()})
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "print(sorted(m for m in ('torch', 'monai', 'ray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_declares_what_it_gives(name: str) -> None:
    cls = runner_class(name)
    assert cls.PROVIDES is not None and set(cls.PROVIDES) <= set(NEEDS), name
    assert set(cls.kinds) <= set(ITEM_KINDS), name


def test_describe_is_plain_data_with_vocabularies() -> None:
    labels = make_runner(ExpertSpec(name="CTLabels", runner="labels", options={"preset": "vista3d"}))
    info = labels.describe(["everything", "hepatic tumor", "Hepatic  Tumor"])
    assert info.provides is not None and "classes" in info.provides
    assert info.vocabulary("hepatic tumor") == ["hepatic tumor", "liver"]
    assert "spleen" in info.vocabulary("everything") and info.vocabulary("organs") == []  # not asked for
    assert ExpertInfo.from_json(json.loads(json.dumps(info.to_json()))) == info
    tissue = make_runner(ExpertSpec(name="CTTissue", runner="ct_tissue")).describe(["everything", "lung, fat"])
    assert tissue.vocabulary("everything") == ["body", "bone", "fat", "lung", "soft tissue"]
    assert tissue.vocabulary("lung, fat") == ["fat", "lung"] and not tissue.weights


def test_every_field_of_expert_info_has_a_reader() -> None:
    """An `ExpertInfo` field is there for some stage to read (`info.field`); one that is only
    set is dead weight in every build's record (as `ground_truth` was: the `labels` runner's
    findings carry their truth themselves)."""
    import ast
    from dataclasses import fields

    read = set()
    for package in ("curation", "expert_runners"):
        for path in (REPO / package).rglob("*.py"):
            read |= {n.attr for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load)}
    assert [f.name for f in fields(ExpertInfo) if f.name not in read] == []


def test_an_earlier_builds_record_still_reads() -> None:
    """`m3-curate render` and `preview` read the `ExpertInfo` a build recorded in its cache, which
    may be older than the code: a key no field holds any more is left out."""
    info = make_runner(ExpertSpec(name="CTTissue", runner="ct_tissue")).describe(["everything"])
    assert "ground_truth" not in info.to_json()
    assert ExpertInfo.from_json({**info.to_json(), "ground_truth": False}) == info


def test_one_accepts_rule() -> None:
    runner = make_runner(ExpertSpec(name="CTTissue", runner="ct_tissue"))
    info = runner.describe()
    for it in (item(), item("image2d", "CR", (8, 8)), item("nifti_group", "CT"), item("nifti", "MR")):
        assert runner.accepts(it) == info.accepts(it)
    assert info.accepts(item("image2d", "CR", (8, 8))) == "CTTissue takes CT, not CR"
    assert info.accepts(item("nifti_group", "CT")) == "CTTissue takes dicom/nifti items, not nifti_group"


def test_placement_keys_change_no_fingerprint() -> None:
    base = ExpertSpec(name="CTTissue", runner="ct_tissue")
    placed = ExpertSpec(name="Other", runner="ct_tissue", actors=3, gpus=0.5, memory_gb=2, batch_size=4)
    assert make_runner(base).fingerprint() == make_runner(placed).fingerprint()
    assert placed.without_placement().model_dump() == {**placed.model_dump(), "actors": None, "gpus": None, "memory_gb": None,
                                                       "batch_size": 1}
    smaller = ExpertSpec(name="CTTissue", runner="ct_tissue", min_size_ml=0.1)
    assert make_runner(smaller).fingerprint() != make_runner(base).fingerprint()  # what it computes changed


def test_device_rule() -> None:
    assert pick_device(0) == "cpu"
    assert pick_device(1) in ("cpu", "cuda") and pick_device() in ("cpu", "cuda")


def test_source_kinds_in_one_place() -> None:
    """`curation.items` lists the source kinds; the readers, the manifest and the templates'
    declarations agree with it."""
    from typing import get_args

    from curation.ingest import READERS
    from curation.manifest import SourceSpec
    from curation.render.templates import TemplateDeclaration

    assert set(ITEM_KIND) == set(SOURCE_KINDS) and set(ITEM_KIND.values()) == set(ITEM_KINDS) and ITEM_KIND["qa"] == "image2d"
    assert set(READERS) == set(SOURCE_KINDS)
    union = get_args(get_args(SourceSpec)[0])
    assert {get_args(cls.model_fields["kind"].annotation)[0] for cls in union} == set(SOURCE_KINDS)
    assert set(get_args(get_args(TemplateDeclaration.model_fields["sources"].annotation)[0])) == set(SOURCE_KINDS)


def test_picture_runner_gives_the_item_picture() -> None:
    runner = make_runner(ExpertSpec(name="Picture", runner="picture"))
    assert runner.describe().provides == ("key_slice",) and runner.describe().weights is False
    flat = runner.run(ExpertInput(item("image2d", "CR", (20, 10)), Volume(np.arange(200, dtype=np.uint8).reshape(20, 10), np.eye(4))))
    ct = runner.run(ExpertInput(item(), Volume(np.full((16, 16, 8), 40.0), np.eye(4))))
    for f, size in ((flat, (10, 20)), (ct, (16, 16))):
        assert isinstance(f, Findings) and [i.kind for i in f.images] == ["key_slice"] and not f.structures
        assert PILImage.open(io.BytesIO(f.images[0].png)).size[::-1] == size  # (rows, columns)


def test_picture_runner_shows_the_middle_axial_slice_whatever_axis_the_series_is_stored_along() -> None:
    """A sagittal series (first voxel axis: left–right, last: anterior–posterior): the picture is
    the middle slice along the patient's head–foot axis, shown as an axial picture."""
    runner = make_runner(ExpertSpec(name="Picture", runner="picture"))
    sagittal = np.array([[0, 0, -1, 0], [0, -1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)  # i → S, j → P, k → L (RAS)
    volume = np.zeros((30, 20, 10), np.float32)  # 30 head–foot, 20 front–back, 10 left–right
    volume[15] = 100.0  # the middle axial plane lit
    f = runner.run(ExpertInput(item(), Volume(volume, sagittal)))
    picture = np.asarray(PILImage.open(io.BytesIO(f.images[0].png)))
    assert f.images[0].slice == 15 and picture.shape[:2] == (20, 10) and picture.min() > 0  # all of it in the lit plane


def test_a_plug_in_subclass_keeps_its_built_in_family() -> None:
    from expert_runners.base import family
    from expert_runners.ct_tissue import CtTissueRunner

    class Mine(CtTissueRunner):
        runner = "mypkg.tissue:Mine"

    assert family(Mine) == "ct_tissue" and family(CtTissueRunner) == "ct_tissue"
    assert Mine(ExpertSpec(name="T", runner="mypkg.tissue:Mine")).describe().family == "ct_tissue"  # it gets ct_tissue's card
