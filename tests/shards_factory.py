"""Shards shaped like a build's, for fine-tuning and evaluation tests (and `bench/finetune.py`
until the real `m3-curate build` writes them).

`write_shards(out, conversations=N)` writes `out/dataset/data/<split>/part-NNNNN.parquet` with
`curation.rows.ROW_SCHEMA` rows that follow VILA-M3's conversation kinds
(`../shared/reference/VILA-M3.md`): a model card first in the first user turn, real small PNG
images (CT slices, segmentation overlays, four brain MRI sequences, chest X-rays), expert
triggers such as `Let me trigger <VISTA3D(hepatic tumor)>.`, the expert's result as a user
turn with an overlay image and a colour legend or CXR predictions, and a grounded answer;
closed questions (yes/no, multiple choice) and a "how many" follow-up. Which call is right
follows from the question and the modality, and each closed answer follows from the expert
result in the conversation, so a model can learn both. Same arguments, same bytes.

Every row carries `meta` as the renderer writes it (README "meta: what evaluation reads"): the
question kind, the question, the expected answer and its turn, and the call each assistant
turn must make (`calls`, null where it must call nothing). `write_shards(..., meta=False)`
writes shards as they were before `meta` existed.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from curation.rows import ROW_SCHEMA, row_id

# ROW_SCHEMA with `meta` (a JSON string after `findings`), whether or not the project's has it yet
SCHEMA = ROW_SCHEMA if "meta" in ROW_SCHEMA.names else ROW_SCHEMA.insert(ROW_SCHEMA.get_field_index("findings") + 1, pa.field("meta", pa.string()))

MODEL_CARD = (
    "Here is a list of available expert models:\n"
    "<BRATS(args)> Modality: MRI, Task: segmentation, Overview: brain tumour subregions from four MRI "
    "sequences (T1c, T1, T2, FLAIR), Accuracy: mean Dice 0.85, Valid args are: None\n"
    "<VISTA3D(args)> Modality: CT, Task: segmentation, Overview: 127 anatomical structures and lesions "
    "in 3D CT, Accuracy: mean Dice 0.79, Valid args are: 'everything', 'hepatic tumor', 'pancreatic tumor', "
    "'lung tumor', 'bone lesion', 'organs', 'cardiovascular', 'gastrointestinal', 'skeleton' or 'muscles'\n"
    "<CXR(args)> Modality: chest x-ray (CXR), Task: classification, Overview: an ensemble of chest X-ray "
    "classifiers over 18 findings, Accuracy: mean AUC 0.80, Valid args are: None\n"
    "Give the model <NAME(args)> when selecting a suitable expert model.\n"
)

CXR_LABELS = ["atelectasis", "cardiomegaly", "consolidation", "edema", "effusion", "pneumothorax", "nodule", "mass"]

# VISTA3D questions: (phrasings, argument, what the legend shows, the closed question's subject)
CT_QUESTIONS: list[tuple[list[str], str, str]] = [
    (["Is there a tumor in the liver?", "Does the liver show a tumor?", "Can you see a hepatic tumor?"], "hepatic tumor", "hepatic tumor"),
    (["Is there a tumor in the pancreas?", "Does the pancreas show a tumor?"], "pancreatic tumor", "pancreatic tumor"),
    (["Are there any lesions in the bones?", "Is there a bone lesion?"], "bone lesion", "bone lesion"),
    (["Is there a tumor in the lungs?", "Can you find a lung tumor?"], "lung tumor", "lung tumor"),
]
CT_OPEN: list[tuple[list[str], str, str]] = [
    (["Which organs are visible in this image?", "What organs can you see?"], "organs", "liver, spleen and kidneys"),
    (["Describe the vessels in this image.", "Which blood vessels are visible?"], "cardiovascular", "aorta and inferior vena cava"),
    (["What parts of the bowel are visible?", "Describe the gastrointestinal tract here."], "gastrointestinal", "stomach, duodenum and colon"),
    (["Which bones can you see?", "Describe the skeleton in this image."], "skeleton", "vertebrae and ribs"),
    (["Which muscles are visible?", "Describe the muscles in this image."], "muscles", "psoas and erector spinae muscles"),
]
DIRECT = [
    (["Segment everything in this image.", "Please segment the whole image."], "everything", "the entire image"),
    (["Can you segment the organs?", "Please segment the organs."], "organs", "the organs"),
    (["Segment the vessels, please.", "Can you segment the blood vessels?"], "cardiovascular", "the blood vessels"),
]
COLOURS = ["red", "blue", "yellow", "magenta", "green"]


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[: shape[0], : shape[1]]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1


def ct_slice(rng: np.random.Generator, size: int = 64, tumor: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A soft-tissue-windowed axial CT slice (uint8) and its label map (1 liver, 2 spleen, 3 tumour)."""
    img = np.zeros((size, size), np.float32)
    body = _ellipse(img.shape, size / 2, size / 2, size * 0.38, size * 0.46)
    img[body] = 110
    liver = _ellipse(img.shape, size * 0.45, size * 0.33, size * 0.16, size * 0.14) & body
    spleen = _ellipse(img.shape, size * 0.42, size * 0.72, size * 0.08, size * 0.06) & body
    img[liver], img[spleen] = 150, 140
    label = np.zeros(img.shape, np.uint8)
    label[liver], label[spleen] = 1, 2
    if tumor:
        t = _ellipse(img.shape, size * (0.42 + 0.06 * rng.random()), size * (0.3 + 0.05 * rng.random()), 3, 3) & liver
        img[t], label[t] = 85, 3
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), label


