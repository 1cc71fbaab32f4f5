"""A small demo archive, a manifest with one task per template, and findings for every item,
shared by the renderer, template and preview tests.

Findings come from experts that need no weights: ground truth through the `labels` runner
(VISTA3D label ids for CT, the labels table for chest X-rays), the `ct_tissue` thresholds, and,
for brain MRI, `brats_findings` over the ground-truth label map, which is exactly what the BRATS
runner makes of a prediction (sub-regions, tumour core and whole tumour, the four sequence
pictures). A `qa` source wraps the chest X-rays with question–answer records written from the
labels table, as a VQA export would be.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from curation.demo import write_demo_archive
from curation.ingest.index import build_index
from curation.ingest import readers_for
from curation.items import StudyItem
from curation.manifest import BuildSpec, TaskSpec
from expert_runners.base import ExpertInput, make_runner
from expert_runners.brats import brats_findings
from curation.expert_info import ExpertInfo
from curation.findings import Findings

CASES = 2
TUMOUR_GROUPS = ["hepatic tumor", "hepatoma"]

TASKS: list[dict[str, Any]] = [
    {"template": "vista3d/segment_and_answer.j2", "source": "ct", "expert": "VISTA3D", "args": ["everything", "organs", "hepatic tumor"]},
    {"template": "vista3d/segment_and_answer.j2", "source": "ct", "expert": "CT_TISSUE", "args": ["lung, fat"]},  # not "everything": VISTA3D's question
    {"template": "vista3d/segment_request.j2", "source": "ct", "expert": "VISTA3D", "args": ["everything", "organs", "skeleton", "lung tumor"]},
    {"template": "vista3d/tumor_presence.j2", "source": "ct", "expert": "VISTA3D", "args": TUMOUR_GROUPS},
    {"template": "brats/four_sequences.j2", "source": "brain", "expert": "BRATS"},
    {"template": "brats/segment_request.j2", "source": "brain", "expert": "BRATS"},
    {"template": "brats/what_is_this.j2", "source": "brain", "expert": "BRATS"},
    {"template": "cxr/trigger_and_answer.j2", "source": "cxr", "expert": "CXR"},
    {"template": "cxr/expert_hint_vqa.j2", "source": "cxr", "expert": "CXR"},
    {"template": "cxr/expert_hint_choice.j2", "source": "cxr", "expert": "CXR"},
    {"template": "findings/presence.j2", "source": "ct", "expert": "VISTA3D", "args": ["everything", "organs"]},
    {"template": "findings/larger.j2", "source": "ct", "expert": "VISTA3D", "args": ["everything"]},
    {"template": "findings/volume.j2", "source": "ct", "expert": "CT_TISSUE", "args": ["everything"]},
    {"template": "findings/side.j2", "source": "ct", "expert": "VISTA3D", "args": ["everything"]},
    {"template": "findings/presence.j2", "source": "brain", "expert": "BRATS"},
    {"template": "qa/expert_trigger.j2", "source": "vqa", "expert": "CXR"},
    {"template": "qa/expert_hint.j2", "source": "vqa", "expert": "CXR"},
    {"template": "qa/plain.j2", "source": "vqa", "expert": "PICTURE"},
]


def write_qa_files(archive: Path) -> tuple[Path, Path]:
    """A LLaVA-style JSON (one record per image, some with a follow-up turn) and a VQA-RAD-style
    CSV over the demo chest X-rays, answers from the labels table."""
    with (archive / "cxr" / "labels.csv").open() as f:
        rows = list(csv.DictReader(f))
    llava, flat = [], []
    for n, row in enumerate(rows):
        heart = "yes" if row["Cardiomegaly"] == "1" else "no"
        turns = [{"from": "human", "value": "<image>\nIs the heart enlarged?"}, {"from": "gpt", "value": heart}]
        if n % 3 == 0:
            turns += [{"from": "human", "value": "Is there a pneumothorax?"},
                      {"from": "gpt", "value": "yes" if row["Pneumothorax"] == "1" else "no"}]
        llava.append({"id": f"q{n}", "image": row["image"], "conversations": turns})
        flat.append({"image_name": row["image"], "question": "Is there a pleural effusion?",
                     "answer": "yes" if row["Effusion"] == "1" else "no", "answer_type": "CLOSED"})
    json_path = archive / "vqa.json"
    json_path.write_text(json.dumps(llava, indent=1))
    csv_path = archive / "vqa.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(flat[0]))
        w.writeheader()
        w.writerows(flat)
    return json_path, csv_path


def make_spec(archive: Path, out: Path, *, tasks: list[dict[str, Any]] | None = None, seed: int = 7) -> BuildSpec:
    return BuildSpec.model_validate({
        "name": "render-test",
        "seed": seed,
        "sources": [
            {"name": "ct", "kind": "dicom", "root": str(archive / "ct"), "labels": str(archive / "ct_labels"),
             "select": {"modalities": ["CT"]}},
            {"name": "brain", "kind": "nifti_group", "root": str(archive / "brain"), "channels": ["t1c", "t1", "t2", "flair"], "labels": "seg"},
            {"name": "cxr", "kind": "image2d", "root": str(archive / "cxr"), "labels": str(archive / "cxr" / "labels.csv")},
            {"name": "vqa", "kind": "qa", "root": str(archive / "cxr"), "file": str(archive / "vqa.json")},
        ],
        "experts": [
            {"name": "VISTA3D", "runner": "labels", "options": {"preset": "vista3d"}},
            {"name": "CT_TISSUE", "runner": "ct_tissue"},
            {"name": "BRATS", "runner": "brats", "bundle": str(out / "no-bundle")},
            {"name": "CXR", "runner": "labels"},
            {"name": "PICTURE", "runner": "picture"},
        ],
        "tasks": TASKS if tasks is None else tasks,
        "output": {"dir": str(out)},
    })


@dataclass
class Demo:
    spec: BuildSpec
    items: list[StudyItem]
    findings: dict[tuple[str, str, str], Findings]  # (item id, expert, args) → findings
    experts: dict[str, ExpertInfo]  # what the build would hand the renderer

    def items_of(self, source: str) -> list[StudyItem]:
        return [i for i in self.items if i.source == source]

    def get(self, task: TaskSpec, item: StudyItem, variant: int) -> Findings | None:
        if task.expert is None:
            return None
        return self.findings[(item.item_id, task.expert, task.args[variant % len(task.args)])]


def build_demo(root: Path) -> Demo:
    archive = root / "archive"
    write_demo_archive(archive, cases=CASES, seed=0)
    write_qa_files(archive)
    spec = make_spec(archive, root / "out")
    items = build_index(spec).items
    readers = readers_for(spec)
    runners = {e.name: make_runner(e) for e in spec.experts if e.runner != "brats"}
    wanted: dict[str, set[tuple[str, str]]] = {}
    for t in spec.tasks:
        if t.expert:
            wanted.setdefault(t.source, set()).update((t.expert, a) for a in t.args)
    findings: dict[tuple[str, str, str], Findings] = {}
    by_uri: dict[str, StudyItem] = {i.uris[0]: i for i in items if i.source == "cxr"}
    for item in items:
        if item.source == "vqa":
            continue
        reader = readers[item.source]
        volume, labels = reader.load(item), reader.load_labels(item)
        for expert, args in sorted(wanted.get(item.source, ())):
            if expert == "BRATS":
                f = brats_findings(expert="BRATS", arg=args, modality=item.modality, array=np.asarray(volume.array),
                                   affine=np.asarray(volume.affine), label_map=np.asarray(labels.array).astype(np.int32),
                                   truth_map=np.asarray(labels.array).astype(np.int32))  # a perfect expert: the truth itself
            else:
                f = runners[expert].run(ExpertInput(item=item, volume=volume, labels=labels), args)
            findings[(item.item_id, expert, args)] = f
    for item in items:
        if item.source == "vqa":  # the same picture as the cxr item of the same file
            twin = by_uri[item.uris[0]]
            for expert, args in wanted.get("vqa", ()):
                if (twin.item_id, expert, args) not in findings:
                    reader = readers[twin.source]
                    inp = ExpertInput(item=twin, volume=reader.load(twin), labels=None)
                    findings[(twin.item_id, expert, args)] = runners[expert].run(inp, args)
                findings[(item.item_id, expert, args)] = findings[(twin.item_id, expert, args)]
    infos = {name: runner.describe([a for t in spec.tasks if t.expert == name for a in t.args]) for name, runner in runners.items()}
    return Demo(spec=spec, items=items, findings=findings, experts=infos)
