"""The shard row: one conversation, as trainers read it.

`Conversation` is what a template renders; the pipeline adds the row's keys, split, findings
and provenance and writes `ROW_SCHEMA` Parquet. Messages follow the multimodal chat format of
transformers/TRL: `{"role": "user", "content": [{"type": "image", "text": None},
{"type": "text", "text": "…"}]}`, one `image` part per entry of `images`, in order.

The `meta` column (JSON) says what the conversation asks and where every answer comes from;
evaluation and the grounding check read it instead of guessing from text. Every row's meta has
the keys of `META_KEYS` (the README's "Rows" section shows an example):

- `kind`, `template`, `variant`, `args`: the template declaration's kind, the template, the
  variant and the expert argument of this row (`call`: the task's call, when it makes one);
- `question_kind` (one of `QUESTION_KINDS`), `question` (the user question the scored answer
  answers, or null);
- `answer`: the expected answer in normal form (`yes`/`no`; the option letter for multiple
  choice, with `options` and `label`; a structure name for `larger`; `left`/`right`; a volume
  as written; the record's answer for qa), or null when there is no closed answer;
- `answer_from`: `truth` (a label table, a qa record, a label map), `expert` (the expert's
  prediction: only where the task says `answer_from: expert`) or `findings` (read off the
  expert's result given in an earlier turn: a measurement), or null when nothing is answered;
- `answer_turn`: index into `messages` of the assistant turn that holds the answer, or null;
- `calls`: one entry per assistant turn, in order: the exact call that turn makes
  (`<VISTA3D(hepatic tumor)>`) or null;
- `facts`: every fact an answer states: `{"turn", "text", "shown": {"image", "label", "colour",
  "absent"} or null, "given": {"turn", "text"} or null}` — shown in a picture (index into the row's
  `images`) before that turn, or given by the text of an earlier turn;
- `images`: per image of the row, in order, the picture it is: `{"kind", "slice", "of",
  "labels", "truth", "digest", "turn", "index"}` (`labels`: structures on it in the expert's
  label map, the ones drawn on an overlay; `truth`: those in the reference, or null; `index`:
  which of the findings' pictures it is, so audit can compare it with them);
- `legends`: each colour legend a user turn states: `{"turn", "image", "entries": [[colour,
  names], …]}`;
- `prompt`: `{"card": the model card opens the first user turn, "results": the first user
  turn already gives the expert's results (inline hints)}` — with the image and the question,
  what decides whether the row calls an expert.

Optional keys: `options`, `label`, `structure`, `structures`, `hint_agrees` (the expert's hint
or result agrees with the truth), `truth` (the item-level truth an answer was taken from, e.g.
a labels table row), `count`, `follow_up`, `group`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = 2

QUESTION_KINDS = ("presence", "yes_no", "multiple_choice", "findings_list", "size", "volume", "larger", "side", "count",
                  "describe", "expert_selection", "modality", "closed", "open")
ANSWER_FROM = ("truth", "expert", "findings")
META_KEYS = ("kind", "template", "variant", "args", "question_kind", "question", "answer", "answer_from", "answer_turn",
             "calls", "facts", "images", "legends", "prompt")

PART = pa.struct([("type", pa.string()), ("text", pa.string())])
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.list_(PART))])
IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
PROVENANCE = pa.struct(
    [
        ("expert_fingerprint", pa.string()),
        ("template_hash", pa.string()),
        ("manifest_hash", pa.string()),
        ("code_version", pa.string()),
    ]
)

ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("source", pa.string()),
        ("task", pa.string()),
        ("split", pa.string()),
        ("item_id", pa.string()),
        ("patient_key", pa.string()),
        ("modality", pa.string()),
        ("expert", pa.string()),
        ("images", pa.list_(IMAGE)),
        ("messages", pa.list_(MESSAGE)),
        ("findings", pa.string()),
        ("meta", pa.string()),
        ("provenance", PROVENANCE),
    ]
)


def column_problems(schema: pa.Schema, columns: Sequence[str]) -> list[str]:
    """How a Parquet schema fails to give `columns` as `ROW_SCHEMA` does (none: it reads as our
    rows). A reader sees Python values, so the large and view forms of strings, binaries and
    lists, dictionary encoding and extra struct fields are the same to it; a column missing, or
    of another shape (`images` as a list of paths, as LLaVA's JSON turned to Parquet has it),
    is not."""
    problems = []
    for name in columns:
        expected = ROW_SCHEMA.field(name).type
        if schema.get_field_index(name) < 0:
            problems.append(f"no {name} column")
        elif not _reads_as(schema.field(name).type, expected):
            problems.append(f"{name} is {_shape(schema.field(name).type)}, not {_shape(expected)}")
    return problems


def _shape(t: pa.DataType) -> str:
    """A type as `list<struct<bytes: binary>>`: without the names Parquet gives list items."""
    if pa.types.is_struct(t):
        return f"struct<{', '.join(f'{f.name}: {_shape(f.type)}' for f in t)}>"
    if hasattr(t, "value_type") and not pa.types.is_dictionary(t):
        return f"{'large_' if pa.types.is_large_list(t) else ''}list<{_shape(t.value_type)}>"
    return str(t)


def _reads_as(actual: pa.DataType, expected: pa.DataType) -> bool:
    if pa.types.is_dictionary(actual):
        actual = actual.value_type
    if pa.types.is_null(actual):
        return True  # every value null: a nullable column of any type
    if pa.types.is_struct(expected):
        return pa.types.is_struct(actual) and all(
            actual.get_field_index(f.name) >= 0 and _reads_as(actual.field(f.name).type, f.type) for f in expected)
    if pa.types.is_list(expected):
        lists = (pa.types.is_list, pa.types.is_large_list, pa.types.is_list_view, pa.types.is_large_list_view)
        return any(is_list(actual) for is_list in lists) and _reads_as(actual.value_type, expected.value_type)
    plain = {pa.large_string(): pa.string(), pa.string_view(): pa.string(), pa.large_binary(): pa.binary(),
             pa.binary_view(): pa.binary()}
    return plain.get(actual, actual) == expected


@dataclass(slots=True)
class Conversation:
    """What one template made for one (item, task, variant)."""

    messages: list[dict[str, Any]]
    images: list[bytes]
    template: str
    template_hash: str
    variant: int = 0
    expert: str | None = None  # the expert this conversation calls, if any
    meta: dict[str, Any] = field(default_factory=dict)  # the `meta` column (see the module docstring)

    def image_parts(self) -> int:
        return sum(1 for m in self.messages for p in m["content"] if p["type"] == "image")


def row_id(item_id: str, task: str, variant: int) -> str:
    """Stable: the same item, task and variant give the same id on every build."""
    return hashlib.sha256(f"{item_id}\x1f{task}\x1f{variant}".encode()).hexdigest()[:20]


def meta_counts(metas: list[str | None]) -> dict[str, Any]:
    """What the dataset card counts of rows' `meta` (JSON strings): rows per `answer_from`, and
    rows whose expert hint or result disagrees with the truth they are answered from.

    >>> meta_counts(['{"answer_from": "truth", "hint_agrees": false}', '{"answer_from": "findings"}', None])
    {'answer_from': {'findings': 1, 'truth': 1}, 'hint_disagrees': 1}
    """
    import json

    sources: dict[str, int] = {}
    disagree = 0
    for text in metas:
        if not text:
            continue
        meta = json.loads(text)
        source = meta.get("answer_from")
        if source:
            sources[source] = sources.get(source, 0) + 1
        disagree += meta.get("hint_agrees") is False
    return {"answer_from": dict(sorted(sources.items())), "hint_disagrees": disagree}


def grounding_category(reason: str) -> str | None:
    """The grounding check's category in a set-aside reason (`…: ungrounded (legend not on
    picture): …`), or None for other reasons.

    >>> grounding_category("template t.j2, line 9: ungrounded (number not given): '2' in turn 3")
    'number not given'
    """
    start = reason.find("ungrounded (")
    if start < 0:
        return None
    end = reason.find(")", start)
    return reason[start + len("ungrounded ("):end] if end > 0 else None
