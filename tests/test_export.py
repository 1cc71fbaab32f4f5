"""`m3-curate export llava`: VILA/LLaVA JSON and image files from shards (no Ray needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shards_factory import write_shards

from curation.cli import main
from curation.errors import CurationError
from curation.export import conversations, export_llava, turn_text
from curation.store.layout import shard_files


def text(t):
    return {"type": "text", "text": t}


IMAGE = {"type": "image", "text": None}


def test_every_row_becomes_a_record_with_its_images_in_order(tmp_path):
    shards = write_shards(tmp_path / "build", conversations=30)
    table = pa.concat_tables([pq.read_table(f) for f in sorted((shards / "dataset" / "data").glob("*/*.parquet"))])
    counts = export_llava(shards, tmp_path / "llava").rows
    assert sum(counts.values()) == table.num_rows
    by_id = {r["id"]: r for r in table.to_pylist()}
    seen_multi = seen_single = False
    for split, n in counts.items():
        records = json.loads((tmp_path / "llava" / f"{split}.json").read_text())
        assert len(records) == n
        for record in records:
            row = by_id[record["id"]]
            assert row["split"] == split
            paths = record["images"] if "images" in record else [record["image"]] if "image" in record else []
            seen_multi |= "images" in record
            seen_single |= "image" in record
            assert "images" not in record or len(record["images"]) > 1
            assert [(tmp_path / "llava" / p).read_bytes() for p in paths] == [i["bytes"] for i in row["images"]]
            assert sum(t["value"].count("<image>") for t in record["conversations"]) == len(paths)
            assert {t["from"] for t in record["conversations"]} <= {"human", "gpt"}
            assert len(record["conversations"]) == len(row["messages"])
    assert seen_multi and seen_single


def test_turn_text_places_image_tokens_where_the_parts_stand():
    assert turn_text([IMAGE, text("This is a CT image.")]) == "<image>\nThis is a CT image."
    assert turn_text([text("Cards.\n"), IMAGE, text("This is a CT image.")]) == "Cards.\n<image>\nThis is a CT image."
    assert turn_text([text("T1c: "), IMAGE, text(", FLAIR: "), IMAGE, text(" Which?")]) == "T1c: <image>, FLAIR: <image> Which?"


def test_a_system_turn_opens_the_first_human_turn():
    turns = conversations([
        {"role": "system", "content": [text("Be brief.")]},
        {"role": "user", "content": [IMAGE, text("What is it?")]},
        {"role": "assistant", "content": [text("A lung.")]},
    ])
    assert turns == [{"from": "human", "value": "Be brief.\n<image>\nWhat is it?"}, {"from": "gpt", "value": "A lung."}]
    with pytest.raises(CurationError, match="role 'tool'"):
        conversations([{"role": "tool", "content": [text("x")]}])


def test_command_line(tmp_path, capsys):
    shards = write_shards(tmp_path / "build", conversations=12)
    assert main(["export", "llava", str(shards / "dataset" / "data"), str(tmp_path / "out")]) == 0
    assert "exported 12 conversations" in capsys.readouterr().out
    assert main(["export", "llava", str(tmp_path / "nothing"), str(tmp_path / "out2")]) == 2
    assert "no such folder" in capsys.readouterr().err


# --- the records as VILA's and LLaVA-NeXT's loaders read them (tests/vila_loaders.py) ---------


def image_turns(messages):
    """Per image, in order: the index of the turn that holds it (the system turn, if any, joins
    the first user turn, as the export writes it)."""
    out, turn = [], -1
    for m in messages:
        if m["role"] != "system":
            turn += 1
        out += [max(turn, 0)] * sum(p["type"] == "image" for p in m["content"])
    return out


@pytest.mark.parametrize("layout", ["vila", "llava-next"])
def test_every_record_loads_in_the_loaders_its_layout_is_for_with_images_in_place(tmp_path, layout):
    """Token counts, image loading and turn alternation as VILA's loaders do them (at the commit
    VILA-M3 pins, and the newer LLaVANextDataset) and LLaVA-NeXT's; every image is consumed in
    the row's order and sits in the row's turn (an overlay stays after the call that made it)."""
    from vila_loaders import LAYOUT_LOADERS, LOADERS

    shards = write_shards(tmp_path / "build", conversations=40)
    table = pa.concat_tables([pq.read_table(f) for f in sorted((shards / "dataset" / "data").glob("*/*.parquet"))])
    by_id = {r["id"]: r for r in table.to_pylist()}
    out = tmp_path / layout
    counts = export_llava(shards, out, layout=layout).rows
    multi = 0
    for split in counts:
        for record in json.loads((out / f"{split}.json").read_text()):
            row = by_id[record["id"]]
            want_bytes = [i["bytes"] for i in row["images"]]
            multi += len(want_bytes) > 1
            if layout == "llava-next":
                assert "images" not in record and (not want_bytes or isinstance(record["image"], list))
            for name in LAYOUT_LOADERS[layout]:
                loaded = LOADERS[name](record, str(out))
                assert loaded.images == want_bytes, name
                where = [t for t, (_, parts) in enumerate(loaded.turns) for p in parts if isinstance(p, int)]
                order = [p for _, parts in loaded.turns for p in parts if isinstance(p, int)]
                assert order == list(range(len(want_bytes))), name
                assert where == image_turns(row["messages"]), name
                assert [r for r, _ in loaded.turns] == ["human", "gpt"] * (len(loaded.turns) // 2), name
    assert multi > 0


def test_the_vila_layout_is_not_for_llava_next_loaders(tmp_path):
    """Why there are two layouts: LLaVA-NeXT reads no `images` key (a several-image record would
    train as text), and VILA's LLaVANextDataset iterates `image` (a string, letter by letter)."""
    from vila_loaders import LoaderError, llava_next, vila_next

    shards = write_shards(tmp_path / "build", conversations=30)
    counts = export_llava(shards, tmp_path / "vila", layout="vila").rows
    records = [r for s in counts for r in json.loads((tmp_path / "vila" / f"{s}.json").read_text())]
    several = next(r for r in records if "images" in r)
    with pytest.raises(LoaderError, match="image tokens for 0 images"):
        llava_next(several, str(tmp_path / "vila"))
    one = next(r for r in records if "image" in r)
    with pytest.raises((LoaderError, OSError)):
        vila_next(one, str(tmp_path / "vila"))


