"""`qa` sources: existing question–answer sets whose records carry their own Q/A.

VILA-M3 wraps public VQA sets (VQA-RAD, SLAKE, MIMIC-CXR VQA) and report sets with expert turns;
this reader brings them in as items a template can wrap. Every record becomes one 2D item
(`kind` `image2d`, so 2D experts such as `<CXR()>` run on it) with its turns in
`attrs["qa"]`: a list of `{"question", "answer", "answer_type"}` (one entry for a flat record,
one per human/assistant pair for a LLaVA conversation). Records that share an image share
its findings in the cache, since the cache is keyed by file content.

Accepted files (`file:` in the manifest):

- LLaVA-style JSON: a list of `{"id", "image", "conversations": [{"from": "human", "value":
  "<image>\\nWhat …?"}, {"from": "gpt", "value": "…"}, …]}`; the `<image>` placeholder is
  dropped from the question (the template places the image);
- a JSON list, or JSON lines (`.jsonl`), of flat records, and CSV (`.csv`), with columns
  `image`, `question`, `answer` and optionally `patient_id`, `answer_type` (VQA-RAD and SLAKE
  exports call them `image_name`/`img_name` and `answer_type`; these are recognised, and
  `columns:` maps any other spelling: `{image: picture, question: q}`).

Ledger: the file itself (when under the root) is "question–answer table"; each referenced
image is "image of N question–answer records"; an image no record names is skipped as
"not named in the question–answer file", without being opened (a file without a picture or
DICOM suffix has its first 132 bytes read, to tell DICOM from other files); a named image that
cannot be read is quarantined. Records naming a list of images or no image are left out,
counted in one warning; records naming an image that is not under the root make no item. The patient of a record is its `patient_id`, else the DICOM
PatientID of its image, else the image's stem.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from curation.errors import CurationError
from curation.ingest.base import Record, Scan
from curation.ingest.image2d import Image2DReader, ImageFacts, _stem, image_kind, relative_uri

log = logging.getLogger(__name__)

FIELDS = ("image", "question", "answer", "patient_id", "answer_type")
ALIASES: dict[str, tuple[str, ...]] = {
    "image": ("image", "image_name", "img_name", "image_path", "img", "image_id"),
    "question": ("question", "query", "q"),
    "answer": ("answer", "answers", "a", "report"),
    "patient_id": ("patient_id", "patient", "subject_id"),
    "answer_type": ("answer_type", "answer_kind"),
}
HUMAN = ("human", "user")
ASSISTANT = ("gpt", "assistant", "model")


def clean_question(text: str) -> str:
    """A question without LLaVA's image placeholder (the template places the image).

    >>> clean_question("<image>\\nIs there an effusion?")
    'Is there an effusion?'
    """
    return text.replace("<image>\n", "").replace("\n<image>", "").replace("<image>", "").strip()


def _text(value: Any) -> str:
    text = "" if value is None else str(value)
    # NUL and other C0 controls (but tab/newline) never belong in a conversation
    return "".join(ch for ch in text if ch in "\t\n" or ord(ch) >= 32).strip()


def llava_turns(conversations: Any, where: str) -> list[dict[str, Any]]:
    """Human/assistant pairs of a LLaVA `conversations` list as Q/A entries."""
    if not isinstance(conversations, list):
        raise ValueError(f"{where}: 'conversations' must be a list of {{from, value}} turns")
    turns = []
    for n, turn in enumerate(conversations):
        if not isinstance(turn, dict) or "value" not in turn:
            raise ValueError(f"{where}: conversations[{n}] needs 'from' and 'value'")
        role = str(turn.get("from", "")).lower()
        if role not in HUMAN + ASSISTANT:
            raise ValueError(f"{where}: conversations[{n}].from is {turn.get('from')!r}; use human/gpt (or user/assistant)")
        turns.append((role in HUMAN, _text(turn["value"])))
    qa = []
    for i in range(0, len(turns) - 1, 2):
        (q_human, q), (a_human, a) = turns[i], turns[i + 1]
        if not q_human or a_human:
            raise ValueError(f"{where}: turns must alternate human, assistant starting with human")
        qa.append({"question": clean_question(q), "answer": a, "answer_type": None})
    if not qa:
        raise ValueError(f"{where}: no human/assistant pair in 'conversations'")
    return qa


def read_records(path: Path, columns: dict[str, str]) -> list[dict[str, Any]]:
    """The file's records as `{"image", "patient_id", "qa", "record"}` dicts, in file order.
    `image` may be None or a list (the scanner leaves those records out)."""
    if not path.is_file():
        raise CurationError(f"question–answer file not found: {path}")
    unknown = sorted(set(columns) - set(FIELDS))
    if unknown:
        raise CurationError(f"{path}: columns: unknown name(s) {unknown}; map any of {list(FIELDS)} to the file's column names")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as f:
                rows: list[Any] = list(csv.DictReader(f))
        elif suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif suffix == ".json":
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, dict):  # {"data": [...]} or {"annotations": [...]}
                lists = [v for v in rows.values() if isinstance(v, list)]
                rows = lists[0] if len(lists) == 1 else rows
        else:
            raise CurationError(f"{path}: a question–answer file is .json (LLaVA or records), .jsonl or .csv, not {suffix or 'no extension'}")
    except (UnicodeDecodeError, json.JSONDecodeError, csv.Error) as e:
        raise CurationError(f"{path}: cannot read it as UTF-8 {suffix[1:].upper()} ({e})".replace("\n", " ")) from e
    if not isinstance(rows, list):
        raise CurationError(f"{path}: expected a list of records, got a {type(rows).__name__}")
    names = {field: ((columns[field],) if field in columns else ALIASES[field]) for field in FIELDS}
    ids = [row.get("id") if isinstance(row, dict) else None for row in rows]
    # a record is keyed by its `id` when every record has a distinct one, else by its position
    use_ids = None not in ids and len({str(i) for i in ids}) == len(ids)
    out = []
    for n, row in enumerate(rows):
        where = f"{path.name}, record {n + 1}"
        if not isinstance(row, dict):
            raise CurationError(f"{where}: expected an object with image, question and answer, got {type(row).__name__}")
        got = {field: next((row[k] for k in keys if k in row), None) for field, keys in names.items()}
        try:
            if "conversations" in row:
                qa = llava_turns(row["conversations"], where)
            else:
                if got["question"] is None or got["answer"] is None:
                    raise ValueError(
                        f"{where}: needs a question and an answer (columns tried: {', '.join(names['question'])} / "
                        f"{', '.join(names['answer'])}; set `columns:` in the manifest for other names)"
                    )
                kind = _text(got["answer_type"]).lower() or None
                qa = [{"question": clean_question(_text(got["question"])), "answer": _text(got["answer"]), "answer_type": kind}]
        except ValueError as e:
            raise CurationError(str(e)) from e
        image = got["image"]
        out.append({"image": image if image is None or isinstance(image, list) else str(image),
                    "patient_id": _text(got["patient_id"]) or None, "qa": qa, "record": str(ids[n]) if use_ids else str(n + 1)})
    return out


def image_uri(record: dict[str, Any]) -> str | None:
    """The uri of a record's one image (relative to the root), or None (no image, or several)."""
    image = record["image"]
    return Path(image).as_posix().lstrip("/") if isinstance(image, str) and image else None


