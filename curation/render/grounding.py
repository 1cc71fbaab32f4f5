"""The grounding check: a conversation is true to what the model sees, or it is not written.

One function, `problems(...)`, over plain data (the row's `messages`, its images' digests, its
`meta` and its `findings` JSON), so the renderer runs it on every conversation it makes and
`m3-curate audit` runs the very same check on shards already written. It checks:

- images: one picture per `image` slot, each the picture `meta.images` says it is (digest,
  slice, the structures on it), in the turn it says;
- calls: each assistant turn makes exactly the call `meta.calls` gives it (or none); a turn
  that calls an expert and ends the conversation says "segmented", one that waits for the
  result does not (VILA-M3's agent treats an answer carrying a call as final only when it
  contains "segmented");
- legends: a colour a user turn names is drawn on the picture that turn shows, and a legend
  the template states names exactly the picture's drawn structures, in drawing order;
- facts: each fact an answer states is shown in a picture placed before it (the structure is on
  it; for a colour, drawn in that colour; for an absence, not on it) or given by the text of an
  earlier turn;
- numbers: every number an assistant turn writes appears in an earlier turn (a volume cannot
  be read off a slice; it has to be given);
- the answer: the answer turn states `meta.answer`, and `meta.answer` is what its source says
  (the truth, the expert's findings, or the measurement given).

Every problem has a category (`CATEGORIES`), counted by the build's ledger and card and by
`m3-curate audit`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from curation.imaging import COLOURS
from curation.render.filters import label_text, ml_text

CATEGORIES = (
    "images do not match their slots",
    "call not as expected",
    "agent protocol",
    "legend not on picture",
    "fact not shown",
    "fact not given",
    "number not given",
    "answer not stated",
    "answer contradicts its source",
)
COLOUR_NAMES = tuple(name for name, _ in COLOURS)
CALL = re.compile(r"<([A-Za-z][A-Za-z0-9_]*)\(([^()<>]*)\)>")
NUMBER = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)*")
DIGIT = re.compile(r"\d")
UNIT = re.compile(r"\s*(?:mL|ml|cc|mm|cm|%|HU)\b")
LEGEND = re.compile(r"\b(" + "|".join(COLOUR_NAMES) + r"):")
YES_NO = ("yes", "no")


@dataclass(frozen=True, slots=True)
class Problem:
    category: str
    detail: str
    turn: int | None = None

    def reason(self) -> str:
        return f"ungrounded ({self.category}): {self.detail}"


def text_of(message: dict[str, Any]) -> str:
    return "".join(p.get("text") or "" for p in message["content"] if p["type"] == "text")


def problems(messages: list[dict[str, Any]], digests: list[str], meta: dict[str, Any], findings: dict[str, Any] | None,
             texts: list[str] | None = None) -> list[Problem]:
    """Everything in this conversation that is not grounded (empty: it may be written).
    `texts`: each message's text, when the caller has them already."""
    texts = [text_of(m) for m in messages] if texts is None else texts
    found: list[Problem] = []
    found += _images(messages, digests, meta, findings)
    found += _calls(messages, texts, meta)
    colours = {s["name"]: s.get("colour") for s in (findings or {}).get("structures", [])}
    source = _source(meta, findings)
    found += _legends(messages, texts, meta, colours)
    found += _facts(messages, texts, meta, colours, (source or {}).get("classes", {}))
    found += _numbers(messages, texts, meta)
    found += _answer(messages, texts, meta, source)
    return found


# --- images ----------------------------------------------------------------------------------


def _image_turns(messages: list[dict[str, Any]]) -> list[int]:
    return [t for t, m in enumerate(messages) for p in m["content"] if p["type"] == "image"]


