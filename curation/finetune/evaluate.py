"""`m3-curate eval --model DIR --data DIR [--split test]`: held-out metrics as JSON.

For each row of the split the model answers, turn by turn, with the conversation so far as
its prompt (the reference turns before it, images included), and two things are scored:

- **expert selection** (as VILA-M3 reports it): at every assistant turn whose reference text
  calls an expert, the first `<NAME(args)>` the model writes must equal the reference call
  (same expert, same argument; `<VISTA3D()>` counts as `<VISTA3D(everything)>` and
  `hepatoma` as `hepatic tumor`). Also reported: the expert name alone, per expert, and how
  often the model calls an expert at a scored turn whose reference calls none.
- **closed questions**: an assistant turn whose reference answer starts with yes/no, or picks
  one of the options the question lists ("Options: a, b, c", "(A) … (B) …", "X or Y?"):
  exact match of the yes/no word, or of the option the answer names.

Counts and accuracies are given overall, per expert and per task, with a few mismatches as
examples. Open-ended turns (reports, "how many") are not scored here.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CALL_RE = re.compile(r"<([A-Z][A-Za-z0-9_]*)\(([^()<>\n]*)\)>")
"""An expert call as the VLM writes it: `<NAME(args)>` (VILA-M3's wire format)."""

# VILA-M3: an empty VISTA3D argument means everything; hepatoma is a synonym of hepatic tumor
CALL_SYNONYMS = {("VISTA3D", ""): "everything", ("VISTA3D", "hepatoma"): "hepatic tumor"}
EVAL_COLUMNS = ["id", "task", "expert", "messages", "images"]


def parse_calls(text: str) -> list[tuple[str, str]]:
    """The expert calls in `text`, in order, as normalised (name, argument) pairs.

    >>> parse_calls("Let me trigger <VISTA3D( Hepatoma )> and <CXR()>.")
    [('VISTA3D', 'hepatic tumor'), ('CXR', '')]
    """
    calls = []
    for name, arg in CALL_RE.findall(text):
        arg = " ".join(arg.strip().strip("'\"").lower().split())
        calls.append((name, CALL_SYNONYMS.get((name, arg), arg)))
    return calls


def _words(text: str) -> list[str]:
    return re.sub(r"[^\w\s-]", " ", text.lower()).split()


def _norm(text: str) -> str:
    words = _words(text)
    while words and words[0] in {"the", "a", "an"}:
        words = words[1:]
    return " ".join(words)


def _mentions(text: str, option: str) -> bool:
    return f" {option} " in f" {' '.join(_words(text))} "


@dataclass(frozen=True, slots=True)
class Closed:
    """A closed question: its kind ("yes/no", "choice" or "exact"), the right answer
    (normalised), the options and, for lettered options, the right letter."""

    kind: str
    answer: str
    options: tuple[str, ...] = ()
    letter: str | None = None

    def correct(self, prediction: str) -> bool:
        words = _words(prediction)
        if self.kind == "yes/no":
            return bool(words) and words[0] == self.answer
        if self.kind == "exact":
            norm = _norm(prediction)
            return norm == self.answer or norm.startswith(self.answer + " ")
        named = {o for o in self.options if _mentions(prediction, o)}
        if named:
            return named == {self.answer}
        return self.letter is not None and bool(words) and words[0] == self.letter.lower()


_OPTIONS = re.compile(r"(?:options|choices)\s*(?:are)?\s*:\s*(.+?)(?:\.(?:\s|$)|\?|\n|$)", re.I)
_LETTERED = re.compile(r"(?:^|(?<=\s))\(?([A-E])\)\s*([^\n()]+?)\s*(?=\(?[A-E]\)|\n|$)")
_OR = re.compile(r"([^,.:;?\n]+?)\s+or\s+([^,.:;?\n]+?)\s*\?")


def options_in(question: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    r"""The options a question lists, normalised, and their letters (empty when unlettered).

    >>> options_in("Which finding is present? Options: edema, nodule, mass.")
    (('edema', 'nodule', 'mass'), ())
    >>> options_in("Which one is visible?\nA) edema\nB) no finding\nWhen answering, use: x, y")
    (('edema', 'no finding'), ('A', 'B'))
    >>> options_in("Which is larger, the liver or the spleen?")[0]
    ('liver', 'spleen')
    """
    if lettered := _LETTERED.findall(question):
        return tuple(_norm(text) for _, text in lettered), tuple(letter for letter, _ in lettered)
    if m := _OPTIONS.search(question):
        parts = re.split(r",|;|/|\bor\b", m.group(1))
        return tuple(o for o in (_norm(p) for p in parts) if o), ()
    if m := _OR.search(question):
        second = _norm(m.group(2))
        first = _norm(" ".join(m.group(1).split()[-len(m.group(2).split()) :]))
        if first and second and first != second:
            return (first, second), ()
    if any(re.search(r"\b(left|right|side)\b", q, re.I) for q in re.findall(r"[^.?!\n]*\?", question)):
        return ("left", "right"), ()
    return (), ()


def closed_question(question: str, answer: str) -> Closed | None:
    r"""The closed question a (question, reference answer) pair is, if any.

    >>> closed_question("Is there a tumor in the liver?", "Yes.")
    Closed(kind='yes/no', answer='yes', options=(), letter=None)
    >>> closed_question("On which side is the spleen?", "It is on the patient's left.").answer
    'left'
    >>> closed_question("Which is seen?\nA) no finding\nB) edema", "A) no finding").letter
    'A'
    """
    words = _words(answer)
    if words and words[0] in {"yes", "no"}:
        return Closed("yes/no", words[0])
    options, letters = options_in(question)
    named = [i for i, o in enumerate(options) if _mentions(answer, o)]
    if len(named) == 1:
        return Closed("choice", options[named[0]], options, letters[named[0]] if letters else None)
    return None


def closed_from_meta(meta: dict[str, Any]) -> Closed | None:
    """The closed question a rendered conversation's `meta` declares (the renderer's
    `question_kind`, `answer`, `options`, `label`, `structures`), if it declares one."""
    kind, answer = meta.get("question_kind"), meta.get("answer")
    if not isinstance(answer, str):
        return None
    if kind in {"yes_no", "presence"} and answer.lower() in {"yes", "no"}:
        return Closed("yes/no", answer.lower())
    if kind == "multiple_choice" and isinstance(meta.get("options"), list):
        options = tuple(_norm(str(o)) for o in meta["options"])
        label = _norm(str(meta.get("label", "")))
        letter = answer.strip().rstrip(")").upper()
        return Closed("choice", label, options, letter if len(letter) == 1 else None) if label in options else None
    if kind == "larger" and isinstance(meta.get("structures"), list):
        return Closed("choice", _norm(answer), tuple(_norm(str(o)) for o in meta["structures"]))
    if kind == "side":
        return Closed("choice", _norm(answer), ("left", "right"))
    if kind == "closed":
        return Closed("yes/no", _words(answer)[0]) if _words(answer)[:1] in (["yes"], ["no"]) else Closed("exact", _norm(answer))
    return None


def _text_of(message: dict[str, Any]) -> str:
    return " ".join(p.get("text") or "" for p in message["content"] if p.get("type") == "text")


def _meta(row: dict[str, Any]) -> dict[str, Any] | None:
    meta = row.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return None
    return meta if isinstance(meta, dict) else None


@dataclass(frozen=True, slots=True)
class Target:
    """One assistant turn to generate and score."""

    turn: int
    reference: str
    call: tuple[str, str] | None
    closed: Closed | None


def targets(row: dict[str, Any]) -> list[Target]:
    """The assistant turns of a row that call an expert or answer a closed question.

    Closed questions come from the row's `meta` column when the shards have one (the
    renderer's declaration of the question: exact), else from the text (yes/no answers,
    listed options, "X or Y?", left/right).
    """
    messages = row["messages"]
    meta = _meta(row)
    declared = closed_from_meta(meta) if meta else None
    declared_turn = None
    if meta and isinstance(meta.get("question"), str) and meta["question"].strip():
        asked = [i for i, m in enumerate(messages) if m["role"] == "user" and meta["question"].strip() in _text_of(m)]
        if asked and asked[-1] + 1 < len(messages):
            declared_turn = asked[-1] + 1
    out = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        text = _text_of(message)
        calls = parse_calls(text)
        if declared_turn is not None:
            closed = declared if i == declared_turn else None
        else:
            closed = closed_question(_text_of(messages[i - 1]) if i > 0 else "", text)
        if calls or closed:
            out.append(Target(i, text, calls[0] if calls else None, closed))
    return out


class _Tally:
    def __init__(self) -> None:
        self.n: dict[str, int] = defaultdict(int)

    def add(self, key: str, ok: bool) -> None:
        self.n[key] += 1
        self.n[key + "_correct"] += int(ok)

    def rate(self, key: str) -> float | None:
        return round(self.n[key + "_correct"] / self.n[key], 4) if self.n[key] else None


def _generate(model: Any, processor: Any, prompts: list[list[dict[str, Any]]], max_new_tokens: int) -> list[str]:
    import torch

    inputs = processor.apply_chat_template(
        prompts, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "left"},
    ).to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[:, inputs["input_ids"].shape[1] :]
    return [processor.decode(seq, skip_special_tokens=True).strip() for seq in new]


def evaluate(
    model: str | Path,
    data: str | Path,
    *,
    split: str = "test",
    limit: int | None = None,
    max_new_tokens: int = 48,
    batch_size: int = 8,
    cpu_threads: int | None = None,
) -> dict[str, Any]:
    """Generate on the split's rows with the model in folder `model` and score them."""
    import torch
    from transformers import AutoModelForImageTextToText

    from curation.finetune.data import iter_rows, row_to_chat, shard_files
    from curation.finetune.processors import load_processor
    from curation.finetune.machine import cpu_threads as threads

    files = shard_files(data, split)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(threads(cpu_threads))
    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    net = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(device).eval()
    processor = load_processor(model)  # without torchvision: the family's processor minus its video part

    t0 = time.monotonic()
    overall, by_expert, by_task = _Tally(), defaultdict(_Tally), defaultdict(_Tally)
    closed_kinds: dict[str, _Tally] = defaultdict(_Tally)
    mismatches: list[dict[str, Any]] = []
    rows = 0
    pending: list[tuple[dict[str, Any], Target, list[dict[str, Any]]]] = []

    def flush() -> None:
        predictions = _generate(net, processor, [p for _, _, p in pending], max_new_tokens)
        for (row, target, _), predicted in zip(pending, predictions):
            task, calls = row["task"], parse_calls(predicted)
            ok_all = True
            if target.call is not None:
                ok = bool(calls) and calls[0] == target.call
                ok_all &= ok
                overall.add("selection", ok)
                overall.add("selection_name", bool(calls) and calls[0][0] == target.call[0])
                by_expert[target.call[0]].add("selection", ok)
                by_task[task].add("selection", ok)
            else:
                overall.add("no_call_expected", not calls)
            if target.closed is not None:
                ok = target.closed.correct(predicted)
                ok_all &= ok
                overall.add("closed", ok)
                closed_kinds[target.closed.kind].add("closed", ok)
                by_task[task].add("closed", ok)
            if not ok_all and len(mismatches) < 20:
                mismatches.append({"id": row["id"], "task": task, "turn": target.turn, "expected": target.reference, "predicted": predicted})
        pending.clear()

    import pyarrow.parquet as pq

    present = set(pq.ParquetFile(files[0]).schema_arrow.names)
    columns = [c for c in (*EVAL_COLUMNS, "meta") if c in present]  # `meta`: the renderer's declaration, if written
    for row in iter_rows(files, columns=columns, limit=limit):
        rows += 1
        by_task[row["task"]].n["rows"] += 1
        found = targets(row)
        if not found:
            continue
        chat, _ = row_to_chat(row)
        for target in found:
            pending.append((row, target, chat[: target.turn]))
            if len(pending) >= batch_size:
                flush()
    if pending:
        flush()

    def block(t: _Tally, key: str) -> dict[str, Any]:
        return {"turns": t.n[key], "correct": t.n[key + "_correct"], "accuracy": t.rate(key)}

    return {
        "model": str(model),
        "data": str(data),
        "split": split,
        "rows": rows,
        "expert_selection": {
            **block(overall, "selection"),
            "expert_name_accuracy": overall.rate("selection_name"),
            "by_expert": {name: block(t, "selection") for name, t in sorted(by_expert.items())},
        },
        "unexpected_calls": {
            "turns": overall.n["no_call_expected"],
            "with_call": overall.n["no_call_expected"] - overall.n["no_call_expected_correct"],
        },
        "closed_questions": {
            "questions": overall.n["closed"],
            "correct": overall.n["closed_correct"],
            "exact_match": overall.rate("closed"),
            "by_kind": {kind: block(t, "closed") for kind, t in sorted(closed_kinds.items())},
        },
        "by_task": {
            task: {
                "rows": t.n["rows"],
                "selection_turns": t.n["selection"], "selection_accuracy": t.rate("selection"),
                "closed_questions": t.n["closed"], "closed_exact_match": t.rate("closed"),
            }
            for task, t in sorted(by_task.items())
        },
        "mismatches": mismatches,
        "seconds": round(time.monotonic() - t0, 2),
    }


def eval_command(args: argparse.Namespace) -> None:
    """`m3-curate eval`: print the metrics JSON (and write it to `--out`)."""
    from curation.errors import CurationError

    if not (Path(args.model) / "config.json").exists():
        raise CurationError(f"--model {args.model}: not a model folder (no config.json); give finetune's --out folder")
    result = evaluate(
        args.model, args.data, split=args.split, limit=args.limit,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, cpu_threads=args.cpu_threads,
    )
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
