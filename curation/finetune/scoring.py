"""What `m3-curate eval` scores, without a model: every assistant turn's decision to call an
expert (or not), and closed answers.

For every assistant turn of a row, `expectations` says what the turn must do:

- **from `meta`** (rows the renderer wrote with it): `meta.calls[k]` is the exact call the
  k-th assistant turn must make, or null where it must call nothing; the closed question
  `meta` declares (`question_kind`, `answer`, `options`, `label`) is scored at
  `meta.answer_turn` only.
- **from the text** (rows without a usable `meta`, e.g. shards written before it existed):
  the first call in the reference turn is the expected one, and a closed question is guessed
  from the turn's answer and the question before it (`closed.closed_question`). The report
  says how many rows were scored this way and why.

`TurnScorer.add(row, turn, prediction)` compares the first `<NAME(args)>` of a prediction with
the expected call, both normalised (`<VISTA3D()>` is `<VISTA3D(everything)>`, `hepatoma` is
`hepatic tumor`), and `report()` gives: expert-selection accuracy (VILA-M3's measure: the
turns that must call, called exactly right) overall and per expert, expert-name accuracy, the
false-call rate (turns that must not call, where the model called), the missed-call rate,
the accuracy of all decisions, closed-question exact match, and per task the same with a
confusion table of expected against predicted calls.
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

from curation.expert_args import canonical_arg
from curation.finetune.closed import Closed, closed_from_meta, closed_question

CALL_RE = re.compile(r"<([A-Z][A-Za-z0-9_]*)\(([^()<>\n]*)\)>")
"""An expert call as the VLM writes it: `<NAME(args)>` (VILA-M3's wire format)."""

# VILA-M3: an empty VISTA3D argument means everything; hepatoma is a synonym of hepatic tumor
CALL_SYNONYMS = {("VISTA3D", ""): "everything", ("VISTA3D", "hepatoma"): "hepatic tumor"}
NONE = "none"
"""The confusion tables' name for "no call"."""
MISMATCH_EXAMPLES = 20

Call = tuple[str, str]


def parse_calls(text: str) -> list[Call]:
    """The expert calls in `text`, in order, as normalised (name, argument) pairs.

    >>> parse_calls("Let me trigger <VISTA3D( Hepatoma )> and <CXR()>.")
    [('VISTA3D', 'hepatic tumor'), ('CXR', '')]
    """
    calls = []
    for name, arg in CALL_RE.findall(text):
        arg = canonical_arg(arg)
        calls.append((name, CALL_SYNONYMS.get((name, arg), arg)))
    return calls


def first_call(text: str) -> Call | None:
    """The call a turn makes: the first one it writes, if any."""
    calls = parse_calls(text)
    return calls[0] if calls else None


def call_label(call: Call | None) -> str:
    """A call as the confusion tables name it.

    >>> call_label(("VISTA3D", "hepatic tumor")), call_label(("CXR", "")), call_label(None)
    ('VISTA3D(hepatic tumor)', 'CXR()', 'none')
    """
    return NONE if call is None else f"{call[0]}({call[1]})"


def text_of(message: dict[str, Any]) -> str:
    return " ".join(p.get("text") or "" for p in message["content"] if p.get("type") == "text")


@dataclass(frozen=True, slots=True)
class Expected:
    """What one assistant turn (`turn`: its index in `messages`) must do: call `call` or
    nothing, and answer `closed` right where it is set. `basis` is "meta" or "text"."""

    turn: int
    call: Call | None
    closed: Closed | None
    reference: str
    basis: str


def row_meta(row: dict[str, Any]) -> dict[str, Any] | None:
    """The row's `meta` as a mapping (the column holds JSON text), if it has one."""
    meta = row.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except ValueError:
            return None
    return meta if isinstance(meta, dict) else None


def expectations(row: dict[str, Any]) -> tuple[list[Expected], str | None]:
    """Every assistant turn's expectation, and why the text was read instead of `meta` (None
    when `meta` was used)."""
    messages = row["messages"]
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    meta = row_meta(row)
    if meta is None:
        why = "no meta" if row.get("meta") is None else "meta is not a JSON object"
    else:
        why = _unusable(meta, assistant)
    if meta is not None and why is None:
        closed = closed_from_meta(meta)
        return [
            Expected(i, first_call(c) if c else None, closed if i == meta.get("answer_turn") else None, text_of(messages[i]), "meta")
            for i, c in zip(assistant, meta["calls"])
        ], None
    return [
        Expected(i, first_call(text_of(messages[i])), closed_question(text_of(messages[i - 1]) if i else "", text_of(messages[i])),
                 text_of(messages[i]), "text")
        for i in assistant
    ], why


def _unusable(meta: dict[str, Any], assistant: list[int]) -> str | None:
    """Why `meta` cannot say what each assistant turn must do (None when it can)."""
    calls = meta.get("calls")
    if not isinstance(calls, list):
        return "meta without calls"
    if len(calls) != len(assistant):
        return "meta.calls does not match the assistant turns"
    if any(c is not None and not (isinstance(c, str) and parse_calls(c)) for c in calls):
        return "meta.calls holds something other than a call or null"
    turn = meta.get("answer_turn")
    if turn is not None and turn not in assistant:
        return "meta.answer_turn is not an assistant turn"
    return None


class TurnCounts:
    """Per measure: how many turns were scored on it and how many of them hit (were right,
    or, for `false_call` and `missed_call`, made that mistake)."""

    def __init__(self) -> None:
        self.turns: Counter[str] = Counter()
        self.hits: Counter[str] = Counter()

    def add(self, measure: str, hit: bool) -> None:
        self.turns[measure] += 1
        self.hits[measure] += int(hit)

    def rate(self, measure: str) -> float | None:
        return round(self.hits[measure] / self.turns[measure], 4) if self.turns[measure] else None

    def block(self, measure: str, hits: str = "correct", rate: str = "accuracy") -> dict[str, Any]:
        return {"turns": self.turns[measure], hits: self.hits[measure], rate: self.rate(measure)}


class TurnScorer:
    """Scores predictions turn by turn: `add(row, turn, prediction)` for every assistant turn
    generated, the turns of a row one after another (as `evaluate.generate_turns` yields
    them), then `report()`. Pure: no model, no files."""

    def __init__(self) -> None:
        self.overall = TurnCounts()
        self.by_expert: dict[str, TurnCounts] = defaultdict(TurnCounts)
        self.by_task: dict[str, TurnCounts] = defaultdict(TurnCounts)
        self.closed_kinds: dict[str, TurnCounts] = defaultdict(TurnCounts)
        self.confusion: dict[str, Counter[tuple[str, str]]] = defaultdict(Counter)
        self.rows: dict[str, Counter[str]] = defaultdict(Counter)  # task → rows per basis
        self.fallback: Counter[str] = Counter()  # why rows were read from the text
        self.mismatches: list[dict[str, Any]] = []
        self._row: tuple[str, dict[int, Expected]] | None = None

    def expected(self, row: dict[str, Any], turn: int) -> Expected:
        """The expectation of `turn` in `row` (a row's are worked out once, when first seen)."""
        if self._row is None or self._row[0] != row["id"]:
            found, why = expectations(row)
            self._row = (row["id"], {e.turn: e for e in found})
            self.rows[row["task"]]["meta" if why is None else "text"] += 1
            if why is not None:
                self.fallback[why] += 1
        if turn not in self._row[1]:
            raise ValueError(f"row {row['id']}: message {turn} is not an assistant turn")
        return self._row[1][turn]

    def add(self, row: dict[str, Any], turn: int, prediction: str) -> None:
        """Score the model's `prediction` for assistant turn `turn` (an index into `messages`)."""
        expected, predicted = self.expected(row, turn), first_call(prediction)
        task = self.by_task[row["task"]]
        ok = predicted == expected.call
        for counts in (self.overall, task):
            counts.add("decision", ok)
            if expected.call is None:
                counts.add("false_call", predicted is not None)
            else:
                counts.add("selection", ok)
                counts.add("missed_call", predicted is None)
        if expected.call is not None:
            self.overall.add("selection_name", predicted is not None and predicted[0] == expected.call[0])
            self.by_expert[expected.call[0]].add("selection", ok)
        self.confusion[row["task"]][(call_label(expected.call), call_label(predicted))] += 1
        if expected.closed is not None:
            right = expected.closed.correct(prediction)
            ok &= right
            for counts in (self.overall, task, self.closed_kinds[expected.closed.kind]):
                counts.add("closed", right)
        if not ok and len(self.mismatches) < MISMATCH_EXAMPLES:
            self.mismatches.append({"id": row["id"], "task": row["task"], "turn": turn, "basis": expected.basis,
                                    "expected_call": call_label(expected.call), "expected": expected.reference,
                                    "predicted": prediction})

    def report(self) -> dict[str, Any]:
        """The metrics as plain data (what `m3-curate eval` prints as JSON)."""
        o = self.overall
        return {
            "rows": sum(sum(c.values()) for c in self.rows.values()),
            "basis": self._basis(),
            "decisions": o.block("decision"),
            "expert_selection": {
                **o.block("selection"),
                "expert_name_accuracy": o.rate("selection_name"),
                "by_expert": {name: t.block("selection") for name, t in sorted(self.by_expert.items())},
            },
            "false_calls": o.block("false_call", "with_call", "rate"),
            "missed_calls": o.block("missed_call", "without_call", "rate"),
            "closed_questions": {
                "questions": o.turns["closed"], "correct": o.hits["closed"], "exact_match": o.rate("closed"),
                "by_kind": {kind: t.block("closed") for kind, t in sorted(self.closed_kinds.items())},
            },
            "by_task": {task: self._task(task, t) for task, t in sorted(self.by_task.items())},
            "mismatches": self.mismatches,
        }

    def _basis(self) -> dict[str, Any]:
        rows = Counter[str]()
        for per_task in self.rows.values():
            rows.update(per_task)
        out: dict[str, Any] = {"meta": rows["meta"], "text": rows["text"]}
        if rows["text"]:
            out["text_note"] = ("rows scored from text heuristics, not meta: the call a turn must make is the one its "
                                "reference text writes, closed answers are guessed from the wording")
            out["text_reasons"] = dict(sorted(self.fallback.items()))
        return out

    def _task(self, task: str, t: TurnCounts) -> dict[str, Any]:
        table: dict[str, dict[str, int]] = defaultdict(dict)
        for (expected, predicted), n in sorted(self.confusion[task].items()):
            table[expected][predicted] = n
        return {
            "rows": sum(self.rows[task].values()), "basis": dict(sorted(self.rows[task].items())),
            "decisions": t.turns["decision"], "decision_accuracy": t.rate("decision"),
            "selection_turns": t.turns["selection"], "selection_accuracy": t.rate("selection"),
            "false_call_turns": t.turns["false_call"], "false_call_rate": t.rate("false_call"),
            "missed_call_rate": t.rate("missed_call"),
            "closed_questions": t.turns["closed"], "closed_exact_match": t.rate("closed"),
            "confusion": dict(table),
        }
