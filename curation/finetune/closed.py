"""Closed questions: what the right answer to a question with one right answer is, and
whether a model's answer names it.

A row's `meta` declares its question (`closed_from_meta`): yes/no, a lettered choice, which of
two structures is larger, which side, or a short exact answer from a question–answer record.
Rows without `meta` (shards written before it existed) are read from the text instead
(`closed_question`): an answer starting with yes/no, or naming one of the options the
question lists ("Options: a, b, c", "(A) … (B) …", "X or Y?", left/right).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


def words(text: str) -> list[str]:
    """Lower-case words, punctuation dropped (hyphens kept).

    >>> words("No, there's no hepatic-tumor.")
    ['no', 'there', 's', 'no', 'hepatic-tumor']
    """
    return re.sub(r"[^\w\s-]", " ", text.lower()).split()


def _norm(text: str) -> str:
    found = words(text)
    while found and found[0] in {"the", "a", "an"}:
        found = found[1:]
    return " ".join(found)


def _mentions(text: str, option: str) -> bool:
    return f" {option} " in f" {' '.join(words(text))} "


@dataclass(frozen=True, slots=True)
class Closed:
    """A closed question: its kind ("yes/no", "choice" or "exact"), the right answer
    (normalised), the options and, for lettered options, the right letter."""

    kind: str
    answer: str
    options: tuple[str, ...] = ()
    letter: str | None = None

    def correct(self, prediction: str) -> bool:
        """Yes/no: the first word; exact: the whole answer (or its start); choice: the one
        option the prediction names, else its first word as the letter."""
        said = words(prediction)
        if self.kind == "yes/no":
            return bool(said) and said[0] == self.answer
        if self.kind == "exact":
            norm = _norm(prediction)
            return norm == self.answer or norm.startswith(self.answer + " ")
        named = {o for o in self.options if _mentions(prediction, o)}
        if named:
            return named == {self.answer}
        return self.letter is not None and bool(said) and said[0] == self.letter.lower()


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
    r"""The closed question a (question, reference answer) pair is, if any (the text
    heuristics for rows without `meta`).

    >>> closed_question("Is there a tumor in the liver?", "Yes.")
    Closed(kind='yes/no', answer='yes', options=(), letter=None)
    >>> closed_question("On which side is the spleen?", "It is on the patient's left.").answer
    'left'
    >>> closed_question("Which is seen?\nA) no finding\nB) edema", "A) no finding").letter
    'A'
    """
    said = words(answer)
    if said and said[0] in {"yes", "no"}:
        return Closed("yes/no", said[0])
    options, letters = options_in(question)
    named = [i for i, o in enumerate(options) if _mentions(answer, o)]
    if len(named) == 1:
        return Closed("choice", options[named[0]], options, letters[named[0]] if letters else None)
    return None


def closed_from_meta(meta: dict[str, Any]) -> Closed | None:
    """The closed question a row's `meta` declares (`question_kind`, `answer`, `options`,
    `label`, `structures`), if it declares one.

    >>> closed_from_meta({"question_kind": "multiple_choice", "answer": "B", "options": ["mass", "edema"], "label": "edema"})
    Closed(kind='choice', answer='edema', options=('mass', 'edema'), letter='B')
    >>> closed_from_meta({"question_kind": "larger", "answer": "liver", "question": "Which is larger, the liver or the spleen?"})
    Closed(kind='choice', answer='liver', options=('liver', 'spleen'), letter=None)
    >>> closed_from_meta({"question_kind": "count", "answer": "2"}) is None
    True
    """
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
    if kind == "larger":
        if isinstance(meta.get("structures"), list):
            options = tuple(_norm(str(o)) for o in meta["structures"])
        else:
            options = options_in(str(meta.get("question") or ""))[0]
        return Closed("choice", _norm(answer), options) if _norm(answer) in options else None
    if kind == "side":
        return Closed("choice", _norm(answer), ("left", "right"))
    if kind == "closed":
        return Closed("yes/no", words(answer)[0]) if words(answer)[:1] in (["yes"], ["no"]) else Closed("exact", _norm(answer))
    return None
