"""Renderer speed against plain Python that writes the same conversations.

    .venv/bin/python bench/render.py [--n 100] [--rounds 150]

For two templates (VILA-M3's CT trigger → result → answer, and CXR with inline expert hints)
it renders `n` conversations (variants 0…n−1 of one item, so every phrasing choice is
exercised) through `curation.render.Renderer` — sandbox, turn assembly, checks and all — and
through a hand-written Python function that makes the same `Conversation` with the same seeded
RNG draws, f-strings and the same phrasing banks. Both outputs are compared first (they must be
equal). Timings alternate between the two in `rounds` rounds within one run, and the best
round of each is reported, so a busy machine slows both alike. Printed: conversations/s for
each and the ratio renderer/baseline (goal ≥ 0.5).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from curation.imaging import encode_png
from curation.items import StudyItem
from curation.manifest import BuildSpec, TaskSpec
from curation.render.renderer import Renderer, conversation_seed, expert_call
from curation.rows import Conversation
from curation.findings import ClassResult, Findings, Image, Structure

CT_STRUCTURES = [  # name, volume (mL), side, colour: the demo CT phantom's ground truth
    ("liver", 1505.75, "right", "red"), ("spleen", 145.22, "left", "blue"), ("right kidney", 98.41, "right", "yellow"),
    ("aorta", 83.67, "left", "magenta"), ("left kidney", 98.61, "left", "green"), ("hepatic tumor", 13.06, "right", "cyan"),
    ("left lung lower lobe", 440.84, "left", "orange"), ("right lung lower lobe", 243.73, "right", "purple"),
    ("vertebrae L3", 67.68, "midline", "pink"), ("vertebrae L2", 59.66, "midline", "brown"),
    ("vertebrae L1", 60.16, "midline", "lime"), ("vertebrae T12", 59.66, "midline", "teal"),
]
CXR_PRESENT = {"Consolidation", "Mass"}
CXR_LABELS = ("Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis", "Effusion",
              "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion", "Fracture",
              "Lung Opacity", "Enlarged Cardiomediastinum")


def picture(seed: int) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 255, (64, 64), dtype=np.uint8))


def ct_findings() -> Findings:
    structures = [Structure(label=i + 1, name=n, voxels=int(v * 20), volume_ml=v, bbox=[0, 0, 0, 1, 1, 1], key_slice=20,
                            centroid_ras=[0.0, 0.0, 0.0], side=side, components=1, component_volumes_ml=[v], colour=c)
                  for i, (n, v, side, c) in enumerate(CT_STRUCTURES)]
    return Findings(expert="VISTA3D", runner="labels", args="everything", modality="CT", structures=structures,
                    legend={s.colour: s.name for s in structures if s.colour},
                    images=[Image("key_slice", picture(1), 20, "axial slice 20"), Image("overlay", picture(2), 20, "overlay")])


def cxr_findings() -> Findings:
    classes = [ClassResult(name=n, probability=float(n in CXR_PRESENT), present=n in CXR_PRESENT) for n in CXR_LABELS]
    return Findings(expert="CXR", runner="labels", modality="CR", classes=classes, images=[Image("key_slice", picture(3), None, "the image")])


def item(item_id: str, source: str, kind: str, modality: str) -> StudyItem:
    return StudyItem(item_id=item_id, patient_key="p", study_key="s", source=source, kind=kind, modality=modality,  # type: ignore[arg-type]
                     shape=[128, 128, 48], spacing=[3.0, 3.0, 5.0], n_files=48, uris=["x"])


# --- the plain-Python baseline: the same conversations, written by hand ---------------------


def _join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def baseline_ct(r: Renderer, task: TaskSpec, it: StudyItem, f: Findings, variant: int) -> Conversation:
    """vista3d/segment_and_answer.j2 in plain Python."""
    ph, card = r._phrasings, r.model_card
    args = task.args[variant % len(task.args)]
    rng = random.Random(conversation_seed(r.spec.seed, it.item_id, task.template, variant))
    group = args or "everything"
    key = f"vista3d_target.{group}"
    target = rng.choice(ph[key if key in ph else "vista3d_target.any"]).format(group=group)
    key = f"vista3d_describe_question.{group}"
    question = rng.choice(ph[key if key in ph else "vista3d_describe_question.any"]).format(target=target)
    shown = [s for s in f.structures if s.colour]
    largest = max(shown, key=lambda s: s.volume_ml) if shown else None
    call = expert_call(task.expert or "", args)
    meta: dict[str, Any] = {"kind": "expert_trigger", "template": task.template, "args": args, "variant": variant,
                            "question_kind": "describe", "group": group, "question": question, "largest": largest.name if largest else None}
    trigger = rng.choice(ph["vista3d_trigger"]).format(call=call)
    if f.legend:
        legend = ", ".join(f"{c}: {n}" for c, n in f.legend.items())
        result = f". The colors in this image describe {legend}. Use this result to respond to this prompt:\n{question}"
    else:
        result = f". Nothing was segmented. Use this result to respond to this prompt:\n{question}"
    if largest is not None:
        listing = _join_and([f"the {s.name} ({s.colour})" for s in shown])
        answer = (rng.choice(ph["vista3d_describe_answer"]).format(listing=listing) + " "
                  + rng.choice(ph["vista3d_largest"]).format(name=largest.name, volume=f"{largest.volume_ml:.1f} mL"))
    else:
        answer = rng.choice(ph["vista3d_nothing"]).format(target=target)
    meta["call"] = call
    images = {i.kind: i.png for i in f.images}
    messages = [
        {"role": "user", "content": [{"type": "text", "text": card}, {"type": "image", "text": None},
                                     {"type": "text", "text": f"This is a CT image.\n{question}"}]},
        {"role": "assistant", "content": [{"type": "text", "text": trigger}]},
        {"role": "user", "content": [{"type": "text", "text": "The results are "}, {"type": "image", "text": None},
                                     {"type": "text", "text": result}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return Conversation(messages=messages, images=[images["key_slice"], images["overlay"]], template=task.template,
                        template_hash=r.template_hash(task.template), variant=variant, expert=task.expert, meta=meta)


def baseline_cxr(r: Renderer, task: TaskSpec, it: StudyItem, f: Findings, variant: int) -> Conversation:
    """cxr/expert_hint_vqa.j2 in plain Python."""
    ph, card = r._phrasings, r.model_card
    args = task.args[variant % len(task.args)]
    rng = random.Random(conversation_seed(r.spec.seed, it.item_id, task.template, variant))
    present = [c for c in f.classes if c.present]
    absent = [c for c in f.classes if not c.present]
    c = rng.choice(present) if present and (not absent or rng.random() < 0.5) else rng.choice(absent)
    label = c.name.lower().replace("_", " ")
    question = rng.choice(ph["cxr_yes_no_question"]).format(label=label)
    meta = {"kind": "cxr_hint_yes_no", "template": task.template, "args": args, "variant": variant, "question_kind": "yes_no",
            "question": question, "label": c.name, "answer": "yes" if c.present else "no"}
    predictions = "\n".join(f"{k.name.lower().replace('_', ' ')}: {'yes' if k.present else 'no'}" for k in f.classes)
    answer = rng.choice(ph["cxr_yes" if c.present else "cxr_no"]).format(label=label)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": card}, {"type": "image", "text": None}, {"type": "text", "text": (
            f" This is a CXR image.\n{question} When answering the question, please analyze the image and incorporate the "
            f"additional results generated by an expert classification model:\n{predictions}")}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    return Conversation(messages=messages, images=[f.images[0].png], template=task.template,
                        template_hash=r.template_hash(task.template), variant=variant, expert=None, meta=meta)


def best_rate(fn: Callable[[int], Any], n: int) -> float:
    started = time.perf_counter()
    for v in range(n):
        fn(v)
    return n / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=100, help="conversations per round (default 100)")
    p.add_argument("--rounds", type=int, default=150, help="alternating rounds; the best of each is kept (default 150)")
    a = p.parse_args(argv)
    spec = BuildSpec(
        name="bench", seed=7,
        sources=[{"name": "ct", "kind": "dicom", "root": "."}, {"name": "cxr", "kind": "image2d", "root": "."}],
        experts=[{"name": "VISTA3D", "runner": "labels", "options": {"preset": "vista3d"}}, {"name": "CXR", "runner": "labels"}],
    )
    r = Renderer(spec)
    cases = [
        ("vista3d/segment_and_answer.j2", TaskSpec(template="vista3d/segment_and_answer.j2", source="ct", expert="VISTA3D",
                                                   args=["everything", "organs", "hepatic tumor", "skeleton"]), item("ct-1", "ct", "dicom", "CT"), ct_findings(), baseline_ct),
        ("cxr/expert_hint_vqa.j2", TaskSpec(template="cxr/expert_hint_vqa.j2", source="cxr", expert="CXR"),
         item("cxr-1", "cxr", "image2d", "CR"), cxr_findings(), baseline_cxr),
    ]
    print(f"{'template':32s} {'renderer conv/s':>16s} {'baseline conv/s':>16s} {'ratio':>6s}")
    for name, task, it, f, baseline in cases:
        for v in range(500):  # same output first
            got, want = r.render(task, it, f, variant=v), baseline(r, task, it, f, v)
            if (got.messages, got.images, got.meta, got.expert, got.template_hash) != (want.messages, want.images, want.meta, want.expert, want.template_hash):
                raise SystemExit(f"{name}: the baseline differs from the renderer at variant {v}:\n{got.messages}\n{want.messages}\n{got.meta}\n{want.meta}")
        renderer_best = baseline_best = 0.0
        for _ in range(a.rounds):
            renderer_best = max(renderer_best, best_rate(lambda v, t=task, i=it, g=f: r.render(t, i, g, variant=v), a.n))
            baseline_best = max(baseline_best, best_rate(lambda v, b=baseline, t=task, i=it, g=f: b(r, t, i, g, v), a.n))
        print(f"{name:32s} {renderer_best:16.0f} {baseline_best:16.0f} {renderer_best / baseline_best:6.2f}")


if __name__ == "__main__":
    main()
