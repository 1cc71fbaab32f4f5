"""`m3-curate export llava`: VILA/LLaVA JSON and image files from shards (no Ray needed)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from shards_factory import write_shards

from curation.cli import main
from curation.errors import CurationError
from curation.export import conversations, export_llava, turn_text


def text(t):
    return {"type": "text", "text": t}


IMAGE = {"type": "image", "text": None}


def test_every_row_becomes_a_record_with_its_images_in_order(tmp_path):
    shards = write_shards(tmp_path / "build", conversations=30)
    table = pa.concat_tables([pq.read_table(f) for f in sorted((shards / "dataset" / "data").glob("*/*.parquet"))])
    counts = export_llava(shards, tmp_path / "llava")
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