def _images(messages: list[dict[str, Any]], digests: list[str], meta: dict[str, Any], findings: dict[str, Any] | None) -> list[Problem]:
    bad = "images do not match their slots"
    turns = _image_turns(messages)
    pictures = meta.get("images") or []
    if not len(turns) == len(digests) == len(pictures):
        return [Problem(bad, f"{len(turns)} image slots, {len(digests)} images, {len(pictures)} described in meta")]
    out = []
    known = (findings or {}).get("images") or []
    for i, (turn, digest, picture) in enumerate(zip(turns, digests, pictures)):
        if picture.get("digest") != digest or picture.get("turn") != turn:
            out.append(Problem(bad, f"image {i} is not the picture meta describes (digest or turn differ)", turn))
            continue
        index = picture.get("index")
        if findings is not None and index is not None:
            if not 0 <= index < len(known):
                out.append(Problem(bad, f"image {i} names picture {index} of the findings, which have {len(known)}", turn))
                continue
            source = known[index]
            same = (source.get("digest"), source.get("slice"), source.get("labels"), source.get("truth"))
            if same != (digest, picture.get("slice"), picture.get("labels"), picture.get("truth")):
                out.append(Problem(bad, f"image {i} is not picture {index} of the findings (its pixels or what it shows differ)", turn))
    return out


def _shown_before(meta: dict[str, Any], image: Any, turn: int, *, same_turn: bool) -> dict[str, Any] | None:
    pictures = meta.get("images") or []
    if not isinstance(image, int) or not 0 <= image < len(pictures):
        return None
    picture = pictures[image]
    placed = picture.get("turn", turn + 1)
    return picture if placed < turn or (same_turn and placed == turn) else None


# --- calls -----------------------------------------------------------------------------------


def _calls(messages: list[dict[str, Any]], texts: list[str], meta: dict[str, Any]) -> list[Problem]:
    out = []
    assistant = [t for t, m in enumerate(messages) if m["role"] == "assistant"]
    expected = meta.get("calls")
    if not isinstance(expected, list) or len(expected) != len(assistant):
        return [Problem("call not as expected", f"meta.calls has {len(expected) if isinstance(expected, list) else 'no'} entries "
                                                 f"for {len(assistant)} assistant turns")]
    for k, turn in enumerate(assistant):
        made = [m.group(0) for m in CALL.finditer(texts[turn])]
        if len(made) > 1:
            out.append(Problem("call not as expected", f"turn {turn} makes {len(made)} calls: {made}", turn))
        if (made[0] if made else None) != expected[k]:
            out.append(Problem("call not as expected", f"turn {turn} calls {made[0] if made else 'nothing'}, meta says {expected[k]}", turn))
            continue
        if made:
            final = turn == len(messages) - 1
            says = "segmented" in texts[turn]
            if final and not says:
                out.append(Problem("agent protocol", f"turn {turn} ends the conversation with a call but does not say 'segmented' "
                                                     "(VILA-M3's agent would wait for a result that never comes)", turn))
            if not final and says:
                out.append(Problem("agent protocol", f"turn {turn} calls and waits for the result but says 'segmented' "
                                                     "(VILA-M3's agent would take it as the final answer)", turn))
    return out


# --- legends ---------------------------------------------------------------------------------


def drawn_entries(picture: dict[str, Any], colours: dict[str, str | None]) -> list[list[str]]:
    """[[colour, names], …] of the structures drawn on a picture, in drawing order; one colour
    naming several structures lists them together."""
    out: list[list[str]] = []
    at: dict[str, int] = {}
    for name in picture.get("labels") or []:
        colour = colours.get(name)
        if not colour:
            continue
        if colour in at:
            out[at[colour]][1] += f", {name}"
        else:
            at[colour] = len(out)
            out.append([colour, name])
    return out