@dataclass(frozen=True)
class QaFile:
    """A question–answer file's records, and those with one image by its uri. Shared by every
    reader of the file in a process: read it, never change it."""

    records: tuple[dict[str, Any], ...]
    by_image: dict[str, list[dict[str, Any]]]


@lru_cache(maxsize=4)
def qa_file(path: Path, stamp: tuple[int, int], columns: tuple[tuple[str, str], ...]) -> QaFile:
    """The file read once per process for its (mtime, size): every batch and group task of a
    scan makes a reader, and a worker process runs many of them."""
    records = read_records(path, dict(columns))
    by_image: dict[str, list[dict[str, Any]]] = {}
    for rec in records:
        if uri := image_uri(rec):
            by_image.setdefault(uri, []).append(rec)
    return QaFile(tuple(records), by_image)


class QaReader(Image2DReader):
    """Each record of the question–answer file is an item; its image loads like any 2D image."""

    kind = "qa"

    def prepare(self) -> None:
        """Read and check the file on the driver, and say in one warning how many records cannot
        become items, and why: no image, several images, or an image not under the root."""
        dropped: Counter[str] = Counter()
        examples: dict[str, str] = {}
        for rec in self._records:
            image, uri = rec["image"], image_uri(rec)
            if uri is None:
                reason = "several images" if isinstance(image, list) else "no image"
            elif not self.path(uri).is_file():
                reason = "image not found under the root"
            else:
                continue
            dropped[reason] += 1
            examples.setdefault(reason, f"record {rec['record']} ({image!r})")
        if dropped:
            log.warning("source %s: %s", self.spec.name, "; ".join(f"{n} record(s) left out: {r} (e.g. {examples[r]})" for r, n in dropped.items()))

    @cached_property
    def _file(self) -> QaFile:
        path = Path(self.spec.file)
        st = path.stat() if path.is_file() else None  # a missing file: read_records says so
        stamp = (st.st_mtime_ns, st.st_size) if st else (0, 0)
        return qa_file(path, stamp, tuple(sorted(self.spec.columns.items())))

    @property
    def _records(self) -> tuple[dict[str, Any], ...]:
        return self._file.records

    @property
    def _by_image(self) -> dict[str, list[dict[str, Any]]]:
        """Records by the uri of their image (one image, named relative to the root); its keys
        are what reading a file needs to know."""
        return self._file.by_image

    @cached_property
    def _table_uri(self) -> str:
        return relative_uri(Path(self.spec.file), self.root)

    def read_one(self, uri: str) -> Record | None:
        """An image no record names is skipped as not named without reading its header (whatever
        else is wrong with it does not matter to this source); a named one is read as any 2D image."""
        if uri == self._table_uri:
            return Record(uri, uri, "indexed", "question–answer table")
        if uri not in self._by_image:
            if image_kind(self.path(uri), uri) is None:
                return None
            return Record(uri, uri, "skipped", f"not named in the question–answer file {Path(self.spec.file).name}")
        facts = self.image_header(uri)
        return None if facts is None else Record(uri, uri, facts=facts)

    def combine(self, key: str, records: list[Record], out: Scan) -> None:
        (record,) = records
        named = self._by_image[record.uri]
        facts: ImageFacts = record.facts
        if too_large := self.too_large(facts.shape):
            out.ledger.append(self.entry(record.uri, "skipped", too_large))
            return
        items = [self.item(record.uri, facts, patient=rec["patient_id"] or facts.patient_id or _stem(record.uri),
                           attrs={"qa": rec["qa"]}, record=rec["record"]) for rec in named]
        out.items.extend(items)
        out.ledger.append(self.entry(record.uri, "indexed", f"image of {len(items)} question–answer record{'s' * (len(items) != 1)}", items[0].item_id))