def overlay(gray: np.ndarray, label: np.ndarray) -> np.ndarray:
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    palette = {1: (255, 0, 0), 2: (0, 0, 255), 3: (255, 255, 0)}
    for value, colour in palette.items():
        rgb[label == value] = 0.5 * rgb[label == value] + 0.5 * np.array(colour)
    return rgb.astype(np.uint8)


def mri_slices(rng: np.random.Generator, size: int = 64, tumor: bool = False) -> list[np.ndarray]:
    brain = _ellipse((size, size), size / 2, size / 2, size * 0.4, size * 0.33)
    lesion = _ellipse((size, size), size * 0.4, size * 0.6, 6, 5) if tumor else np.zeros((size, size), bool)
    out = []
    for base, spot in ((90, 200), (100, 80), (120, 190), (110, 210)):  # t1c, t1, t2, flair
        img = np.zeros((size, size), np.float32)
        img[brain] = base
        img[lesion & brain] = spot
        out.append(np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8))
    return out


def cxr(rng: np.random.Generator, size: int = 64, cardiomegaly: bool = False) -> np.ndarray:
    img = np.full((size, size), 200, np.float32)
    for cx in (size * 0.3, size * 0.7):
        img[_ellipse(img.shape, size * 0.45, cx, size * 0.3, size * 0.15)] = 60
    img[_ellipse(img.shape, size * 0.62, size * 0.52, size * (0.16 if cardiomegaly else 0.1), size * (0.2 if cardiomegaly else 0.12))] = 180
    return np.clip(img + rng.normal(0, 5, img.shape), 0, 255).astype(np.uint8)


def _text(t: str) -> dict[str, Any]:
    return {"type": "text", "text": t}


_IMAGE: dict[str, Any] = {"type": "image", "text": None}


def _turn(role: str, *parts: dict[str, Any]) -> dict[str, Any]:
    return {"role": role, "content": list(parts)}


@dataclass(slots=True)
class _Conv:
    task: str
    modality: str
    expert: str | None
    messages: list[dict[str, Any]]
    images: list[bytes]
    findings: dict[str, Any]
    meta: dict[str, Any]


def _meta(messages: list[dict[str, Any]], kind: str, args: list[str], question_kind: str, question: str | None,
          answer: str | None, answer_turn: int | None, **extra: Any) -> dict[str, Any]:
    """The row's `meta` (the contract the renderer writes): the call of each assistant turn is
    the one its text writes, or null."""
    calls = []
    for m in messages:
        if m["role"] == "assistant":
            found = [p["text"] for p in m["content"] if p["type"] == "text" and "<" in p["text"]]
            start = found[0].index("<") if found else -1
            calls.append(found[0][start : found[0].index(">", start) + 1] if found else None)
    return {"kind": kind, "template": f"{kind}.j2", "variant": 0, "args": args, "question_kind": question_kind,
            "question": question, "answer": answer, "answer_from": "expert" if answer is not None else None,
            "answer_turn": answer_turn, "calls": calls, "facts": [], **extra}


