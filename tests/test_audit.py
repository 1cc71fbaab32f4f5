"""`m3-curate audit`: the grounding check over rows already written (real Parquet shards made by
the build's own row code), a table per task, exit status 1 when a row is ungrounded; tampered
rows are caught with the right reason, and so are rows whose call does not follow the question."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from render_factory import Demo

from curation.audit import CALL_CLASH, audit, table
from curation.build.plan import ItemPlan, PlannedConversation
from curation.build.stages import BuildContext, findings_json, make_row
from curation.cli import main
from curation.render.renderer import Renderer, TemplateSkip
from curation.rows import ROW_SCHEMA


@pytest.fixture(scope="module")
def rows(render_demo: Demo) -> list[dict]:
    """Rows as the build writes them: every task, two items each, two variants."""
    demo = render_demo
    renderer = Renderer(demo.spec, experts=demo.experts)
    ctx = BuildContext(spec=demo.spec, cache_root="unused", fingerprints={e.name: "fp" for e in demo.spec.experts},
                       manifest_hash="m", code_version="c", experts=demo.experts)
    out = []
    for t, task in enumerate(demo.spec.tasks):
        for item in demo.items_of(task.source)[:2]:
            for v in range(2):
                f = demo.get(task, item, v)
                try:
                    conv = renderer.render(task, item, f, variant=v)
                except TemplateSkip:
                    continue
                plan = ItemPlan(item=item, split="train", lane=0)
                text = None if f is None else findings_json(renderer.findings_data(f, item))
                row = make_row(ctx, plan, PlannedConversation(task=t, variant=v, arg=task.args[v % len(task.args)], shard=0, pos=len(out)), conv, text)
                out.append({k: v for k, v in row.items() if not k.startswith("_")})
    return out


def write(out: Path, rows: list[dict], schema: pa.Schema = ROW_SCHEMA, name: str = "part-00000.parquet") -> Path:
    folder = out / "dataset" / "data" / "train"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), folder / name)
    return out


def test_written_rows_are_grounded(rows: list[dict], tmp_path: Path, capsys) -> None:
    out = write(tmp_path / "good", rows)
    result = audit(out)
    assert result.ungrounded == 0 and sum(t.rows for t in result.tasks.values()) == len(rows)
    assert main(["audit", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "vista3d/tumor_presence.j2" in printed and f"{len(rows)} ungrounded" not in printed and "0 ungrounded" in printed


def test_shards_without_meta_are_not_checked_and_do_not_pass(rows: list[dict], tmp_path: Path, capsys) -> None:
    """Shards written before the `meta` column (or by another tool) cannot be audited: the audit
    says so and which column is missing, never reports their rows as ungrounded for it."""
    out = write(tmp_path / "old", [{k: v for k, v in row.items() if k != "meta"} for row in rows], ROW_SCHEMA.remove(ROW_SCHEMA.get_field_index("meta")))
    assert main(["audit", str(out)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"m3-curate: error: {out}/dataset/data: no shard can be read: not the rows this command reads (no meta column); "
        "a dataset from another tool, or written before this version's columns: build it again")
    write(tmp_path / "old", rows, name="part-00001.parquet")
    result = audit(out)
    assert list(result.unread) == [str(out / "dataset" / "data" / "train" / "part-00000.parquet")]
    assert result.ungrounded == 0 and sum(t.rows for t in result.tasks.values()) == len(rows)
    with pytest.raises(SystemExit) as ended:
        main(["audit", str(out)])
    assert ended.value.code == 1 and "not checked: " in capsys.readouterr().out


def test_tampered_rows_are_caught_with_their_reason(rows: list[dict], tmp_path: Path) -> None:
    rows = json.loads(json.dumps(rows, default=lambda b: b.decode("latin-1")))  # a deep copy (bytes through latin-1)
    for r in rows:
        for image in r["images"]:
            image["bytes"] = image["bytes"].encode("latin-1")
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    swapped = by_task["cxr/expert_hint_vqa.j2"][0]
    swapped["images"][0]["bytes"] = by_task["brats/four_sequences.j2"][0]["images"][0]["bytes"]  # another picture
    answered = by_task["cxr/expert_hint_choice.j2"][0]
    meta = json.loads(answered["meta"])
    turn = answered["messages"][meta["answer_turn"]]["content"][0]
    wrong = next(letter for letter in "ABCD" if letter != meta["answer"])
    turn["text"] = f"{wrong}) whatever"  # an answer the truth contradicts (and not the one meta records)
    meta["answer"] = wrong
    answered["meta"] = json.dumps(meta)
    plain = by_task["qa/plain.j2"][0]  # claim its prompt had the model card, as the trigger row's has: same prompt, other call
    trigger = next(r for r in by_task["qa/expert_trigger.j2"] if r["item_id"] == plain["item_id"])
    meta = json.loads(plain["meta"])
    meta["prompt"] = json.loads(trigger["meta"])["prompt"]
    plain["meta"] = json.dumps(meta)
    out = write(tmp_path / "bad", rows)
    result = audit(out)
    assert result.tasks["cxr/expert_hint_vqa.j2"].ungrounded["images do not match their slots"] == 1
    assert result.tasks["cxr/expert_hint_choice.j2"].ungrounded["answer contradicts its source"] == 1
    assert result.tasks["qa/plain.j2"].ungrounded[CALL_CLASH] == 1 and result.tasks["qa/expert_trigger.j2"].ungrounded[CALL_CLASH] >= 1
    assert result.ungrounded == 4 - 1 + result.tasks["qa/expert_trigger.j2"].ungrounded[CALL_CLASH]
    assert "answer contradicts its source" in table(result)
    with pytest.raises(SystemExit) as e:
        main(["audit", str(out)])
    assert e.value.code == 1


def test_set_aside_counts_come_from_the_card(rows: list[dict], tmp_path: Path) -> None:
    out = write(tmp_path / "card", rows)
    reason = "quarantined: template vista3d/segment_and_answer.j2, line 27: ungrounded (legend not on picture): turn 2 names red"
    (out / "dataset" / "dataset_card.json").write_text(json.dumps({"counts": {"set_aside": {reason: 3, "skipped: other": 2}}}))
    result = audit(out)
    assert dict(result.tasks["vista3d/segment_and_answer.j2"].set_aside) == {"legend not on picture": 3}
    assert "set aside: 3 legend not on picture" in table(result)


def test_legend_colours_are_read_off_the_pixels() -> None:
    import numpy as np

    from curation.audit import drawn_colours
    from curation.imaging import encode_png, overlay

    grey = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (25, 1))
    labels = np.zeros(grey.shape, np.int32)
    labels[5:9, 5:9] = 1
    asked = ("red", "blue", "green", "yellow", "magenta", "teal")
    assert drawn_colours(encode_png(overlay(grey, labels, {1: "red"})), asked) == {"red"}
    assert drawn_colours(encode_png(grey), asked) == set()


def test_each_picture_a_legend_names_is_decoded_once_per_row(rows: list[dict], tmp_path: Path, monkeypatch) -> None:
    """A legend names several colours on one picture (and a row may carry several legends):
    the picture is decoded once for all of them, not once per colour."""
    from collections import Counter

    import curation.audit as audit_module

    pictures = [len({e["image"] for e in json.loads(r["meta"]).get("legends") or []}) for r in rows]
    colours = [sum(len(e["entries"]) for e in json.loads(r["meta"]).get("legends") or []) for r in rows]
    assert sum(colours) >= 2 * sum(pictures) > 0  # several colours a picture: the case of the fault
    decoded: Counter[bytes] = Counter()
    decode = audit_module.decode_rgb
    monkeypatch.setattr(audit_module, "decode_rgb", lambda png: decoded.update([png]) or decode(png))
    result = audit(write(tmp_path / "good", rows))
    assert result.ungrounded == 0 and sum(decoded.values()) == sum(pictures)


def test_every_colour_a_legend_names_but_the_picture_lacks_is_reported_from_one_decoding(monkeypatch) -> None:
    import numpy as np

    import curation.audit as audit_module
    from curation.imaging import encode_png, overlay

    grey = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (25, 1))
    labels = np.zeros(grey.shape, np.int32)
    labels[5:9, 5:9] = 1
    row = {"images": [{"bytes": encode_png(overlay(grey, labels, {1: "red"}))}]}
    meta = {"legends": [{"turn": 2, "image": 0, "entries": [["red", "liver"], ["blue", "spleen"]]},
                        {"turn": 4, "image": 0, "entries": [["green", "aorta"], ["red", "liver"], ["mauve", "not a colour we draw"]]},
                        {"turn": 4, "image": 3, "entries": [["green", "aorta"]]}]}  # no such picture: the grounding check reports it
    decoded = []
    decode = audit_module.decode_rgb
    monkeypatch.setattr(audit_module, "decode_rgb", lambda png: decoded.append(png) or decode(png))
    found = audit_module._legend_pixels(row, meta)
    assert [(p.category, p.detail, p.turn) for p in found] == [
        ("legend not on picture", "image 0 has no blue pixel, yet turn 2 says blue: spleen", 2),
        ("legend not on picture", "image 0 has no green pixel, yet turn 4 says green: aorta", 4),
    ]
    assert len(decoded) == 1


def test_drawn_colours_agree_with_the_per_pixel_definition() -> None:
    """`drawn_colours` against the rule written out pixel by pixel (the grey of each channel,
    (pixel - alpha · colour) / (1 - alpha), agrees within 3 and lies in [-2, 257]), for every
    palette colour, on overlays, greys and noise."""
    import numpy as np

    from curation.audit import drawn_colours
    from curation.imaging import COLOURS, encode_png, overlay

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (40, 40)).astype(np.uint8)
    labels = rng.integers(0, 4, grey.shape)
    pictures = [overlay(grey, labels, {1: "red", 2: "teal", 3: "lime"}), overlay(grey, labels, {2: "blue"}, alpha=0.3),
                np.repeat(grey[..., None], 3, axis=-1), rng.integers(0, 256, (30, 20, 3)).astype(np.uint8)]
    for picture in pictures:
        for alpha in (0.5, 0.3):
            pixels = picture.astype(np.float32)
            want = set()
            for name, rgb in COLOURS:
                g = (pixels - alpha * np.array(rgb, np.float32)) / (1 - alpha)
                if ((np.ptp(g, axis=-1) <= 3.0) & (g.min(axis=-1) >= -2.0) & (g.max(axis=-1) <= 257.0)).any():
                    want.add(name)
            assert drawn_colours(encode_png(picture), [name for name, _ in COLOURS], alpha) == want
    assert {"red", "teal", "lime"} <= drawn_colours(encode_png(pictures[0]), [name for name, _ in COLOURS])
