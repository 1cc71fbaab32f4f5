"""The plan without Ray: splits by patient, task weights, row places, shard writing."""

from __future__ import annotations

import doctest
import logging
import random
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from curation.errors import CurationError
from curation.items import StudyItem
from curation.keys import Keyer, resolve_secret
from curation.manifest import BuildSpec, SplitSpec, TaskSpec
from curation.build.mixture import variant_count, variants
from curation.build.plan import ExpertInfo, make_plan
from curation.rows import ROW_SCHEMA
from curation.store.shards import ShardWriter, shard_path
from curation.build import split as split_module
from curation.build.split import MIN_PATIENTS, assign_splits, required_splits, split_of
from curation.build.stages import PLACED_SCHEMA


def item(i: int, patient: int, source: str = "cxr", modality: str = "CR") -> StudyItem:
    return StudyItem(item_id=f"item{i:04d}", patient_key=f"patient{patient:03d}", study_key="s", source=source, kind="image2d",
                     modality=modality, shape=[8, 8], spacing=[1.0, 1.0], n_files=1, uris=[f"{i}.png"])


def spec(tmp_path: Path, tasks: list[dict], **extra) -> BuildSpec:
    return BuildSpec.model_validate({
        "name": "t", "seed": 5,
        "sources": [{"name": "cxr", "kind": "image2d", "root": str(tmp_path)}, {"name": "ct", "kind": "dicom", "root": str(tmp_path)}],
        "experts": [{"name": "CXR", "runner": "labels"}, {"name": "CT", "runner": "ct_tissue"}],
        "tasks": tasks, "split": {"val": 0.2, "test": 0.2}, "output": {"dir": str(tmp_path), "rows_per_shard": 4}, **extra,
    })


INFOS = {
    "CXR": ExpertInfo(name="CXR", runner="labels", fingerprint="f1", spec={}),
    "CT": ExpertInfo(name="CT", runner="ct_tissue", fingerprint="f2", spec={}, modalities=("CT",)),
}


def test_split_fractions_and_stability():
    s, keyer = SplitSpec(val=0.1, test=0.2), Keyer("secret")
    splits = Counter(split_of(f"p{i}", s, keyer, 0) for i in range(4000))
    assert abs(splits["test"] / 4000 - 0.2) < 0.03 and abs(splits["val"] / 4000 - 0.1) < 0.03
    assert [split_of(f"p{i}", s, keyer, 0) for i in range(50)] == [split_of(f"p{i}", s, Keyer("secret"), 0) for i in range(50)]
    # another secret or seed gives another assignment
    assert [split_of(f"p{i}", s, Keyer("other"), 0) for i in range(50)] != [split_of(f"p{i}", s, keyer, 0) for i in range(50)]


def test_docstring_examples_run():
    assert doctest.testmod(split_module).failed == 0


FRACTIONS = st.sampled_from([0.0, 0.05, 0.1, 0.3])
# source name → patient numbers (1–8 per source): small archives, where hash splits leave gaps
ARCHIVES = st.dictionaries(st.sampled_from(["ct", "mr", "cxr", "qa", "pet"]), st.sets(st.integers(0, 24), min_size=1, max_size=8),
                           min_size=1, max_size=5)


def pairs_of(archive: dict[str, set[int]], shared: bool) -> list[tuple[str, str]]:
    """(source, patient) pairs, an item per pair; `shared`: patient numbers name the same
    patient in every source (CT and MR of one person), else each source has its own."""
    return [(s, f"p{i}" if shared else f"{s}-p{i}") for s, ps in sorted(archive.items()) for i in sorted(ps)]


def gaps(pairs: list[tuple[str, str]], splits: dict[str, str], spec: SplitSpec) -> dict[str, set[str]]:
    """Source → the required splits it has no patient in, for sources of MIN_PATIENTS or more."""
    by_source = defaultdict(set)
    for source, patient in pairs:
        by_source[source].add(patient)
    return {s: set(required_splits(spec)) - {splits[p] for p in ps} for s, ps in by_source.items() if len(ps) >= MIN_PATIENTS}


class Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@settings(max_examples=300, deadline=None)
@given(archive=ARCHIVES, val=FRACTIONS, test=FRACTIONS, secret=st.text(min_size=1, max_size=6), seed=st.integers(0, 9))
def test_every_split_gets_a_patient_of_every_source_of_three_or_more(archive, val, test, secret, seed):
    spec, keyer, pairs = SplitSpec(val=val, test=test), Keyer(secret), pairs_of(archive, shared=False)
    splits = assign_splits(pairs, spec, keyer, seed)
    assert set(splits) == {p for _, p in pairs}  # one split per patient, every patient
    assert not any(gaps(pairs, splits, spec).values())
    # deterministic, whatever the order of the items (and an item per file repeats pairs)
    assert assign_splits(random.Random(seed).sample(pairs, len(pairs)) + pairs, spec, Keyer(secret), seed) == splits
    # as few moves as the gaps need, each inside a source that had a gap, towards a split it lacked
    hashed = {p: split_of(p, spec, keyer, seed) for p in splits}
    before = gaps(pairs, hashed, spec)
    moved = {p for p in splits if splits[p] != hashed[p]}
    assert len(moved) == sum(len(g) for g in before.values())
    assert all(splits[p] in before[p.split("-")[0]] for p in moved)


@settings(max_examples=300, deadline=None)
@given(archive=ARCHIVES, val=FRACTIONS, test=FRACTIONS, seed=st.integers(0, 9))
def test_patients_shared_between_sources_get_one_split_and_a_source_left_short_is_named(archive, val, test, seed):
    spec, pairs = SplitSpec(val=val, test=test), pairs_of(archive, shared=True)
    log, handler = logging.getLogger("curation.build.split"), Warnings()
    log.addHandler(handler)
    try:
        splits = assign_splits(pairs, spec, Keyer("k"), seed)
    finally:
        log.removeHandler(handler)
    assert set(splits) == {p for _, p in pairs}
    short = {s for s, g in gaps(pairs, splits, spec).items() if g}
    assert short <= {m.split("'")[1] for m in handler.messages}


def test_one_patient_in_two_sources_fills_both():
    spec, keyer = SplitSpec(val=0.1, test=0.1), Keyer("k")
    pairs = [(s, f"p{i}") for s in ("ct", "mr") for i in range(4)]  # CT and MR of the same four people
    splits = assign_splits(pairs, spec, keyer, 0)
    assert sorted(splits.values()) == ["test", "train", "train", "val"]


def test_a_large_archive_keeps_its_hash_splits():
    spec, keyer = SplitSpec(val=0.1, test=0.1), Keyer("secret")
    pairs = [(s, f"{s}{i}") for s in ("ct", "cxr") for i in range(500)]
    assert assign_splits(pairs, spec, keyer, 3) == {p: split_of(p, spec, keyer, 3) for _, p in pairs}


def test_plan_puts_a_patient_of_every_source_in_every_split(tmp_path):
    s = spec(tmp_path, [{"template": "a.j2", "source": "cxr", "expert": "CXR"}, {"template": "c.j2", "source": "ct", "expert": "CT"}])
    keyer = Keyer(resolve_secret(s.key))
    # four patients a source, none of them in test or val by their hash
    hashed_train = [n for n in range(400) if split_of(f"patient{n:03d}", s.split, keyer, s.seed) == "train"]
    items = [item(i, n) for i, n in enumerate(hashed_train[:4])] + [item(10 + i, n, "ct", "CT") for i, n in enumerate(hashed_train[4:8])]
    plan = make_plan(s, items, INFOS)
    for source in ("cxr", "ct"):
        assert {p.split for p in plan.iter_items() if p.item.source == source and p.conversations} == {"train", "val", "test"}