def _legends(messages: list[dict[str, Any]], texts: list[str], meta: dict[str, Any], colours: dict[str, str | None]) -> list[Problem]:
    bad = "legend not on picture"
    out = []
    pictures = meta.get("images") or []
    for entry in meta.get("legends") or []:
        turn = entry.get("turn")
        picture = _shown_before(meta, entry.get("image"), turn if isinstance(turn, int) else -1, same_turn=True)
        if picture is None or messages[turn]["role"] != "user":
            out.append(Problem(bad, f"legend of turn {turn} names image {entry.get('image')}, which is not shown by then", turn))
            continue
        want = drawn_entries(picture, colours)
        if [list(e) for e in entry.get("entries", [])] != want:
            out.append(Problem(bad, f"turn {turn} names {entry.get('entries')}, image {entry.get('image')} shows {want}", turn))
    for turn, text in enumerate(texts):  # colours named in any user turn, whoever wrote them
        if messages[turn]["role"] != "user" or "describe" not in text:
            continue
        named = LEGEND.findall(text[text.index("describe"):])
        shown = [p for p in pictures if p.get("turn", turn + 1) <= turn]
        if named and not shown:
            out.append(Problem(bad, f"turn {turn} names colours {named} but no picture is shown by then", turn))
        elif named:
            drawn = {c for c, _ in drawn_entries(shown[-1], colours)}
            missing = [c for c in named if c not in drawn]
            if missing:
                out.append(Problem(bad, f"turn {turn} names {', '.join(missing)}, which the picture it shows does not have", turn))
    return out


# --- facts and numbers -----------------------------------------------------------------------


def _facts(messages: list[dict[str, Any]], texts: list[str], meta: dict[str, Any], colours: dict[str, str | None],
           classes: dict[str, bool]) -> list[Problem]:
    out = []
    for fact in meta.get("facts") or []:
        turn, shown, given = fact.get("turn"), fact.get("shown"), fact.get("given")
        if not isinstance(turn, int) or not 0 <= turn < len(messages) or messages[turn]["role"] != "assistant":
            out.append(Problem("fact not shown", f"fact {fact.get('text')!r} is not in an assistant turn", turn))
            continue
        if given:
            k, value = given.get("turn"), given.get("text")
            values = value if isinstance(value, list) else [value] if value else []
            if not isinstance(k, int) or not 0 <= k < turn or any(v not in texts[k] for v in values):
                out.append(Problem("fact not given", f"fact {fact.get('text')!r} of turn {turn}: {value!r} is not in an earlier turn", turn))
            continue
        if not shown:
            out.append(Problem("fact not shown", f"fact {fact.get('text')!r} of turn {turn} is neither shown nor given", turn))
            continue
        picture = _shown_before(meta, shown.get("image"), turn, same_turn=False)
        if picture is None:
            out.append(Problem("fact not shown", f"fact {fact.get('text')!r}: image {shown.get('image')} is not shown before turn {turn}", turn))
            continue
        label, colour = shown.get("label"), shown.get("colour")
        if colour is not None:  # a statement about the drawing: the structure drawn in that colour
            if label not in (picture.get("labels") or []) or colours.get(label) != colour:
                out.append(Problem("fact not shown", f"fact {fact.get('text')!r}: {label} is not drawn in {colour} on image {shown.get('image')}", turn))
            continue
        # a statement about the patient: what is on the slice (the reference's when there is one)
        on = picture.get("truth") if picture.get("truth") is not None else picture.get("labels") or []
        if label is not None and label not in on and label_text(label) in classes:  # a class of the whole image
            on = [label] if classes[label_text(label)] else []
        if label is not None and bool(shown.get("absent")) == (label in on):
            how = "shows" if shown.get("absent") else "does not show"
            out.append(Problem("fact not shown", f"fact {fact.get('text')!r}: image {shown.get('image')} {how} {label}", turn))
    return out


def _numbers(messages: list[dict[str, Any]], texts: list[str], meta: dict[str, Any]) -> list[Problem]:
    """Numbers an assistant turn writes must appear in an earlier turn. The one exception: a
    count without a unit inside a fact shown in a picture (a reference answer such as a VQA
    record's "2"); a measurement (a number with a unit) always needs the turn that gives it."""
    out = []
    for turn, text in enumerate(texts):
        if messages[turn]["role"] != "assistant" or not DIGIT.search(text):
            continue
        stripped = CALL.sub(" ", text) if "<" in text else text
        earlier = "\n".join(texts[:turn])
        for m in NUMBER.finditer(stripped):
            number = m.group()
            if number in earlier and re.search(rf"(?<![\w.]){re.escape(number)}(?![\d]|\.\d)", earlier):
                continue
            shown = [f.get("text") or "" for f in meta.get("facts") or [] if f.get("turn") == turn and f.get("shown") and not f.get("given")]
            if not UNIT.match(stripped, m.end()) and any(number in t for t in shown):
                continue
            out.append(Problem("number not given", f"turn {turn} states {number}, which no earlier turn gives", turn))
    return out


