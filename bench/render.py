"""Renderer speed against plain Python that writes the same conversations.

    .venv/bin/python bench/render.py [--n 100] [--rounds 150]

For two templates (VILA-M3's CT trigger → result → answer, and CXR with inline expert hints)
it renders `n` conversations (variants 0…n−1 of one item, so every phrasing choice is
exercised) through `curation.render.Renderer` — sandbox, turn assembly, checks and all — and
through a hand-written Python function that makes the same `Conversation` (messages, images
and the full `meta`: pictures, legends, facts) with the same seeded RNG draws, f-strings and
phrasing banks, and runs the same grounding check on it. Both outputs are compared first (they
must be equal). Timings alternate between the two in `rounds` rounds within one run, and the best
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
from curation.findings import ClassResult, Findings, Image, Structure
from curation.render import grounding
from curation.render.renderer import Renderer, conversation_seed, expert_call
from curation.rows import Conversation

CT_STRUCTURES = [  # name, volume (mL), side, colour: the demo CT phantom's ground truth
    ("liver", 1505.75, "right", "red"), ("spleen", 145.22, "left", "blue"), ("right kidney", 98.41, "right", "yellow"),
    ("aorta", 83.67, "left", "magenta"), ("left kidney", 98.61, "left", "green"), ("hepatic tumor", 13.06, "right", "cyan"),
    ("left lung lower lobe", 440.84, "left", "orange"), ("right lung lower lobe", 243.73, "right", "purple"),
    ("vertebrae L3", 67.68, "midline", "pink"), ("vertebrae L2", 59.66, "midline", "brown"),
    ("vertebrae L1", 60.16, "midline", "lime"), ("vertebrae T12", 59.66, "midline", "teal"),
]
CXR_PRESENT = {"Consolidation", "Mass"}  # the expert's prediction
CXR_TRUTH = {"Consolidation", "Effusion"}  # the labels table: the hint disagrees on two labels
CXR_LABELS = ("Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis", "Effusion",
              "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion", "Fracture",
              "Lung Opacity", "Enlarged Cardiomediastinum")


def picture(seed: int) -> bytes:
    return encode_png(np.random.default_rng(seed).integers(0, 255, (64, 64), dtype=np.uint8))


def ct_findings() -> Findings:
    structures = [Structure(label=i + 1, name=n, voxels=int(v * 20), volume_ml=v, bbox=[0, 0, 0, 1, 1, 1], key_slice=20,
                            centroid_ras=[0.0, 0.0, 0.0], side=side, components=1, component_volumes_ml=[v], colour=c)
                  for i, (n, v, side, c) in enumerate(CT_STRUCTURES)]
    on_slice = [s.name for s in structures[:7]]  # what the main slice shows
    return Findings(expert="VISTA3D", runner="labels", arg="everything", modality="CT", structures=structures,
                    legend={s.colour: s.name for s in structures if s.colour},
                    images=[Image("key_slice", picture(1), 20, "axial slice 20", labels=on_slice),
                            Image("overlay", picture(2), 20, "overlay", labels=on_slice)])


def cxr_findings() -> Findings:
    classes = [ClassResult(name=n, probability=float(n in CXR_PRESENT), present=n in CXR_PRESENT) for n in CXR_LABELS]
    return Findings(expert="CXR", runner="labels", modality="CR", classes=classes, images=[Image("key_slice", picture(3), None, "the image")])


def item(item_id: str, source: str, kind: str, modality: str, labels: dict[str, int] | None = None) -> StudyItem:
    return StudyItem(item_id=item_id, patient_key="p", study_key="s", source=source, kind=kind, modality=modality,  # type: ignore[arg-type]
                     shape=[128, 128, 48], spacing=[3.0, 3.0, 5.0], n_files=48, uris=["x"], attrs={"labels": labels} if labels else {})


# --- the plain-Python baseline: the same conversations, written by hand ---------------------


def _join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _picture_meta(img: Image, index: int, turn: int) -> dict[str, Any]:
    return {"kind": img.kind, "slice": img.slice, "of": None, "labels": list(img.labels), "truth": img.truth, "digest": img.digest,
            "turn": turn, "index": index}


def _checked(c: Conversation, as_json: dict[str, Any]) -> Conversation:
    """The grounding check the renderer runs on every conversation, run here too."""
    found = grounding.problems(c.messages, [p["digest"] for p in c.meta["images"]], c.meta, as_json)
    if found:
        raise SystemExit(f"the baseline's conversation is not grounded: {found}")
    return c


def baseline_ct(r: Renderer, task: TaskSpec, it: StudyItem, f: Findings, variant: int, as_json: dict[str, Any]) -> Conversation:
    """vista3d/segment_and_answer.j2 in plain Python."""
    ph, card = r._phrasings, r.model_card
    arg = task.args[variant % len(task.args)]
    rng = random.Random(conversation_seed(r.spec.seed, it.item_id, task.template, variant))
    group = arg or "everything"
    key = f"vista3d_target.{group}"
    target = rng.choice(ph[key if key in ph else "vista3d_target.any"]).format(group=group)
    key = f"vista3d_describe_question.{group}"
    question = rng.choice(ph[key if key in ph else "vista3d_describe_question.any"]).format(target=target)
    scan, result = f.images
    biggest = max(f.structures, key=lambda s: s.volume_ml) if f.structures else None
    call = expert_call(task.expert or "", arg)
    trigger = rng.choice(ph["vista3d_trigger"]).format(call=call)
    colours = {s.name: s.colour for s in f.structures}
    drawn = [(n, colours[n]) for n in result.labels if colours.get(n)]
    entries = [[c, n] for n, c in drawn]  # one structure per colour here
    report = "Measured volumes: " + ", ".join(f"{s.name} {s.volume_ml:.1f} mL" for s in f.structures) + "."
    if drawn:
        said = f"The colors in this image describe {', '.join(f'{c}: {n}' for c, n in entries)}."
    else:
        said = rng.choice(ph["result_nothing_drawn"])
    result_text = f". {said} {report} Use this result to respond to this prompt:\n{question}"
    facts: list[dict[str, Any]] = []
    if biggest is not None:
        parts = [f"the {n} ({c})" for n, c in drawn]
        facts = [{"turn": 3, "text": p, "shown": {"image": 1, "label": n, "colour": c, "absent": False}, "given": None}
                 for p, (n, c) in zip(parts, drawn)]
        listing = rng.choice(ph["vista3d_describe_answer"]).format(listing=_join_and(parts)) + " " if drawn else ""
        volume = f"{biggest.volume_ml:.1f} mL"
        largest = rng.choice(ph["vista3d_largest"]).format(name=biggest.name, volume=volume)
        facts.append({"turn": 3, "text": largest, "shown": None, "given": {"turn": 2, "text": volume}})
        answer = listing + largest
    else:
        answer = rng.choice(ph["vista3d_nothing"]).format(target=target)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": card}, {"type": "image", "text": None},
                                     {"type": "text", "text": f"This is a CT image.\n{question}"}]},
        {"role": "assistant", "content": [{"type": "text", "text": trigger}]},
        {"role": "user", "content": [{"type": "text", "text": "The results are "}, {"type": "image", "text": None},
                                     {"type": "text", "text": result_text}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    meta: dict[str, Any] = {
        "kind": "expert_trigger", "template": task.template, "args": arg, "variant": variant, "question_kind": "describe",
        "group": group, "question": question, "largest": biggest.name if biggest else None, "answer": None, "answer_from": None,
        "answer_turn": None, "call": call, "calls": [call, None], "images": [_picture_meta(scan, 0, 0), _picture_meta(result, 1, 2)],
        "legends": [{"turn": 2, "image": 1, "entries": entries}] if drawn else [], "facts": facts,
        "prompt": {"card": True, "results": False},
    }
    return _checked(Conversation(messages=messages, images=[scan.png, result.png], template=task.template,
                                 template_hash=r.template_hash(task.template), variant=variant, expert=task.expert, meta=meta), as_json)


def baseline_cxr(r: Renderer, task: TaskSpec, it: StudyItem, f: Findings, variant: int, as_json: dict[str, Any]) -> Conversation:
    """cxr/expert_hint_vqa.j2 in plain Python."""
    ph, card = r._phrasings, r.model_card
    arg = task.args[variant % len(task.args)]
    rng = random.Random(conversation_seed(r.spec.seed, it.item_id, task.template, variant))
    table = {k: int(it.attrs["labels"][k]) for k in sorted(it.attrs["labels"])}  # name order, as the renderer
    present = [k for k, v in table.items() if v]
    absent = [k for k, v in table.items() if not v]
    name = rng.choice(present) if present and (not absent or rng.random() < 0.5) else rng.choice(absent)
    yes = bool(table[name])
    label = name.lower().replace("_", " ")
    hint = next(c for c in f.classes if c.name.lower().replace("_", " ") == label)
    question = rng.choice(ph["cxr_yes_no_question"]).format(label=label)
    predictions = "\n".join(f"{k.name.lower().replace('_', ' ')}: {'yes' if k.present else 'no'}" for k in f.classes)
    answer = rng.choice(ph["cxr_yes" if yes else "cxr_no"]).format(label=label)
    photo = f.images[0]
    messages = [
        {"role": "user", "content": [{"type": "text", "text": card}, {"type": "image", "text": None}, {"type": "text", "text": (
            f" This is a CXR image.\n{question} When answering the question, please analyze the image and incorporate the "
            f"additional results generated by an expert classification model:\n{predictions}")}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]
    meta = {"kind": "cxr_hint_yes_no", "template": task.template, "args": arg, "variant": variant, "question_kind": "yes_no",
            "question": question, "label": name, "answer": "yes" if yes else "no", "hint_agrees": hint.present == yes,
            "answer_from": "truth", "truth": {"classes": table}, "answer_turn": 1, "calls": [None],
            "images": [_picture_meta(photo, 0, 0)], "legends": [],
            "facts": [{"turn": 1, "text": answer, "shown": {"image": 0, "label": name, "colour": None, "absent": not yes}, "given": None}],
            "prompt": {"card": True, "results": True}}
    return _checked(Conversation(messages=messages, images=[photo.png], template=task.template,
                                 template_hash=r.template_hash(task.template), variant=variant, expert=None, meta=meta), as_json)


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
    truth = {n: int(n in CXR_TRUTH) for n in CXR_LABELS}
    cases = [
        ("vista3d/segment_and_answer.j2", TaskSpec(template="vista3d/segment_and_answer.j2", source="ct", expert="VISTA3D",
                                                   args=["everything", "organs", "hepatic tumor", "skeleton"]), item("ct-1", "ct", "dicom", "CT"), ct_findings(), baseline_ct),
        ("cxr/expert_hint_vqa.j2", TaskSpec(template="cxr/expert_hint_vqa.j2", source="cxr", expert="CXR"),
         item("cxr-1", "cxr", "image2d", "CR", truth), cxr_findings(), baseline_cxr),
    ]
    print(f"{'template':32s} {'renderer conv/s':>16s} {'baseline conv/s':>16s} {'ratio':>6s}")
    for name, task, it, f, baseline in cases:
        as_json = f.to_dict()  # the renderer makes it once per item and findings, as here
        for v in range(500):  # same output first
            got, want = r.render(task, it, f, variant=v), baseline(r, task, it, f, v, as_json)
            if (got.messages, got.images, got.meta, got.expert, got.template_hash) != (want.messages, want.images, want.meta, want.expert, want.template_hash):
                raise SystemExit(f"{name}: the baseline differs from the renderer at variant {v}:\n{got.messages}\n{want.messages}\n{got.meta}\n{want.meta}")
        renderer_best = baseline_best = 0.0
        for _ in range(a.rounds):
            renderer_best = max(renderer_best, best_rate(lambda v, t=task, i=it, g=f: r.render(t, i, g, variant=v), a.n))
            baseline_best = max(baseline_best, best_rate(lambda v, b=baseline, t=task, i=it, g=f, j=as_json: b(r, t, i, g, v, j), a.n))
        print(f"{name:32s} {renderer_best:16.0f} {baseline_best:16.0f} {renderer_best / baseline_best:6.2f}")


if __name__ == "__main__":
    main()
