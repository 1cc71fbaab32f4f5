"""The accounts of a build: what became of every item (`Tally`), `ledger.parquet` with every
discovered file and its fate, and `dataset_card.json`.

Statuses of a file in the build's ledger: `used` (its item gave at least one row),
`skipped` (left out by design: a localizer, no task for its source, an expert that does not
take its modality, a weight below one that did not draw it, `--limit`), `quarantined`
(unreadable, or every conversation of its item failed: load, expert or template, with the
reason). The card's file counts add up: discovered = used + skipped + quarantined.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from curation import __version__
from curation.items import LEDGER_SCHEMA, LedgerEntry
from curation.manifest import BuildSpec
from curation.rows import SCHEMA_VERSION, grounding_category, meta_counts
from curation.store.public import Redactor, public_counts, public_manifest
from curation.store.report import ItemEntry, ItemReport

BUILD_LEDGER_SCHEMA = LEDGER_SCHEMA.append(pa.field("rows", pa.int64()))
PACKAGES = ("curation", "expert_runners")
# Code that never shapes a row: commands around the build, training, the demo archive.
NOT_ROW_CODE = {"cli.py", "export.py", "preview.py", "evaluate.py", "finetune", "demo", "demo_training", "progress.py", "__main__.py"}


def code_version() -> str:
    """The package version plus a digest of the source that makes rows (readers, experts,
    renderer, pipeline): rows record exactly which code made them, with or without a git
    checkout (a `ray job submit` working dir has none), and editing the fine-tuning code does
    not change them."""
    h = hashlib.sha256()
    base = Path(__file__).resolve().parents[2]
    for package in PACKAGES:
        for path in sorted((base / package).rglob("*")):
            rel = path.relative_to(base / package)
            if path.suffix in (".py", ".json") and "__pycache__" not in rel.parts and not NOT_ROW_CODE & set(rel.parts):
                h.update(path.relative_to(base).as_posix().encode() + b"\0" + path.read_bytes())
    return f"{__version__}+{h.hexdigest()[:10]}"


@dataclass(slots=True)
class ItemOutcome:
    status: str  # used, skipped, quarantined
    reason: str
    rows: int


@dataclass(slots=True, frozen=True)
class ExpertEntry:
    """An expert as the card names it."""

    runner: str
    fingerprint: str


@dataclass
class Tally:
    """Collects each item's report and rows as results stream in."""

    outcomes: dict[str, ItemOutcome] = field(default_factory=dict)
    rows: dict[str, Counter[str]] = field(default_factory=lambda: {k: Counter() for k in ("split", "task", "expert", "modality", "source")})
    items_by_split: Counter[str] = field(default_factory=Counter)
    patients_by_split: dict[str, set[str]] = field(default_factory=dict)
    set_aside: Counter[str] = field(default_factory=Counter)  # "status: reason" of conversations not made
    seconds: Counter[str] = field(default_factory=Counter)
    runs: Counter[str] = field(default_factory=Counter)
    cached: Counter[str] = field(default_factory=Counter)
    templates: dict[str, str] = field(default_factory=dict)
    answers: Counter[str] = field(default_factory=Counter)  # grounding: rows per answer source, hint disagreements

    def record(self, entry: ItemEntry, report: ItemReport, rows: pa.Table | None) -> ItemOutcome:
        n = rows.num_rows if rows is not None else 0
        for name in ("split", "task", "modality", "source"):
            if n:
                self.rows[name].update(rows[name].to_pylist())  # type: ignore[index]
        if n:
            self.rows["expert"].update(e or "(none)" for e in rows["expert"].to_pylist())  # type: ignore[index]
            if "meta" in rows.schema.names:  # type: ignore[union-attr]
                counts = meta_counts(rows["meta"].to_pylist())  # type: ignore[index]
                self.answers.update({f"answer_from:{k}": v for k, v in counts["answer_from"].items()})
                self.answers["hint_disagrees"] += counts["hint_disagrees"]
            self.items_by_split[entry.split] += 1
            self.patients_by_split.setdefault(entry.split, set()).add(entry.patient_key)
        self.seconds.update(report.seconds)
        self.runs.update(report.runs)
        self.cached.update(report.cached)
        self.templates.update(report.templates)
        failed = [(o.status, o.reason) for o in report.set_aside()]
        for status, reason in failed:
            self.set_aside[f"{status}: {reason}"] += 1
        if not entry.planned:
            outcome = ItemOutcome("skipped", "; ".join(entry.notes) or "no conversation planned", 0)
        elif n:
            note = f"{len(failed)} of {entry.planned} conversations set aside, e.g. {failed[0][1]}" if failed else ""
            outcome = ItemOutcome("used", note, n)
        else:
            status = "quarantined" if any(s == "quarantined" for s, _ in failed) else "skipped"
            outcome = ItemOutcome(status, failed[0][1] if failed else "no rows", 0)
        self.outcomes[entry.item_id] = outcome
        return outcome

    @property
    def total_rows(self) -> int:
        return sum(self.rows["split"].values())