def _vista3d_trigger(r: random.Random, rng: np.random.Generator) -> _Conv:
    k = r.randrange(len(CT_QUESTIONS) + len(CT_OPEN))  # every argument equally often
    closed = k < len(CT_QUESTIONS)
    if closed:
        phrasings, arg, subject = CT_QUESTIONS[k]
        present = r.random() < 0.5
    else:
        phrasings, arg, answer = CT_OPEN[k - len(CT_QUESTIONS)]
        present = False
    question = r.choice(phrasings)
    gray, label = ct_slice(rng, tumor=present and arg == "hepatic tumor")
    legend = "red: liver, blue: spleen" + (f", yellow: {subject}" if closed and present else "")
    messages = [
        _turn("user", _text(MODEL_CARD), _IMAGE, _text(f"This is a CT image.\n{question}")),
        _turn("assistant", _text(f"This looks like a CT image. Let me trigger <VISTA3D({arg})>.")),
        _turn("user", _text("The results are "), _IMAGE,
              _text(f". The colors in this image describe {legend}. Use this result to respond to this prompt: {question}")),
    ]
    if closed:
        messages.append(_turn("assistant", _text("Yes." if present else "No.")))
        if present:
            n = r.randint(1, 3)
            noun = subject + ("s" if n > 1 else "")
            messages.append(_turn("user", _text(f"How many {subject}s are there?")))
            messages.append(_turn("assistant", _text(f"There {'are' if n > 1 else 'is'} {n} {noun}.")))
    else:
        messages.append(_turn("assistant", _text(f"The segmentation shows the {answer}.")))
    findings = {"group": arg, "present": present, "legend": legend}
    meta = (_meta(messages, "vista3d/segment_and_answer", [arg], "presence", question, "yes" if present else "no", 3, structure=subject)
            if closed else _meta(messages, "vista3d/segment_and_answer", [arg], "describe", question, answer, 3))
    return _Conv("vista3d/segment_and_answer", "CT", "VISTA3D", messages, [png(gray), png(overlay(gray, label))], findings, meta)


def _vista3d_direct(r: random.Random, rng: np.random.Generator) -> _Conv:
    phrasings, arg, what = r.choice(DIRECT)
    gray, _ = ct_slice(rng)
    question = r.choice(phrasings)
    messages = [
        _turn("user", _text(MODEL_CARD), _IMAGE, _text(f"This is a CT image.\n{question}")),
        _turn("assistant", _text(f"I segmented {what} using <VISTA3D({arg})>.")),
    ]
    meta = _meta(messages, "vista3d/direct_segmentation", [arg], "expert_selection", question, None, None)
    return _Conv("vista3d/direct_segmentation", "CT", "VISTA3D", messages, [png(gray)], {"group": arg}, meta)


def _brats(r: random.Random, rng: np.random.Generator) -> _Conv:
    present = r.random() < 0.5
    seqs = mri_slices(rng, tumor=present)
    question = r.choice(["Is there a brain tumor?", "Does this brain show a tumor?", "Can you see a tumour in this brain?"])
    legend = "yellow and red: tumor core, only yellow: enhancing tumor, all colors: whole tumor" if present else "no tumor regions"
    ov = np.repeat(seqs[0][..., None], 3, axis=2)
    messages = [
        _turn("user", _text(MODEL_CARD), _text("T1(contrast enhanced): "), _IMAGE, _text(", T1: "), _IMAGE,
              _text(", T2: "), _IMAGE, _text(", FLAIR: "), _IMAGE, _text(f" These are different MRI modalities.\n{question}")),
        _turn("assistant", _text("This looks like a brain MRI. Let me trigger <BRATS()>.")),
        _turn("user", _text("The results are "), _IMAGE,
              _text(f". The colors in this image describe {legend}. Use this result to respond to this prompt: {question}")),
        _turn("assistant", _text("Yes." if present else "No.")),
    ]
    meta = _meta(messages, "brats/tumor_presence", [""], "presence", question, "yes" if present else "no", 3)
    return _Conv("brats/tumor_presence", "MR", "BRATS", messages, [png(s) for s in seqs] + [png(ov)], {"tumor": present}, meta)


def _predictions(r: random.Random) -> dict[str, bool]:
    return {label: r.random() < 0.3 for label in CXR_LABELS}


def _cxr_trigger(r: random.Random, rng: np.random.Generator) -> _Conv:
    preds = _predictions(r)
    label = r.choice(CXR_LABELS)
    question = r.choice([f"Is there {label} in this image?", f"Does the patient have {label}?", f"Is {label} present?"])
    listing = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in preds.items())
    messages = [
        _turn("user", _text(MODEL_CARD), _IMAGE, _text(question)),
        _turn("assistant", _text("This looks like a chest x-ray. Let me first trigger <CXR()>.")),
        _turn("user", _text(f"The resulting predictions are: {listing}. Analyze the image and take these predictions "
                            f"into account when responding to this prompt: {question}")),
        _turn("assistant", _text("Yes." if preds[label] else "No.")),
    ]
    meta = _meta(messages, "cxr/trigger_vqa", [""], "presence", question, "yes" if preds[label] else "no", 3, structure=label)
    return _Conv("cxr/trigger_vqa", "CR", "CXR", messages, [png(cxr(rng, cardiomegaly=preds["cardiomegaly"]))], preds, meta)


