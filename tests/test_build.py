"""`m3-curate build` end to end on one local Ray session shared by the module, over a
2-case demo archive with the weight-free runners, the real renderer and templates, plus a
failing expert and a failing template to show where failures go."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from build_helpers import demo_manifest

from curation.demo import write_demo_archive
from curation.ingest.index import list_files
from curation.rows import ROW_SCHEMA, SCHEMA_VERSION

pytestmark = pytest.mark.ray

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent

BROKEN_TEMPLATE = """{#- declare
kind: custom_broken
description: "fails on purpose: reads a key the findings do not have"
sources: [nifti_group]
needs: [structures]
calls_expert: false
model_card: false
images: 0
-#}
{% turn "user" %}
Tell me about {{ findings.no_such_key.name }}.
{% endturn %}
{% turn "assistant" %}
Nothing.
{% endturn %}
"""


@dataclass
class Built:
    manifest: Path
    out: Path
    prompts: Path
    runs: list[str]  # expert runs of the build, one "<item_id> <args>" each
    card: dict
    progress: str  # what the build printed to stderr: log lines, then its progress line
    counted: list[int]  # the workers' counts of items past their experts, when the driver removed them


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("archive")
    write_demo_archive(path, cases=2, seed=0)
    return path


@pytest.fixture(scope="module")
def runs_log(tmp_path_factory):
    """One local Ray for the module; its workers import tests/build_helpers and log runs."""
    ray = pytest.importorskip("ray")
    log = tmp_path_factory.mktemp("runs") / "runs.log"
    log.touch()
    if ray.is_initialized():  # another module's session: this one needs its own runtime env
        ray.shutdown()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             runtime_env={"env_vars": {"PYTHONPATH": str(TESTS), "M3_TEST_RUN_LOG": str(log)}})
    yield log
    ray.shutdown()


def write_prompts(folder: Path) -> Path:
    (folder / "custom").mkdir(parents=True)
    (folder / "custom" / "broken.j2").write_text(BROKEN_TEMPLATE)
    volume = (REPO / "prompts" / "findings" / "volume.j2").read_text()
    (folder / "custom" / "volume_note.j2").write_text(volume.replace("{% endturn %}", "(note v1)\n{% endturn %}", 1))
    return folder


def tiny_manifest(archive: Path, root: Path, prompts: Path) -> Path:
    data = demo_manifest(
        archive, root / "out", counting=True, prompts=prompts,
        extra_experts=[{"name": "BROKEN", "runner": "build_helpers:FailingRunner"}],
        extra_tasks=[
            {"template": "custom/broken.j2", "source": "brain", "expert": "BRATS"},
            {"template": "custom/volume_note.j2", "source": "ct", "expert": "CT_TISSUE"},
            {"template": "findings/presence.j2", "source": "ct", "expert": "BROKEN"},
        ],
    )
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def built(runs_log, archive, tmp_path_factory) -> Built:
    from curation.build.pipeline import build

    root = tmp_path_factory.mktemp("build")
    prompts = write_prompts(root / "prompts")
    manifest = tiny_manifest(archive, root, prompts)
    from curation.build.progress import through_experts

    counted, remove = [], shutil.rmtree

    def rmtree(path, *args, **kwargs):  # the driver's removal of the plan's folder, seen first; any other call as it was
        if isinstance(path, (str, Path)) and Path(path) == root / "out" / "internal" / "plan":
            counted.extend(sum(c.items for c in through_experts(folder).values()) for folder in Path(path).glob("progress-*"))
        return remove(path, *args, **kwargs)

    with contextlib.redirect_stderr(io.StringIO()) as printed, pytest.MonkeyPatch.context() as patch:
        patch.setattr(shutil, "rmtree", rmtree)
        result = build(manifest, progress=True)
    return Built(manifest=manifest, out=root / "out", prompts=prompts, runs=runs_log.read_text().splitlines(), card=result.card,
                 progress=printed.getvalue(), counted=counted)


def shard_table(out: Path):
    import pyarrow as pa

    files = sorted((out / "dataset" / "data").glob("*/part-*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]), files


def test_shards_load_with_datasets_images_and_messages(built):
    import datasets

    files = {s: sorted(str(f) for f in (built.out / "dataset" / "data" / s).glob("part-*.parquet")) for s in ("train", "val", "test")}
    files = {s: f for s, f in files.items() if f}
    ds = datasets.load_dataset("parquet", data_files=files)
    total = sum(len(ds[s]) for s in ds)
    assert total == built.card["counts"]["rows"]["total"] > 0
    train = ds["train"].cast_column("images", datasets.List(datasets.Image()))
    seen_images = 0
    for row in train:
        parts = [p for m in row["messages"] for p in m["content"]]
        assert sum(p["type"] == "image" for p in parts) == len(row["images"])
        for image in row["images"]:
            assert image.size[0] > 0 and image.mode in ("L", "RGB", "RGBA")
            seen_images += 1
        assert row["messages"][-1]["role"] == "assistant" and row["messages"][-1]["content"][0]["text"]
    assert seen_images > 0


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<image>", "<|user|>", "<|assistant|>", "<|end|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["This is a CT image. Which organs are visible?", "The liver is shown in red."], trainer=trainer)
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{% for p in m['content'] %}"
                "{% if p['type'] == 'image' %}<image>{% else %}{{ p['text'] }}{% endif %}{% endfor %}<|end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template, pad_token="<pad>",
                                   extra_special_tokens={"image_token": "<image>"})


def test_messages_fit_a_chat_template(built):
    tokenizer = tiny_tokenizer()
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    table, _ = shard_table(built.out)
    for row in table.select(["messages", "images"]).to_pylist():
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        assert text.count("<image>") == len(row["images"])
        ids = tokenizer.apply_chat_template(row["messages"])["input_ids"]
        assert ids.count(image_id) == len(row["images"])
        assert "<|assistant|>" in text


def test_card_counts_add_up_and_match_shards(built):
    card, c = built.card, built.card["counts"]
    table, files = shard_table(built.out)
    assert table.schema.equals(ROW_SCHEMA)
    assert json.loads((built.out / "dataset" / "dataset_card.json").read_text())["counts"] == c
    files_ = c["files"]
    assert files_["discovered"] == files_["used"] + files_["skipped"] + files_["quarantined"]
    assert c["rows"]["total"] == table.num_rows
    for column in ("split", "task", "modality", "source"):
        assert c["rows"][f"by_{column}"] == dict(Counter(table[column].to_pylist()))
    assert sum(c["rows"]["by_expert"].values()) == table.num_rows
    assert c["rows"]["planned"] == table.num_rows + sum(c["set_aside"].values())
    assert c["shards"]["files"] == [f.relative_to(built.out / "dataset").as_posix() for f in files] and c["shards"]["total"] == len(files)
    assert all(pq.read_metadata(f).num_rows <= card["manifest"]["output"]["rows_per_shard"] for f in files)
    assert set(c["shards"]["bytes_by_split"]) == {f.parent.name for f in files} and all(n > 0 for n in c["shards"]["bytes_by_split"].values())
    items = c["items"]
    assert items["indexed"] == items["used"] + items["skipped"] + items["quarantined"]
    assert sum(items["by_split"].values()) == items["used"] == len(set(table["item_id"].to_pylist()))
    assert len(set(table["id"].to_pylist())) == table.num_rows
    prov = card["provenance"]
    assert set(prov["expert_fingerprints"]) == {"CT_TISSUE", "VISTA3D", "BRATS", "CXR", "BROKEN"}
    assert "custom/volume_note.j2" in prov["template_hashes"] and prov["code_version"] and prov["manifest_hash"]
    assert card["schema_version"] == SCHEMA_VERSION and card["manifest"]["name"] == "tiny"
    assert {"index", "pipeline", "total"} <= set(card["timing"]["wall_s"]) and card["timing"]["stage_s"]["load"] > 0


def test_no_patient_in_two_splits(built):
    table, _ = shard_table(built.out)
    splits = defaultdict(set)
    for patient, split in zip(table["patient_key"].to_pylist(), table["split"].to_pylist()):
        splits[patient].add(split)
    assert splits and all(len(s) == 1 for s in splits.values())
    for f in (built.out / "dataset" / "data").glob("*/part-*.parquet"):
        assert set(pq.read_table(f, columns=["split"])["split"].to_pylist()) == {f.parent.name}


def test_ledger_accounts_for_every_file_and_every_failure(built, archive):
    ledger = pq.read_table(built.out / "internal" / "ledger.parquet").to_pylist()
    uris = Counter((r["source"], r["uri"]) for r in ledger)
    on_disk = {(s, u) for s in ("ct", "brain", "cxr") for u in list_files(archive / s)}
    assert set(uris) == on_disk and max(uris.values()) == 1
    assert {r["status"] for r in ledger} <= {"used", "skipped", "quarantined"}
    table, _ = shard_table(built.out)
    rows_per_item = Counter(table["item_id"].to_pylist())
    for r in ledger:
        if r["item_id"] and r["status"] == "used" and r["rows"]:
            assert r["rows"] == rows_per_item[r["item_id"]]
    # the template that fails on every brain item: a brain item whose conversations all failed is quarantined with the
    # template's reason; one with other rows is used, and its reason says what was set aside
    brain = [r for r in ledger if r["source"] == "brain"]
    assert any("custom/broken.j2" in r["reason"] for r in brain)
    assert all(r["status"] in ("used", "quarantined") for r in brain)
    set_aside = built.card["counts"]["set_aside"]
    assert any(k.startswith("quarantined: template custom/broken.j2") for k in set_aside)
    # the expert that fails on every CT item: set aside with the expert's reason, the item's other rows kept
    assert any("BROKEN()" in k and "synthetic failure" in k for k in set_aside)
    assert any(r["source"] == "ct" and r["status"] == "used" and "BROKEN" in r["reason"] for r in ledger)
    assert any(r["reason"].startswith("corrupt") and r["status"] == "quarantined" for r in ledger)


def test_every_expert_runs_once_per_item_and_argument(built):
    runs = Counter(built.runs)
    assert runs and max(runs.values()) == 1
    experts = built.card["experts"]
    counted = sum(e["runs"] for name, e in experts.items() if name != "BROKEN")
    assert counted == len(built.runs)
    # VISTA3D (the ground truth) ran with both of its task's arguments
    assert {line.split(" ", 1)[1] for line in built.runs} >= {"everything", "organs", ""}
    # weight-free experts ran inside the load tasks, except BRATS, which the manifest gives a pool
    assert experts["CT_TISSUE"]["in_load_tasks"] and experts["CT_TISSUE"]["actors"] == 0 and experts["CT_TISSUE"]["runs"]
    assert not experts["BRATS"]["in_load_tasks"] and experts["BRATS"]["actors"] == 1 and experts["BRATS"]["runs"]


def test_the_progress_line_counts_items_past_their_experts_in_the_workers(built):
    """The driver learns of an item only from its rows; the items past their experts come from
    the files the expert actors and load tasks write in the build's progress folder (each
    process's first count at once, later ones within a second), which goes with the plan's
    input blocks. Every source of this build has an expert, so at the end every item is past
    them."""
    last = [line for line in built.progress.splitlines() if line.startswith("build: ")][-1]
    found = re.match(r"build: (\d+)/(\d+) items \(100%\), (\d+)/(\d+) through experts, ", last)
    assert found, last
    done, total, passed, needing = map(int, found.groups())
    assert done == total == passed == needing > 0
    assert len(built.counted) == 1 and 0 < built.counted[0] <= total


def test_export_llava_of_a_build(built, tmp_path):
    from curation.export import export_llava

    counts = export_llava(built.out, tmp_path).rows
    assert sum(counts.values()) == built.card["counts"]["rows"]["total"]
    for split in counts:
        for record in json.loads((tmp_path / f"{split}.json").read_text()):
            paths = record.get("images") or ([record["image"]] if "image" in record else [])
            assert "images" not in record or len(record["images"]) > 1
            assert sum(t["value"].count("<image>") for t in record["conversations"]) == len(paths)
            assert [t["from"] for t in record["conversations"]][:2] == ["human", "gpt"]
            assert all((tmp_path / p).is_file() for p in paths)


def rows_by_id(out: Path) -> dict[str, dict]:
    table, _ = shard_table(out)
    return {r["id"]: r for r in table.select(["id", "split", "messages", "images"]).to_pylist()}


def test_building_twice_gives_identical_rows(built, tmp_path):
    """A second build into a fresh folder (its own cache: every expert runs again)."""
    from curation.build.pipeline import build

    again = build(built.manifest, out=tmp_path / "again", progress=False)
    first, second = rows_by_id(built.out), rows_by_id(tmp_path / "again")
    assert list(first) == list(second)  # same ids, in the same order
    for rid, row in first.items():
        assert row["messages"] == second[rid]["messages"]
        assert [i["bytes"] for i in row["images"]] == [i["bytes"] for i in second[rid]["images"]]
    files = lambda out: {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "dataset" / "data").rglob("*.parquet"))}
    assert files(built.out) == files(tmp_path / "again")  # the same bytes
    assert again.card["experts"]["CT_TISSUE"]["runs"] == built.card["experts"]["CT_TISSUE"]["runs"]


def test_experts_with_weights_run_in_an_expert_host_and_make_the_rows_of_their_own_pools(built, tmp_path):
    """CPU experts with weights and no `actors` share expert hosts (every model set up once
    per host, several items at once); the same experts in pools of their own (`actors: 1`,
    which does not change a fingerprint) make the same shard bytes."""
    from curation.build.pipeline import build

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "model.bin").write_bytes(b"not a model: the runner reads the ground truth")
    data = yaml.safe_load(built.manifest.read_text())
    for e in data["experts"]:
        if e["name"] in ("VISTA3D", "CXR"):
            e.update(runner="build_helpers:WeightedLabelsRunner", bundle=str(weights))
    results = {}
    for placement in ("hosts", "pools"):
        if placement == "pools":
            for e in data["experts"]:
                if e["name"] in ("VISTA3D", "CXR"):
                    e["actors"] = 1
        manifest = tmp_path / f"{placement}.yaml"
        manifest.write_text(yaml.safe_dump(data, sort_keys=False))
        results[placement] = build(manifest, out=tmp_path / placement, progress=False).card["experts"]
    hosts, pools = results["hosts"], results["pools"]
    assert hosts["VISTA3D"]["in_expert_hosts"] and hosts["CXR"]["in_expert_hosts"] and hosts["VISTA3D"]["threads_per_actor"] > 1
    assert not hosts["BRATS"]["in_expert_hosts"] and not any(e["in_expert_hosts"] for e in pools.values())
    files = lambda out: {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted((out / "dataset" / "data").rglob("*.parquet"))}
    assert files(tmp_path / "hosts") == files(tmp_path / "pools")
    assert {n: e["runs"] for n, e in hosts.items()} == {n: e["runs"] for n, e in pools.items()}


def test_render_after_a_template_change_runs_no_expert(built, tmp_path, monkeypatch):
    from curation.build.pipeline import render
    from expert_runners import base

    out = tmp_path / "out"
    shutil.copytree(built.out, out)
    prompts = tmp_path / "prompts"
    shutil.copytree(built.prompts, prompts)
    note = prompts / "custom" / "volume_note.j2"
    note.write_text(note.read_text().replace("(note v1)", "(note v2)"))
    data = yaml.safe_load(built.manifest.read_text())
    data["prompts"] = [str(prompts)]
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))

    def forbidden(*args, **kwargs):
        raise AssertionError("render constructed or set up an expert")

    monkeypatch.setattr(base.ExpertRunner, "__init__", forbidden)
    monkeypatch.setattr(base.ExpertRunner, "setup", forbidden)
    monkeypatch.setattr(base, "make_runner", forbidden)
    runs = tmp_path / "runs.log"
    monkeypatch.setenv("M3_TEST_RUN_LOG", str(runs))

    result = render(manifest, out=out, progress=False)
    assert not runs.exists()
    assert all(e["runs"] == 0 for e in result.card["experts"].values())
    before, after = rows_by_id(built.out), rows_by_id(out)
    assert list(before) == list(after)
    changed = [rid for rid in before if before[rid]["messages"] != after[rid]["messages"]]
    table, _ = shard_table(out)
    note_ids = {r for r, t in zip(table["id"].to_pylist(), table["task"].to_pylist()) if t == "custom/volume_note.j2"}
    assert note_ids and set(changed) == note_ids
    assert all("(note v2)" in json.dumps(after[r]["messages"]) for r in note_ids)
    assert result.card["provenance"]["template_hashes"]["custom/volume_note.j2"] != built.card["provenance"]["template_hashes"]["custom/volume_note.j2"]
    assert result.card["counts"]["rows"] == built.card["counts"]["rows"]


def test_render_without_a_build_says_what_to_do(built, tmp_path):
    from curation.errors import CurationError
    from curation.build.pipeline import render

    with pytest.raises(CurationError, match=r"experts\[0\] \('CT_TISSUE'\): no build has run this expert configuration"):
        render(built.manifest, out=tmp_path / "empty", progress=False)


def test_a_build_whose_findings_are_all_cached_renders_without_ray_or_experts(built, tmp_path, monkeypatch):
    """The same build again: no runner is constructed, no Ray pipeline runs, the same bytes."""
    from curation.build import pipeline
    from expert_runners import base

    out = tmp_path / "out"
    shutil.copytree(built.out, out)
    monkeypatch.setattr(base, "make_runner", lambda *a, **k: (_ for _ in ()).throw(AssertionError("a runner was constructed")))
    monkeypatch.setattr(pipeline, "_on_ray", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray was used")))
    again = pipeline.build(built.manifest, out=out, progress=False)
    assert "render" in again.card["timing"]["wall_s"] and all(e["runs"] == 0 for e in again.card["experts"].values())
    files = lambda o: {p.relative_to(o).as_posix(): p.read_bytes() for p in sorted((o / "dataset" / "data").rglob("*.parquet"))}
    assert files(out) == files(built.out)
    assert again.card["counts"]["rows"] == built.card["counts"]["rows"]


def test_limit_does_not_replace_a_complete_build_without_force(built, tmp_path):
    from curation.build.pipeline import build
    from curation.errors import CurationError

    out = tmp_path / "out"
    shutil.copytree(built.out, out)
    before = sorted(p.name for p in (out / "dataset" / "data").rglob("*.parquet"))
    with pytest.raises(CurationError, match=r"holds a complete build \(\d+ rows\); --limit 3 would replace it.*--force"):
        build(built.manifest, out=out, limit=3, progress=False)
    assert sorted(p.name for p in (out / "dataset" / "data").rglob("*.parquet")) == before
    partial = build(built.manifest, out=out, limit=3, force=True, progress=False)
    assert partial.card["limit"] == 3 and partial.card["counts"]["rows"]["total"] < built.card["counts"]["rows"]["total"]
    # the new set replaced the old one whole: exactly the partial build's shards are there, nothing is left of the old set
    assert sorted((out / "dataset" / "data").rglob("*.parquet")) == partial.shards
    assert not (out / ".dataset.new").exists() and not (out / ".dataset.old").exists()
    build(built.manifest, out=out, limit=2, progress=False)  # a partial build may replace a partial build


def test_after_a_code_change_a_cached_build_checks_fingerprints_with_runners_and_still_skips_ray(built, tmp_path, monkeypatch):
    from curation.build import pipeline

    out = tmp_path / "out"
    shutil.copytree(built.out, out)
    registry = out / "internal" / "cache" / "experts.json"
    registry.write_text(json.dumps([{**e, "code": "an older version"} for e in json.loads(registry.read_text())]))
    monkeypatch.setattr(pipeline, "_on_ray", lambda *a, **k: (_ for _ in ()).throw(AssertionError("Ray was used")))
    again = pipeline.build(built.manifest, out=out, progress=False)
    assert all(e["runs"] == 0 for e in again.card["experts"].values())
    assert again.card["counts"]["rows"] == built.card["counts"]["rows"]