def build_ledger(index_ledger: list[LedgerEntry], tally: Tally, limited: set[str]) -> pa.Table:
    """One row per discovered file: the index's verdict, updated with its item's fate."""
    rows = []
    for e in index_ledger:
        status, reason, n = e.status, e.reason, 0
        if e.status == "indexed":
            if e.item_id is None:
                status = "used"  # a support file (labels table): read by the index
            elif e.item_id in limited:
                status, reason = "skipped", "left out by --limit"
            else:
                o = tally.outcomes[e.item_id]
                status, n = o.status, o.rows
                reason = "; ".join(r for r in (e.reason, o.reason) if r) if o.status == "used" else o.reason
        rows.append({"uri": e.uri, "source": e.source, "status": status, "reason": reason, "item_id": e.item_id, "rows": n})
    return pa.Table.from_pylist(rows, schema=BUILD_LEDGER_SCHEMA)


def split_bytes(shards: list[Path]) -> dict[str, int]:
    """Uncompressed bytes of each split's rows (from the Parquet footers): the `num_bytes` the
    Hub's split metadata asks for, which is the rows' size in memory, not on disk."""
    import pyarrow.parquet as pq

    out: Counter[str] = Counter()
    for shard in shards:
        meta = pq.read_metadata(shard)
        out[shard.parent.name] += sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))
    return dict(sorted(out.items()))


def dataset_card(
    *, spec: BuildSpec, indexed: int, planned_rows: int, experts: dict[str, ExpertEntry], tally: Tally, ledger: pa.Table,
    shards: list[Path], out: Path, manifest_hash: str, code: str, wall: dict[str, float], actors: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    files = Counter(ledger["status"].to_pylist())
    items = Counter(o.status for o in tally.outcomes.values())
    return {
        "name": spec.name,
        "schema_version": SCHEMA_VERSION,
        "counts": {
            "files": {"discovered": ledger.num_rows, **{s: files.get(s, 0) for s in ("used", "skipped", "quarantined")}},
            "items": {"indexed": indexed, **{s: items.get(s, 0) for s in ("used", "skipped", "quarantined")},
                      "by_split": dict(sorted(tally.items_by_split.items()))},
            "patients": {"by_split": {s: len(p) for s, p in sorted(tally.patients_by_split.items())}},
            "rows": {"total": tally.total_rows, "planned": planned_rows,
                     **{f"by_{k}": dict(sorted(v.items())) for k, v in tally.rows.items()}},
            "shards": {"total": len(shards), "rows_per_shard": spec.output.rows_per_shard,
                       "files": [p.relative_to(out).as_posix() for p in shards], "bytes_by_split": split_bytes(shards)},
            "set_aside": public_counts(tally.set_aside, Redactor.of(spec, ledger["uri"].to_pylist())),
        },
        "grounding": grounding_section(tally),
        "experts": {
            name: {"runner": info.runner, "fingerprint": info.fingerprint, "runs": tally.runs.get(name, 0),
                   "cached": tally.cached.get(name, 0), "seconds": round(tally.seconds.get(f"expert:{name}", 0.0), 3),
                   **actors.get(name, {})}
            for name, info in experts.items()
        },
        "timing": {
            "wall_s": {k: round(v, 3) for k, v in wall.items()},
            "stage_s": {k: round(v, 3) for k, v in sorted(tally.seconds.items())},
        },
        "provenance": {
            "code_version": code,
            "manifest_hash": manifest_hash,
            "expert_fingerprints": {n: i.fingerprint for n, i in experts.items()},
            "template_hashes": dict(sorted(tally.templates.items())),
            "tasks": [t.template for t in spec.tasks],
        },
        "manifest": public_manifest(spec),
    }


def grounding_section(tally: Tally) -> dict[str, Any]:
    """The grounding contract's accounts: rows by where their answer comes from (`truth`,
    `expert` — only where a task says `answer_from: expert` — or `findings`), rows whose expert
    hint or result disagrees with the truth they are answered from (kept: they teach the model to
    look), and conversations the grounding check set aside, by reason."""
    set_aside: Counter[str] = Counter()
    for reason, n in tally.set_aside.items():
        category = grounding_category(reason)
        if category is not None:
            set_aside[category] += n
    sources = {k.removeprefix("answer_from:"): v for k, v in sorted(tally.answers.items()) if k.startswith("answer_from:")}
    return {"answer_from": sources, "hint_disagrees": tally.answers.get("hint_disagrees", 0), "set_aside": dict(set_aside.most_common())}