# --- the answer ------------------------------------------------------------------------------


def _stated(kind: str, answer: Any, text: str) -> bool:
    said = text.strip().lower()
    if isinstance(answer, str) and answer.lower() in YES_NO and kind in ("presence", "yes_no", "closed"):
        return said.startswith(answer.lower())
    if kind == "multiple_choice":
        return f"{answer})" in text
    if kind == "count":
        return re.search(rf"(?<!\d){int(answer)}(?!\d)", text) is not None
    if kind == "findings_list":
        return all(label_text(a) in said for a in answer)
    return label_text(str(answer)).strip() in label_text(text)


def _source(meta: dict[str, Any], findings: dict[str, Any] | None) -> dict[str, Any] | None:
    """The structures and classes the answer's source holds: {names present, sides, volumes, counts}."""
    source = meta.get("answer_from")
    if source == "truth":
        item = meta.get("truth") or {}
        truth = (findings or {}).get("truth") or {}
        classes = {label_text(k): bool(v) for k, v in (item.get("classes") or {}).items()}
        classes |= {label_text(c["name"]): bool(c["present"]) for c in truth.get("classes", [])}
        structures = truth.get("structures", [])
    elif source in ("expert", "findings") and findings is not None:
        classes = {label_text(c["name"]): bool(c["present"]) for c in findings.get("classes", [])}
        structures = findings.get("structures", [])
    else:
        return None
    return {"classes": classes, "structures": {s["name"]: s for s in structures}}


def _expected(meta: dict[str, Any], source: dict[str, Any]) -> Any:
    """What the source says the answer is; `...` where the check cannot tell."""
    kind = meta.get("question_kind")
    subject = meta.get("structure") or meta.get("label")
    structures, classes = source["structures"], source["classes"]
    if kind in ("presence", "yes_no") and subject:
        if label_text(subject) in classes:
            return "yes" if classes[label_text(subject)] else "no"
        return "yes" if subject in structures else "no"
    if kind == "multiple_choice":
        options, label = meta.get("options") or [], meta.get("label")
        present = {k for k, v in classes.items() if v}
        right = [o for o in options if label_text(o) in present] or [o for o in options if o == "no finding" and not present]
        return "ABCDEFGH"[options.index(right[0])] if len(right) == 1 and right[0] == label else None
    if kind == "findings_list":
        return sorted(k for k, v in classes.items() if v)
    if kind == "side" and subject in structures:
        return structures[subject]["side"]
    if kind in ("volume", "size") and subject in structures:
        return ml_text(structures[subject]["volume_ml"])
    if kind == "count" and subject in structures:
        return structures[subject]["components"]
    if kind == "larger":
        pair = [structures.get(n) for n in meta.get("structures") or []]
        if len(pair) == 2 and all(pair) and pair[0]["volume_ml"] != pair[1]["volume_ml"]:
            return max(pair, key=lambda s: s["volume_ml"])["name"]
    return ...


def _answer(messages: list[dict[str, Any]], texts: list[str], meta: dict[str, Any], source: dict[str, Any] | None) -> list[Problem]:
    answer, kind, turn = meta.get("answer"), meta.get("question_kind"), meta.get("answer_turn")
    if answer is None:
        return []
    if not isinstance(turn, int) or not 0 <= turn < len(messages) or messages[turn]["role"] != "assistant":
        return [Problem("answer not stated", f"meta.answer_turn {turn} is not an assistant turn")]
    if kind != "findings_list" or answer:
        if not _stated(str(kind), answer, texts[turn]):
            return [Problem("answer not stated", f"turn {turn} does not state the answer {answer!r}", turn)]
    if source is None:
        return []
    expected = _expected(meta, source)
    if expected is ... or (kind == "findings_list" and sorted(label_text(a) for a in answer) == expected):
        return []
    if expected != answer:
        return [Problem("answer contradicts its source", f"the answer is {answer!r}; its source ({meta.get('answer_from')}) says {expected!r}", turn)]
    return []
