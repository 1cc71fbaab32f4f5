"""Files cut short (a copy interrupted, a disk that filled) in what the commands after a build
read. A shard that does not open: `finetune`, `eval`, `export` and `audit` each read the other
shards, name the set-aside one in a warning and record it with why in what they write
(`curation.store.layout.shard_files`). A model folder or checkpoint that does not load: one
line naming it and what to do (`curation.finetune.model_folder`), not the traceback of
safetensors or torch."""

from __future__ import annotations

import json
import shutil

import pytest

from curation.audit import audit, table
from curation.cli import main
from curation.finetune.data import count_rows
from curation.store.layout import shard_files
from shards_factory import write_shards


CUT = "not a readable Parquet file ("
OTHER = "not the rows this command reads (images is list<string>, not list<struct<bytes: binary, path: string>>)"


@pytest.fixture
def damaged(tmp_path):
    """A train shard cut short, and a test shard as another tool writes it (`images` as paths)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = write_shards(tmp_path / "build", conversations=40, seed=4, rows_per_shard=4, row_group_size=2)
    cut, other = (shard_files(data, split).files[1] for split in ("train", "test"))
    cut.write_bytes(cut.read_bytes()[:-40])
    table = pq.read_table(other)
    paths = pa.array([[f"images/{i}.png" for _ in images] for i, images in zip(table["id"].to_pylist(), table["images"].to_pylist())])
    pq.write_table(table.set_column(table.schema.get_field_index("images"), "images", paths), other)
    return data, {str(cut): CUT, str(other): OTHER}


def test_each_command_that_reads_shards_sets_a_damaged_one_aside_and_records_it(damaged, tmp_path, capsys, caplog):
    """...or one that is not our rows: the other shards are read, and the set-aside ones are
    named with why."""
    data, cut = damaged
    run = tmp_path / "run"
    assert main(["-q", "finetune", "--data", str(data), "--model", "tiny", "--out", str(run), "--max-steps", "2",
                 "--batch-size", "2"]) == 0
    trained = json.loads((run / "train_summary.json").read_text())
    assert set(trained["set_aside_shards"]) == {p for p in cut if "/train/" in p} and trained["steps"] == 2

    out = tmp_path / "eval.json"
    assert main(["-q", "eval", "--model", str(run), "--data", str(data), "--out", str(out), "--limit", "2", "--cpu-threads", "1"]) == 0
    assert set(json.loads(out.read_text())["set_aside_shards"]) == {p for p in cut if "/test/" in p}

    capsys.readouterr()
    caplog.clear()
    assert main(["export", "llava", str(data), str(tmp_path / "llava")]) == 0
    said = capsys.readouterr().out
    assert said.rstrip().endswith("; 2 shards set aside, named above, that could not be read"), said
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert all(any(w.startswith(f"{p}: set aside, {why}") for w in warned) for p, why in cut.items()), warned
    exported = sum(len(json.loads(f.read_text())) for f in (tmp_path / "llava").glob("*.json"))
    assert exported == count_rows(shard_files(data, columns=["images"]).files) > 0

    checked = audit(data)
    assert checked.unread.keys() == cut.keys()
    assert sum(t.rows for t in checked.tasks.values()) == exported
    assert all(f"not checked: {p}: {why}" in table(checked) for p, why in cut.items())
    with pytest.raises(SystemExit) as ended:  # an audit that could not read every row does not pass
        main(["audit", str(data)])
    assert ended.value.code == 1


def test_a_model_folder_or_checkpoint_cut_short_is_one_line_naming_it(tmp_path, capsys):
    data = write_shards(tmp_path / "build", conversations=20, seed=4)
    run = tmp_path / "run"
    train = ["-q", "finetune", "--data", str(data), "--model", "tiny", "--out", str(run), "--save-steps", "2"]
    assert main([*train, "--max-steps", "4"]) == 0
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    assert main(["-q", "eval", "--model", str(run), "--data", str(data), "--limit", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"m3-curate: error: {run}: does not load (SafetensorError: Error while deserializing header: incomplete metadata, file "
        "not fully covered): copy the model folder again, or give another (finetune's --out)")

    newest = run / "checkpoint-4"
    for part in ("optimizer.pt", "model.safetensors"):
        (newest / part).write_bytes((newest / part).read_bytes()[:100])
        assert main([*train, "--max-steps", "6", "--resume"]) == 2
        said = capsys.readouterr().err.strip().splitlines()[-1]
        assert said.startswith(f"m3-curate: error: {newest}: does not load (") and said.endswith(
            "): remove checkpoint-4, and --resume goes on from the checkpoint before it, or from --model when none is left"), said
    shutil.rmtree(newest)
    assert main([*train, "--max-steps", "6", "--resume"]) == 0
    assert json.loads((run / "train_summary.json").read_text())["resumed_from"] == 2


@pytest.mark.parametrize("where", ["tiny-base", "checkpoint-1"])
def test_a_write_the_file_system_refuses_while_training_is_one_line_naming_the_folder(tmp_path, where):
    """A full disk (here a file-size limit: the same failing write, with EFBIG) fails inside
    safetensors ("os error 27") or torch's zip writer ("unexpected pos"), in errors that do not
    say so: one line naming the folder being written and the reason, status 2, and no half
    written folder is left to be taken as complete (`model_folder.saving`)."""
    import os
    import resource
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from curation.finetune.tiny import build_tiny

    data = write_shards(tmp_path / "build", conversations=20, seed=4)
    run = tmp_path / "run"
    if where == "checkpoint-1":
        build_tiny(data, run / "tiny-base")  # without the limit: the checkpoint's weights are what fail

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-m", "curation", "-q", "finetune", "--data", str(data), "--model", "tiny", "--out", str(run),
                           "--max-steps", "2", "--save-steps", "1"], capture_output=True, text=True, preexec_fn=small_files, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"m3-curate: error: cannot write {run / where}: File too large (the file exceeds the size limit of this process or file system)")
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")] and not (run / "checkpoint-1").exists()
    assert (run / "tiny-base" / "config.json").exists() == (where == "checkpoint-1")


@pytest.mark.slow
@pytest.mark.ray
def test_a_shard_damaged_inside_stops_a_run_on_two_ray_train_workers_in_one_line(tmp_path):
    """Bytes changed in a later row group of a train shard: the footer opens and the driver's
    first rows read, so a Ray Train worker finds it mid-run. Ray Train reports it in a
    `WorkerGroupError` of both ranks (the other fails in its next collective); the command
    still ends with the worker's one line, status 2, not that traceback."""
    import subprocess
    import sys

    import pyarrow.parquet as pq

    data = write_shards(tmp_path / "build", conversations=40, seed=4, rows_per_shard=10, row_group_size=5)
    last = shard_files(data, "train").files[-1]  # the driver's checks read the first shard's first rows only
    chunk = pq.read_metadata(last).row_group(1).column(2)
    damaged = bytearray(last.read_bytes())
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    damaged[middle : middle + 16] = b"\xff" * 16
    last.write_bytes(bytes(damaged))
    run = subprocess.run([sys.executable, "-m", "curation", "-q", "finetune", "--data", str(data), "--model", "tiny",
                          "--out", str(tmp_path / "run"), "--workers", "2", "--max-steps", "30"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    said = run.stderr.strip().splitlines()[-1]
    assert said.startswith(f"m3-curate: error: {last}: its rows do not read (") and said.endswith(
        "): the file is damaged; copy the dataset again, or build it again: the build writes the same bytes"), said
    assert not any(line.startswith("Traceback") for line in run.stderr.splitlines()), run.stderr[-3000:]


def test_a_bit_flipped_in_a_shard_the_build_wrote_stops_every_reader_naming_it(tmp_path):
    """The build writes a CRC32 with every page and every command reads shards through
    `layout.read_batches`, which checks them: a bit flipped on disk (in the text, the pixels,
    the meta or an id) stops the command naming the shard, or lands where nothing reads it (a
    page header's statistics) and the rows are the same. A reader that does not check gets
    other text or pixels for some of the same flips, and no error."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from curation.build.stages import PLACED_SCHEMA
    from curation.errors import CurationError
    from curation.store.layout import iter_rows
    from curation.store.shards import ShardWriter
    from shards_factory import make_rows

    rows = make_rows(40, seed=4)
    writer = ShardWriter(tmp_path / "data", {("train", 0): (0, len(rows))})
    writer.add("train", pa.Table.from_pylist([{**r, "_shard": 0, "_pos": p} for p, r in enumerate(rows)], schema=PLACED_SCHEMA))
    writer.resolve("train", [(0, p) for p in range(len(rows))])
    [shard] = writer.finish()
    written, clean = shard.read_bytes(), pq.read_table(shard)
    chunks = {c.path_in_schema: c for c in (pq.read_metadata(shard).row_group(0).column(k) for k in range(clean.num_columns + 3))
              if c.path_in_schema in ("id", "images.list.element.bytes", "messages.list.element.content.list.element.text", "meta")}
    assert len(chunks) == 4
    caught = silent = 0
    for column, chunk in chunks.items():
        for k in range(1, 6):  # five places spread over the column's pages
            flipped = bytearray(written)
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
            flipped[start + k * chunk.total_compressed_size // 6] ^= 0x10
            shard.write_bytes(bytes(flipped))
            try:
                assert pa.Table.from_pylist(list(iter_rows([shard])), schema=clean.schema).equals(clean), (column, k)
            except CurationError as e:
                assert str(e).startswith(f"{shard}: its rows do not read (") and "the file is damaged" in str(e)
                caught += 1
            try:
                silent += not pq.read_table(shard).equals(clean)
            except (OSError, pa.ArrowException):
                pass
    assert caught >= 15 and silent > 0