def _cxr_inline(r: random.Random, rng: np.random.Generator) -> _Conv:
    preds = _predictions(r)
    listing = ", ".join(f"{k}: {'yes' if v else 'no'}" for k, v in preds.items())
    hint = ("When answering the question, please analyze the image and incorporate the additional results "
            f"generated by an expert classification model: {listing}")
    positives = [k for k, v in preds.items() if v]
    if positives and r.random() < 0.5:
        answer = r.choice(positives)
        options = sorted({answer, *r.sample([k for k in CXR_LABELS if not preds[k]], k=min(3, len(CXR_LABELS) - len(positives)))})
        question = f"Which of the following findings is present? Options: {', '.join(options)}."
        reply = answer
        kind = {"question_kind": "multiple_choice", "answer": "ABCD"[options.index(answer)], "options": options, "label": answer}
    else:
        label = r.choice(CXR_LABELS)
        question, reply = f"Is there {label}?", ("Yes." if preds[label] else "No.")
        kind = {"question_kind": "yes_no", "answer": reply.lower().rstrip(".")}
    messages = [
        _turn("user", _text(MODEL_CARD), _IMAGE, _text(f"{question} {hint}")),
        _turn("assistant", _text(reply)),
    ]
    meta = {**_meta(messages, "cxr/inline_hints", [], "", question, None, 1), **kind, "answer_from": "expert", "hint_agrees": True}
    return _Conv("cxr/inline_hints", "CR", None, messages, [png(cxr(rng, cardiomegaly=preds["cardiomegaly"]))], preds, meta)


KINDS = [(_vista3d_trigger, 5), (_vista3d_direct, 2), (_brats, 2), (_cxr_trigger, 2), (_cxr_inline, 2)]


def _split(patient: str, val: float = 0.1, test: float = 0.15) -> str:
    u = int(hashlib.sha256(patient.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if u < test else "val" if u < test + val else "train"


def make_rows(conversations: int, *, seed: int = 0, meta: bool = True) -> list[dict[str, Any]]:
    """`conversations` rows in SCHEMA's shape, kinds mixed by weight, two per patient
    (`meta=False`: rows without `meta`, as shards written before it)."""
    r, rng = random.Random(seed), np.random.default_rng(seed)
    makers = [m for m, w in KINDS for _ in range(w)]
    rows = []
    for i in range(conversations):
        conv = r.choice(makers)(r, rng)
        patient = hashlib.sha256(f"{seed}:patient:{i // 2}".encode()).hexdigest()[:16]
        item = hashlib.sha256(f"{seed}:item:{i}".encode()).hexdigest()[:16]
        rows.append({
            "id": row_id(item, conv.task, 0),
            "dataset": "factory",
            "source": {"CT": "ct", "MR": "brain", "CR": "cxr"}[conv.modality],
            "task": conv.task,
            "split": _split(patient),
            "item_id": item,
            "patient_key": patient,
            "modality": conv.modality,
            "expert": conv.expert,
            "images": [{"bytes": b, "path": f"{item}/{k}.png"} for k, b in enumerate(conv.images)],
            "messages": conv.messages,
            "findings": json.dumps(conv.findings, sort_keys=True),
            "meta": json.dumps(conv.meta, sort_keys=True) if meta else None,
            "provenance": {"expert_fingerprint": "factory", "template_hash": "factory", "manifest_hash": "factory", "code_version": "test"},
        })
    return rows


def write_shards(out: Path, *, conversations: int = 60, seed: int = 0, rows_per_shard: int = 40, row_group_size: int = 16,
                 meta: bool = True) -> Path:
    """Write `out/dataset/data/<split>/part-NNNNN.parquet` and return `out` (`meta=False`: in
    ROW_SCHEMA without the `meta` column, as shards written before it)."""
    rows = make_rows(conversations, seed=seed, meta=meta)
    schema = SCHEMA if meta else SCHEMA.remove(SCHEMA.get_field_index("meta"))
    for split in ("train", "val", "test"):
        part = [row for row in rows if row["split"] == split]
        folder = out / "dataset" / "data" / split
        folder.mkdir(parents=True, exist_ok=True)
        for n, start in enumerate(range(0, len(part), rows_per_shard)):
            table = pa.Table.from_pylist(part[start : start + rows_per_shard], schema=schema)
            pq.write_table(table, folder / f"part-{n:05d}.parquet", row_group_size=row_group_size)
    return out
