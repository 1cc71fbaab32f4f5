"""Expert arguments have one spelling (`curation.expert_args.canonical_arg`), and every place that
reads one takes it in that spelling: a manifest's task, a template's declaration, the runners'
prompts, label selections and vocabularies, `ExpertInfo`, and the evaluation's reading of a
model's call. So they agree on any spelling of an argument. Before, four copies collapsed
blanks, three others did not, one dropped quotes, and none took a list's order as irrelevant:
`HEPATIC   tumor` was a vocabulary for the labels runner and an error for its label selection,
and a task's `Hepatic  Tumor` failed the check against a template written for `hepatic tumor`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from curation.errors import CurationError
from curation.expert_args import arg_parts, canonical_arg
from curation.manifest import BuildSpec, ExpertSpec, TaskSpec, load_manifest
from curation.render.renderer import Renderer
from curation.render.templates import read_declaration
from expert_runners.base import make_runner
from expert_runners.ct_tissue import selected
from expert_runners.labels import select_labels

REPO = Path(__file__).resolve().parents[1]

# (as written, canonical): odd blanks, case, quotes, list order, empty list entries
TABLE = [
    ("organs", "organs"),
    (" Organs ", "organs"),
    ("HEPATIC   tumor", "hepatic tumor"),
    ("hepatic\ttumor", "hepatic tumor"),
    ("'organs'", "organs"),
    ('"Hepatic Tumor"', "hepatic tumor"),
    ("hepatoma", "hepatoma"),
    ("Everything ", "everything"),
    ("", ""),
    ("   ", ""),
    ("lung, fat", "fat, lung"),
    ("Fat ,LUNG", "fat, lung"),
    ("lung,,fat,", "fat, lung"),
    ("Soft  Tissue, bones", "bones, soft tissue"),
    ("liver, hepatic  tumor", "hepatic tumor, liver"),
    ("26, Liver", "26, liver"),
]
IDS = [repr(w) for w, _ in TABLE]


@pytest.fixture(scope="module")
def runners() -> dict[str, Any]:
    """The built-in runners that read arguments (VISTA3D on the demo bundle: its prompts need no
    weights loaded)."""
    return {
        "vista3d": make_runner(ExpertSpec(name="VISTA3D", runner="vista3d", bundle=REPO / "expert_runners" / "demo_bundles" / "ct_organs")),
        "labels": make_runner(ExpertSpec(name="CTLabels", runner="labels", options={"preset": "vista3d"})),
        "ct_tissue": make_runner(ExpertSpec(name="CTTissue", runner="ct_tissue")),
    }


def outcome(f: Callable[[str], Any], arg: str) -> Any:
    """What `f` makes of the argument: its result, or the kind of error it raises."""
    try:
        result = f(arg)
    except (ValueError, KeyError) as e:
        return ("refused", type(e).__name__)
    return sorted(result) if isinstance(result, set) else result


@pytest.mark.parametrize("written, canonical", TABLE, ids=IDS)
def test_one_spelling(written: str, canonical: str) -> None:
    assert canonical_arg(written) == canonical and canonical_arg(canonical) == canonical
    assert arg_parts(written) == (canonical.split(", ") if canonical else [])


@pytest.mark.parametrize("written, canonical", TABLE, ids=IDS)
def test_manifest_and_declaration_keep_the_canonical_spelling(written: str, canonical: str) -> None:
    assert TaskSpec(template="t.j2", source="s", expert="E", args=written).args == [canonical]
    declared = read_declaration("{#- declare\nkind: x\nimages: 0\nargs: [" + json.dumps(written) + "]\n-#}", "t.j2")
    assert declared.args == [canonical]


@pytest.mark.parametrize("written, canonical", TABLE, ids=IDS)
def test_every_reader_makes_the_same_of_any_spelling(runners: dict[str, Any], written: str, canonical: str) -> None:
    vista, labels, tissue = runners["vista3d"], runners["labels"], runners["ct_tissue"]
    names = {1: "liver", 3: "spleen", 26: "hepatic tumor"}
    readers: dict[str, Callable[[str], Any]] = {
        "Vista3DRunner.prompt": vista.prompt,
        "Vista3DRunner.vocabulary": vista.vocabulary,
        "LabelsRunner.vocabulary": labels.vocabulary,
        "labels.select_labels": lambda a: select_labels(a, [1, 3, 26], names, labels.groups),
        "ct_tissue.selected": selected,
        "ExpertRunner.describe": lambda a: tissue.describe([a]).vocabularies,
        "ExpertInfo.vocabulary (labels)": labels.describe([canonical]).vocabulary,
        "ExpertInfo.vocabulary (ct_tissue)": tissue.describe([canonical]).vocabulary,
    }
    for where, read in readers.items():
        assert outcome(read, written) == outcome(read, canonical), where
    from curation.finetune.scoring import parse_calls

    assert parse_calls(f"Let me trigger <CT({written})>.") == [("CT", canonical)]


def test_the_runners_take_what_the_table_means(runners: dict[str, Any]) -> None:
    """The table's arguments mean something to the runners (the agreement above is not the
    agreement of errors)."""
    vista, labels = runners["vista3d"], runners["labels"]
    assert vista.prompt("HEPATIC   tumor")[0] == "hepatic tumor" and vista.prompt("   ")[0] == "everything"
    assert labels.vocabulary("liver, hepatic  tumor") == ["hepatic tumor", "liver"]
    assert select_labels("26, Liver", [1, 3, 26], {1: "liver", 26: "hepatic tumor"}, {}) == [1, 26]
    assert selected("Soft  Tissue, bones") == {"soft tissue", "bone"}
    assert runners["ct_tissue"].describe(["Fat ,LUNG"]).vocabulary("lung, fat") == ["fat", "lung"]


def test_check_takes_any_spelling_of_a_declared_argument(tmp_path: Path) -> None:
    spec = BuildSpec.model_validate({
        "name": "x", "sources": [{"name": "ct", "kind": "dicom", "root": str(tmp_path)}],
        "experts": [{"name": "VISTA3D", "runner": "labels", "options": {"preset": "vista3d"}}],
        "tasks": [{"template": "vista3d/tumor_presence.j2", "source": "ct", "expert": "VISTA3D", "args": ["Hepatic  Tumor", "'hepatoma'"]}],
    })
    assert spec.tasks[0].args == ["hepatic tumor", "hepatoma"]
    Renderer(spec).check()
    wrong = spec.model_copy(update={"tasks": [TaskSpec(template="vista3d/tumor_presence.j2", source="ct", expert="VISTA3D", args="organs")]})
    with pytest.raises(CurationError, match=r"argument\(s\) \['organs'\] not among those it is written for"):
        Renderer(wrong).check()


def test_a_task_without_arguments_is_one_clear_error(write_manifest) -> None:
    path = write_manifest({"name": "x", "sources": [{"name": "a", "kind": "image2d", "root": "."}],
                           "tasks": [{"template": "cxr/expert_hint_vqa.j2", "source": "a", "args": []}]})
    with pytest.raises(CurationError, match=r"tasks\[0\]\.args"):
        load_manifest(path)
