"""The `qa` source kind: LLaVA-style JSON, JSON records, JSON lines and CSV of image, question,
answer, each record an item carrying its own Q/A, every file ledgered."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from curation.errors import CurationError
from curation.ingest.index import build_index
from curation.ingest import readers_for
from curation.ingest.qa import clean_question
from curation.manifest import load_manifest


@pytest.fixture
def pictures(tmp_path: Path) -> Path:
    root = tmp_path / "vqa"
    (root / "images").mkdir(parents=True)
    for n in range(3):
        Image.fromarray(np.full((8, 10), 40 * n, np.uint8)).save(root / "images" / f"img{n}.png")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (root / "images" / "unused.jpg").write_bytes((root / "images" / "img0.png").read_bytes())
    return root


def manifest(write_manifest, file: str, **extra) -> Path:
    return write_manifest({"name": "q", "sources": [{"name": "vqa", "kind": "qa", "root": "vqa", "file": file, **extra}]})


def ledger(index) -> dict[str, tuple[str, str]]:
    return {e.uri: (e.status, e.reason) for e in index.ledger}


def test_llava_json(pictures: Path, write_manifest, caplog) -> None:
    records = [
        {"id": "a", "image": "images/img0.png", "conversations": [
            {"from": "human", "value": "<image>\nIs there an effusion?"}, {"from": "gpt", "value": "no"},
            {"from": "human", "value": "And a pneumothorax?"}, {"from": "gpt", "value": "yes"}]},
        {"id": "b", "image": "images/img0.png", "conversations": [
            {"from": "human", "value": "What view is this?\n<image>"}, {"from": "gpt", "value": "PA"}]},
        {"id": "c", "image": "images/img1.png", "conversations": [
            {"from": "user", "value": "Describe the image."}, {"from": "assistant", "value": "Normal chest."}]},
        {"id": "d", "image": "images/missing.png", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "!"}]},
        {"id": "e", "image": "images/broken.png", "conversations": [{"from": "human", "value": "?"}, {"from": "gpt", "value": "!"}]},
        {"id": "f", "conversations": [{"from": "human", "value": "Text only"}, {"from": "gpt", "value": "ok"}]},
    ]
    (pictures / "train.json").write_text(json.dumps(records))
    spec = load_manifest(manifest(write_manifest, "vqa/train.json"))
    assert spec.sources[0].file == pictures / "train.json"
    with caplog.at_level(logging.WARNING):
        index = build_index(spec)
    items = index.items
    assert [i.attrs["qa"] for i in items] == [
        [{"question": "Is there an effusion?", "answer": "no", "answer_type": None},
         {"question": "And a pneumothorax?", "answer": "yes", "answer_type": None}],
        [{"question": "What view is this?", "answer": "PA", "answer_type": None}],
        [{"question": "Describe the image.", "answer": "Normal chest.", "answer_type": None}],
    ]
    assert all(i.kind == "image2d" and i.modality == "CR" and i.shape == [10, 8] for i in items)
    assert len({i.item_id for i in items}) == 3 and items[0].patient_key == items[1].patient_key != items[2].patient_key
    assert ledger(index) == {
        "train.json": ("indexed", "question–answer table"),
        "images/img0.png": ("indexed", "image of 2 question–answer records"),
        "images/img1.png": ("indexed", "image of 1 question–answer record"),
        "images/img2.png": ("skipped", "not named in the question–answer file train.json"),
        "images/unused.jpg": ("skipped", "not named in the question–answer file train.json"),
        "images/broken.png": ("quarantined", ledger(index)["images/broken.png"][1]),
    }
    assert ledger(index)["images/broken.png"][1].startswith("corrupt: ")
    assert "1 record(s) left out: image not found under the root (e.g. record d ('images/missing.png'))" in caplog.text
    assert "1 record(s) left out: no image (e.g. record f (None))" in caplog.text
    volume = readers_for(spec)["vqa"].load(items[2])
    assert volume.array.shape == (10, 8) and int(volume.array.max()) == 40


def test_csv_in_vqa_rad_shape_with_patients(pictures: Path, write_manifest) -> None:
    with (pictures / "qa.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_name", "question", "answer", "answer_type", "patient_id"])
        w.writerow(["images/img0.png", "Is the heart enlarged?", "yes", "CLOSED", "P1"])
        w.writerow(["images/img1.png", "Where is the mass?", "left lower lobe", "OPEN", "P1"])
        w.writerow(["images/img2.png", "Any fracture?", "no", "CLOSED", ""])
    index = build_index(load_manifest(manifest(write_manifest, "vqa/qa.csv", modality="DX")))
    qa = [i.attrs["qa"][0] for i in index.items]
    assert [(q["answer"], q["answer_type"]) for q in qa] == [("yes", "closed"), ("left lower lobe", "open"), ("no", "closed")]
    assert index.items[0].patient_key == index.items[1].patient_key != index.items[2].patient_key
    assert {i.modality for i in index.items} == {"DX"}


def test_jsonl_with_mapped_columns_and_the_file_outside_the_root(pictures: Path, tmp_path: Path, write_manifest) -> None:
    lines = [{"picture": "images/img2.png", "q": "Is this normal?", "report": "Yes, normal.", "id": 7}]
    (tmp_path / "export.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    index = build_index(load_manifest(manifest(write_manifest, "export.jsonl", columns={"image": "picture", "answer": "report"})))
    assert [i.attrs["qa"] for i in index.items] == [[{"question": "Is this normal?", "answer": "Yes, normal.", "answer_type": None}]]
    assert "export.jsonl" not in ledger(index)


def test_item_ids_are_stable_and_keyed_by_record_id(pictures: Path, write_manifest) -> None:
    rows = [{"id": f"r{n}", "image": "images/img0.png", "question": f"q{n}", "answer": "a"} for n in range(3)]
    (pictures / "a.json").write_text(json.dumps(rows))
    first = [i.item_id for i in build_index(load_manifest(manifest(write_manifest, "vqa/a.json"))).items]
    (pictures / "a.json").write_text(json.dumps(rows[::-1]))
    second = [i.item_id for i in build_index(load_manifest(manifest(write_manifest, "vqa/a.json"))).items]
    assert sorted(first) == sorted(second) and len(set(first)) == 3


def test_control_characters_are_dropped_from_text(pictures: Path, write_manifest) -> None:
    (pictures / "a.json").write_text(json.dumps([{"image": "images/img0.png", "question": "Is\x00 it\x07 ok?\n", "answer": "yes\x00"}]))
    qa = build_index(load_manifest(manifest(write_manifest, "vqa/a.json"))).items[0].attrs["qa"][0]
    assert (qa["question"], qa["answer"]) == ("Is it ok?", "yes")


@pytest.mark.parametrize("name, content, message", [
    ("nope.json", None, "question–answer file not found"),
    ("a.txt", "x", "a question–answer file is .json (LLaVA or records), .jsonl or .csv, not .txt"),
    ("a.json", "{not json", "cannot read it as UTF-8 JSON"),
    ("a.json", json.dumps({"a": 1}), "expected a list of records, got a dict"),
    ("a.json", json.dumps([{"image": "images/img0.png", "text": "hi"}]),
     ("a.json, record 1: needs a question and an answer (columns tried: question, query, q / answer, answers, a, report; "
      "set `columns:` in the manifest for other names)")),
    ("a.json", json.dumps([{"image": "images/img0.png", "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}]),
     "a.json, record 1: turns must alternate human, assistant starting with human"),
    ("a.json", json.dumps([{"image": "images/img0.png", "conversations": [{"from": "system", "value": "x"}]}]),
     "conversations[0].from is 'system'; use human/gpt"),
])
def test_errors_name_the_file_and_record(pictures: Path, write_manifest, name: str, content: str | None, message: str) -> None:
    if content is not None:
        (pictures / name).write_text(content)
    with pytest.raises(CurationError) as e:
        build_index(load_manifest(manifest(write_manifest, f"vqa/{name}")))
    assert message in str(e.value)


def test_unknown_column_mapping(pictures: Path, write_manifest) -> None:
    (pictures / "a.json").write_text("[]")
    with pytest.raises(CurationError, match=r"columns: unknown name\(s\) \['img'\]"):
        build_index(load_manifest(manifest(write_manifest, "vqa/a.json", columns={"img": "x"})))


def test_clean_question() -> None:
    assert clean_question("<image>\nWhat is this?") == "What is this?"
    assert clean_question("What is this?\n<image>") == "What is this?"
    assert clean_question("Look <image> here") == "Look  here"


def test_an_image_no_record_names_is_skipped_as_not_named_without_being_read(pictures: Path, write_manifest, monkeypatch) -> None:
    """Whatever else is wrong with an image no record names (cut short, a decompression bomb, a
    damaged DICOM) does not matter to this source: it is skipped as not named, its header unread.
    A file that is no image stays unsupported."""
    from fault_archive import png, radiograph

    from curation.ingest import image2d
    from curation.ingest.index import list_files

    images = pictures / "images"
    png(images / "bomb.png", 12000, 12000, complete=False)  # a header claiming 144 M pixels
    (images / "cut.png").write_bytes((images / "img1.png").read_bytes()[:-20])
    radiograph(images / "scan.dcm", patient_id="P1")
    (images / "damaged.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10")
    radiograph(images / "extensionless", patient_id="P2")
    (images / "readme").write_text("not an image")
    (pictures / "a.json").write_text(json.dumps([{"image": "images/img0.png", "question": "q", "answer": "a"}]))
    spec = load_manifest(manifest(write_manifest, "vqa/a.json"))
    not_named = ("skipped", "not named in the question–answer file a.json")
    unnamed = ["bomb.png", "broken.png", "cut.png", "damaged.dcm", "extensionless", "img1.png", "img2.png", "scan.dcm", "unused.jpg"]
    rows = ledger(build_index(spec))
    assert rows == {
        "a.json": ("indexed", "question–answer table"),
        "images/img0.png": ("indexed", "image of 1 question–answer record"),
        **{f"images/{name}": not_named for name in unnamed},
        "images/readme": ("skipped", rows["images/readme"][1]),
    }
    assert rows["images/readme"][1].startswith("unsupported")

    read: list[str] = []  # the headers read, in this process
    for name in ("picture_size", "read_header"):
        original = getattr(image2d, name)
        monkeypatch.setattr(image2d, name, lambda *a, _f=original: read.append(str(a[-1]).rsplit("/", 1)[-1]) or _f(*a))
    reader = readers_for(spec)["vqa"]
    reader.scan(list_files(pictures))
    assert read == ["img0.png"]


def test_the_file_is_read_once_per_process_for_all_its_readers_until_it_changes(pictures: Path, write_manifest, monkeypatch) -> None:
    """Every batch and group task of a scan makes a reader; a worker process runs many. They
    share one reading of the file (records, and records by image) while its mtime and size stay."""
    from curation.ingest import qa
    from curation.ingest.index import list_files

    file = pictures / "a.json"
    file.write_text(json.dumps([{"image": "images/img0.png", "question": "q", "answer": "a"},
                                {"image": "images/img1.png", "question": "q", "answer": "b"}]))
    spec = load_manifest(manifest(write_manifest, "vqa/a.json"))
    qa.qa_file.cache_clear()
    reads: list[str] = []
    monkeypatch.setattr(qa, "read_records", lambda path, columns, _f=qa.read_records: reads.append(path.name) or _f(path, columns))

    def scan_in_a_new_reader() -> list[str]:
        reader = readers_for(spec)["vqa"]
        reader.prepare()
        return sorted(i.attrs["qa"][0]["answer"] for i in reader.scan(list_files(pictures)).items)

    assert scan_in_a_new_reader() == scan_in_a_new_reader() == ["a", "b"]
    assert reads == ["a.json"]
    file.write_text(json.dumps([{"image": "images/img2.png", "question": "q", "answer": "changed"}]))
    assert scan_in_a_new_reader() == ["changed"] and reads == ["a.json", "a.json"]
