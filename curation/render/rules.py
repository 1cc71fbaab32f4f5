"""What is checked once a template has run: the shape of the conversation, its `meta` (assembled
here from what the helpers recorded), and the grounding check.

A conversation that breaks a rule raises `Fault` (a template error); one that is not grounded
raises `Ungrounded` with the first problem the check found (the build sets the item's
conversation aside with that reason; `preview` shows it on the sample).
"""

from __future__ import annotations

from typing import Any

from curation.render import grounding
from curation.render.grounding import CALL, Problem, text_of
from curation.render.templates import TemplateDeclaration
from curation.render.turns import Fault, RenderState
from curation.rows import ANSWER_FROM, QUESTION_KINDS


class Ungrounded(Fault):
    """The conversation states something it does not show or give (`problem` says what)."""

    def __init__(self, problem: Problem, line: int | None):
        super().__init__(problem.reason(), line)
        self.problem = problem


def finish(state: RenderState, declaration: TemplateDeclaration, *, card: str, callable_prefixes: tuple[str, ...],
           findings: dict[str, Any] | None) -> None:
    """The rules, the meta, the check; raises `Fault` or `Ungrounded`."""
    texts = [text_of(m) for m in state.messages]
    shape(state, declaration, card, callable_prefixes, texts)
    assemble_meta(state, declaration, card, texts)
    found = grounding.problems(state.messages, [p["digest"] for p in state.meta["images"]], state.meta, findings, texts)
    if found:
        problem = found[0]
        turn = problem.turn if problem.turn is not None else len(state.messages) - 1
        raise Ungrounded(problem, state.lines[turn] if 0 <= turn < len(state.lines) else None)


def shape(state: RenderState, d: TemplateDeclaration, card: str, callable_prefixes: tuple[str, ...], texts: list[str]) -> None:
    """Turns, slots, the model card and calls as the declaration says."""
    last = state.lines[-1] if state.lines else None
    if not state.messages:
        raise Fault("the template wrote no turns")
    if state.messages[-1]["role"] != "assistant":
        raise Fault("the conversation ends with a user turn; it must end with the assistant's answer", last)
    if len(state.images) != d.images:
        raise Fault(f"the declaration says images: {d.images}, but this conversation has {len(state.images)} image slot(s)", last)
    if d.model_card and card:
        first = state.messages[0]["content"][0]
        if first["type"] != "text" or not first["text"].startswith(card):
            raise Fault("the model card must open the first user turn ({{ model_card }} first), or declare model_card: false", state.lines[0])
    answers = "\x00".join(texts[1::2])
    task = state.subject.task
    if d.calls_expert and task.expert is not None:
        if state.call not in answers:
            raise Fault(f"declares calls_expert but no assistant turn contains {state.call} (write {{{{ expert.call }}}})", last)
    elif "<" in answers and any(call in answers for call in callable_prefixes):
        raise Fault("an assistant turn calls an expert, but the declaration says calls_expert: false", last)


def assemble_meta(state: RenderState, d: TemplateDeclaration, card: str, texts: list[str]) -> None:
    """`meta` in the contract's form (see `curation.rows`) from what the helpers recorded."""
    meta, messages = state.meta, state.messages
    assistant = [t for t, m in enumerate(messages) if m["role"] == "assistant"]
    for key in ("question_kind", "question", "answer", "answer_from"):
        meta.setdefault(key, None)
    if meta["question_kind"] is not None and meta["question_kind"] not in QUESTION_KINDS:
        raise Fault(f"meta question_kind {meta['question_kind']!r} is not one of {', '.join(QUESTION_KINDS)}")
    if meta["answer_from"] is not None and meta["answer_from"] not in ANSWER_FROM:
        raise Fault(f"meta answer_from {meta['answer_from']!r} is not one of {', '.join(ANSWER_FROM)}")
    if meta["answer"] is not None and meta["answer_from"] is None:
        raise Fault("meta(answer=…) needs where the answer comes from: call reference(), or set meta(answer_from=\"findings\") "
                    "for a measurement read off the expert's result")
    if meta["answer"] is not None and "answer_turn" not in meta:
        meta["answer_turn"] = assistant[-1]
    meta.setdefault("answer_turn", None)
    if d.calls_expert and state.subject.task.expert is not None:
        meta["call"] = state.call
    calls = []
    for t in assistant:
        made = CALL.search(texts[t])
        calls.append(made.group(0) if made else None)
    meta["calls"] = calls
    meta["images"] = [{k: p.get(k) for k in ("kind", "slice", "of", "labels", "truth", "digest", "turn", "index")} for p in state.pictures]
    meta["legends"] = [{"turn": entry["turn"], "image": state.picture_slot(entry["index"], entry["kind"], entry["turn"]),
                        "entries": entry["entries"]} for entry in state.legends]
    meta["facts"] = [_fact(state, fact, texts) for fact in state.facts]
    meta["prompt"] = {"card": bool(card) and texts[0].startswith(card), "results": 0 in state.results}


def _fact(state: RenderState, fact: dict[str, Any], texts: list[str]) -> dict[str, Any]:
    turn = fact["turn"]
    shown = fact.get("shown")
    if shown is not None:
        slot = state.picture_slot(shown["index"], shown["kind"], turn)
        shown = {"image": slot, "label": shown["label"], "colour": shown["colour"], "absent": shown["absent"]}
    given = fact.get("given")
    if given is not None:
        value = given["text"]
        values = value if isinstance(value, list) else [value]
        earlier = [k for k in range(turn) if all(v in texts[k] for v in values)]
        given = {"turn": earlier[-1] if earlier else None, "text": value}
    return {"turn": turn, "text": fact["text"], "shown": shown, "given": given}