def test_loaders_that_move_images_to_the_first_turn_break_trigger_then_result(tmp_path):
    """The README's warning, shown: VILA's newer LLaVADataset puts the result overlay of a
    trigger conversation in the first turn, before the assistant's call that made it."""
    from vila_loaders import vila_llava_dataset

    shards = write_shards(tmp_path / "build", conversations=30)
    counts = export_llava(shards, tmp_path / "x", layout="llava-next").rows
    records = [r for s in counts for r in json.loads((tmp_path / "x" / f"{s}.json").read_text())]
    trigger = next(r for r in records if len(r["conversations"]) >= 4 and "<image>" in r["conversations"][2]["value"])
    loaded = vila_llava_dataset(trigger, str(tmp_path / "x"))
    assert all(isinstance(p, int) for p in loaded.turns[0][1][:len(loaded.images)])  # every image in turn 0
    assert "<" in trigger["conversations"][1]["value"]  # the call comes after them


# --- whatever the shards hold, every file stays inside OUT ------------------------------------


@pytest.mark.parametrize("column, value", [
    ("id", "../../escaped"), ("id", "/tmp/absolute"), ("split", "../up"), ("split", "/etc"), ("id", "a/b"), ("split", ".."),
    ("id", ""), ("split", "..\\win"),
], ids=["id-dotdot", "id-absolute", "split-dotdot", "split-absolute", "id-slash", "split-is-dotdot", "id-empty", "split-backslash"])
def test_crafted_ids_and_splits_never_write_outside_the_output_folder(tmp_path, column, value):
    shards = write_shards(tmp_path / "build", conversations=6)
    part = sorted((shards / "dataset" / "data").glob("*/*.parquet"))[0]
    rows = pq.read_table(part).to_pylist()
    rows[0][column] = value
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(part)), part)
    out = tmp_path / "sandbox" / "out"
    before = {p for p in tmp_path.rglob("*")}
    assert main(["-q", "export", "llava", str(shards), str(out)]) == 2
    written = {p for p in tmp_path.rglob("*") if not p.is_dir()} - before
    assert all(p.is_relative_to(out) for p in written), sorted(map(str, written))
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "sandbox" / "up.json").exists()