def test_fractional_weight_samples_with_the_seed():
    keyer = Keyer("k")
    task = TaskSpec(template="t.j2", source="cxr", weight=1.3)
    counts = [variants(task, f"i{n}", keyer, 7) for n in range(3000)]
    assert set(counts) == {1, 2}
    assert abs(sum(counts) / 3000 - 1.3) < 0.04
    assert counts == [variants(task, f"i{n}", keyer, 7) for n in range(3000)]
    assert counts != [variants(task, f"i{n}", keyer, 8) for n in range(3000)]
    assert variant_count(3.0, 0.999) == 3


def test_plan_keeps_patients_in_one_split_and_places_every_row_once(tmp_path):
    s = spec(tmp_path, [
        {"template": "a.j2", "source": "cxr", "expert": "CXR", "weight": 2.5},
        {"template": "b.j2", "source": "cxr", "weight": 0.5},
        {"template": "c.j2", "source": "ct", "expert": "CT", "args": ["lung", "bone"], "weight": 3},
    ])
    items = [item(i, i // 3) for i in range(60)] + [item(100 + i, 50 + i, "ct", "CT") for i in range(5)] + [item(200, 60, "ct", "MR")]
    plan = make_plan(s, items, INFOS)
    by_patient = defaultdict(set)
    for p in plan.items:
        by_patient[p.item.patient_key].add(p.split)
    assert all(len(v) == 1 for v in by_patient.values())
    places = [(p.split, c.shard, c.pos) for p in plan.items for c in p.conversations]
    assert len(places) == len(set(places)) == plan.planned_rows()
    assert all(0 < n <= 4 for _, n in plan.shards.values())
    for split in ("train", "val", "test"):  # a split's positions are 0…n-1, shard k holding [4k, 4k + 4)
        positions = sorted(pos for s_, _, pos in places if s_ == split)
        assert positions == list(range(len(positions)))
    for p in plan.items:
        for c in p.conversations:
            start, n = plan.shards[(p.split, c.shard)]
            assert start <= c.pos < start + n and c.shard == c.pos // 4
    # the CT expert's arguments alternate over variants; an MR item in the CT source is left out with the reason
    ct = next(p for p in plan.items if p.item.item_id == "item0100")
    assert [c.arg for c in ct.conversations] == ["lung", "bone", "lung"]
    mr = next(p for p in plan.items if p.item.item_id == "item0200")
    assert not mr.conversations and "CT takes CT, not MR" in mr.notes[0]
    # the same inputs in another order give the same plan
    again = make_plan(s, random.Random(1).sample(items, len(items)), INFOS)
    assert [(p.item.item_id, p.split, p.conversations) for p in again.items] == [(p.item.item_id, p.split, p.conversations) for p in plan.items]


def test_every_window_of_a_split_mixes_sources_and_tasks_as_the_whole_does(tmp_path):
    """Rows are interleaved across tasks (and so sources), not written one lane after another:
    an unshuffled streaming reader sees the mixture in every stretch of rows."""
    s = spec(tmp_path, [
        {"template": "a.j2", "source": "cxr", "expert": "CXR", "weight": 3},
        {"template": "b.j2", "source": "cxr", "weight": 1},
        {"template": "c.j2", "source": "ct", "expert": "CT", "args": ["lung"], "weight": 2},
    ], split={"val": 0.0, "test": 0.0})
    items = [item(i, i) for i in range(300)] + [item(1000 + i, 1000 + i, "ct", "CT") for i in range(30)]
    plan = make_plan(s, items, INFOS, rows_per_shard=100)
    by_pos = {c.pos: c.task for p in plan.items for c in p.conversations}
    order = [by_pos[k] for k in range(len(by_pos))]
    whole = Counter(order)
    for start in range(0, len(order) - 50, 50):  # every window of 50 rows: each task within 5 rows of its share
        window = Counter(order[start:start + 50])
        for task, n in whole.items():
            assert abs(window[task] - 50 * n / len(order)) <= 5, (start, window, whole)


def test_two_tasks_with_one_template_on_one_source_are_refused(tmp_path):
    s = spec(tmp_path, [{"template": "a.j2", "source": "cxr", "expert": "CXR"}, {"template": "a.j2", "source": "cxr"}])
    with pytest.raises(CurationError, match=r"tasks\[0\] and tasks\[1\] both render 'a.j2'"):
        make_plan(s, [item(0, 0)], INFOS)


def placed_rows(n: int, shard: int, start: int = 0) -> pa.Table:
    rows = [{"id": f"r{start + i}", "dataset": "t", "source": "s", "task": "t", "split": "train", "item_id": "i",
             "patient_key": "p", "modality": "CR", "expert": None, "images": [{"bytes": bytes([i]), "path": "x.png"}],
             "messages": [{"role": "user", "content": [{"type": "image", "text": None}]}], "findings": None,
             "provenance": None, "_shard": shard, "_pos": start + i} for i in range(n)]
    return pa.Table.from_pylist(rows, schema=PLACED_SCHEMA)


def test_shard_writer_is_order_independent_atomic_and_streams(tmp_path, monkeypatch):
    monkeypatch.setattr("curation.store.shards.ROW_GROUP", 2)
    planned = {("train", 0): (0, 5), ("train", 1): (5, 3)}
    arrivals = [placed_rows(1, 0 if p < 5 else 1, p) for p in range(8) if p != 3]  # position 3: set aside
    outputs = []
    for n, order in enumerate((arrivals, arrivals[::-1], random.Random(2).sample(arrivals, len(arrivals)))):
        root = tmp_path / str(n)
        w = ShardWriter(root, planned)
        for rows in order:
            w.add("train", rows)
            w.resolve("train", [(rows["_shard"][0].as_py(), rows["_pos"][0].as_py())] + ([(0, 3)] if rows["_pos"][0].as_py() == 4 else []))
        (root / "train" / "part-00009.parquet").write_bytes(b"stale")
        files = w.finish()
        assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet"]
        assert not list(root.rglob("*.tmp")) and not (root / "train" / "part-00009.parquet").exists()
        outputs.append([f.read_bytes() for f in files])
    assert outputs[0] == outputs[1] == outputs[2]
    meta = pq.read_metadata(shard_path(tmp_path / "0", "train", 0))
    assert meta.num_row_groups == 2 and meta.schema.to_arrow_schema().equals(ROW_SCHEMA)
    assert pq.read_table(shard_path(tmp_path / "0", "train", 0))["id"].to_pylist() == ["r0", "r1", "r2", "r4"]


def test_shard_writer_spills_beyond_its_memory_budget_and_writes_the_same_bytes(tmp_path, monkeypatch):
    """Rows that wait for a slow item beyond the budget go to disk; the shards are the same,
    byte for byte, as when everything fits in memory."""
    monkeypatch.setattr("curation.store.shards.ROW_GROUP", 4)
    planned = {("train", 0): (0, 300), ("train", 1): (300, 100)}
    arrivals = [p for p in range(400) if p != 0] + [0]  # position 0 (a slow item) comes last: nothing can be written before
    outputs, spilled = [], []
    for n, budget in enumerate((1 << 30, 4096)):
        root, spill = tmp_path / f"out{n}", tmp_path / f"spill{n}"
        w = ShardWriter(root, planned, spill=spill, memory=budget)
        held = 0
        for p in arrivals:
            rows = placed_rows(1, p // 300, p)
            w.add("train", rows)
            w.resolve("train", [(p // 300, p)])
            held = max(held, w._held_bytes)
        outputs.append([f.read_bytes() for f in w.finish()])
        spilled.append(w.spilled_rows)
        assert held <= budget + rows.nbytes and not list(spill.glob("*"))
    assert spilled[0] == 0 and spilled[1] > 250
    assert outputs[0] == outputs[1] and len(outputs[0]) == 2


def test_shard_writer_refuses_to_finish_with_rows_missing(tmp_path):
    w = ShardWriter(tmp_path, {("val", 0): (0, 2)})
    w.add("val", placed_rows(1, 0))
    w.resolve("val", [(0, 0)])
    with pytest.raises(RuntimeError, match="never completed"):
        w.finish()
    assert not list(tmp_path.rglob("*.tmp"))