def test_a_duplicate_id_is_refused(tmp_path):
    shards = write_shards(tmp_path / "build", conversations=6)
    part = sorted((shards / "dataset" / "data").glob("*/*.parquet"))[0]
    rows = pq.read_table(part).to_pylist()
    rows.append(dict(rows[0]))
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(part)), part)
    with pytest.raises(CurationError, match="appears twice"):
        export_llava(shards, tmp_path / "out")


def test_a_link_in_the_output_folder_does_not_lead_writes_outside(tmp_path):
    shards = write_shards(tmp_path / "build", conversations=6)
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    elsewhere.mkdir()
    (out / "images").symlink_to(elsewhere)
    with pytest.raises(CurationError, match=rf"^OUT {out}: images there is not from an m3-curate export"):
        export_llava(shards, out)
    (out / "images").unlink()
    (out / ".export.new").symlink_to(elsewhere)  # where the export is written before it replaces the last one
    with pytest.raises(CurationError, match="outside"):
        export_llava(shards, out)
    assert not any(elsewhere.iterdir())


def test_an_export_replaces_the_last_one_in_its_folder_whole_and_nothing_else(tmp_path, capsys):
    """A second export into a folder holds only its own splits and images (another dataset's
    `test.json` left beside would be read as this one's test split); files the export did not
    write are left alone, and refused where it would write over them; an export that fails
    leaves the last one as it was."""
    a = write_shards(tmp_path / "a", conversations=30, seed=4)
    b = write_shards(tmp_path / "b", conversations=10, seed=5)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export_llava(a, out).rows.keys() == {"train", "val", "test"}
    counts = export_llava(b, out).rows
    assert set(counts) == {"train"} and sorted(p.name for p in out.iterdir()) == [".m3-curate-export", ".m3-curate.lock", "images", "notes.txt", "train.json"]
    records = json.loads((out / "train.json").read_text())
    assert len(records) == counts["train"] and {p.name for p in (out / "images").iterdir()} == {
        Path(i).name for r in records for i in ([r["image"]] if "image" in r else r.get("images", []))}

    broken = shard_files(a, "test").files[0]  # the export fails on its rows
    chunk = pq.read_metadata(broken).row_group(0).column(0)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(broken.read_bytes())
    data[start : start + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    broken.write_bytes(bytes(data))
    with pytest.raises(CurationError, match="its rows do not read"):
        export_llava(a, out)
    assert json.loads((out / "train.json").read_text()) == records and not (out / ".export.new").exists()

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "test.json").write_text("[]")
    assert main(["-q", "export", "llava", str(b), str(foreign)]) == 0  # b has no test split: test.json is not in the way
    with pytest.raises(CurationError, match=rf"^OUT {foreign}: test.json there is not from an m3-curate export"):
        export_llava(a, foreign)
    assert (foreign / "test.json").read_text() == "[]"


def test_an_export_stopped_halfway_through_its_swap_is_replaced_by_the_next(tmp_path, monkeypatch):
    """Stopped between moving its files in (a kill, a full disk): the mark already names them,
    so the next export takes them as its own to replace, rather than refusing them as a user's."""
    import os

    from curation import export as export_module

    a = write_shards(tmp_path / "a", conversations=30, seed=4)
    b = write_shards(tmp_path / "b", conversations=10, seed=5)
    out = tmp_path / "out"
    assert set(export_llava(b, out).rows) == {"train"}  # the last export: no test.json, no val.json
    moved_in, real_replace = [], os.replace

    def stop_at_the_third_move_in(src, dst):
        if Path(dst).parent == out and Path(src).parent.name == ".export.new":
            moved_in.append(Path(dst).name)
            if len(moved_in) == 3:
                raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(export_module.os, "replace", stop_at_the_third_move_in)
    with pytest.raises(OSError):
        export_llava(a, out)
    monkeypatch.undo()
    assert moved_in == ["images", "test.json", "train.json"] and (out / "test.json").exists()  # in, and not in the last mark
    counts = export_llava(a, out).rows
    assert sum(counts.values()) == 30 and sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "images", "test.json", "train.json", "val.json"]
