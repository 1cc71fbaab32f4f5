"""The partitioned scan: the same index and ledger bytes however the work is cut and wherever it
runs (in this process, a process pool, Ray tasks), series grouped across batches, and the walk's
accounting of links, pipes and odd names."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from curation.demo import write_demo_archive
from curation.ingest import scan as scan_module
from curation.ingest.index import build_index, scan_to_files
from curation.ingest import sorted_parquet
from curation.ingest.runners import LocalRunner
from curation.ingest.sorted_parquet import RowGroupWriter, merge_parts
from curation.ingest.walk import walk
from curation.items import source_path, uri_name, uri_text
from curation.manifest import load_manifest


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    write_demo_archive(out, cases=2, seed=0)
    return out


@pytest.fixture
def manifest(demo: Path, write_manifest) -> Path:
    return write_manifest({
        "name": "scan", "key": "scan-test",
        "sources": [
            {"name": "ct", "kind": "dicom", "root": str(demo / "ct"), "labels": "../ct_labels"},
            {"name": "brain", "kind": "nifti_group", "root": str(demo / "brain"), "channels": ["t1c", "t1", "t2", "flair"], "labels": "seg"},
            {"name": "cxr", "kind": "image2d", "root": str(demo / "cxr"), "labels": "labels.csv"},
        ],
    })


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scan_bytes(manifest: Path, out: Path, runner) -> tuple[str, str]:
    index, ledger = out / "index.parquet", out / "ledger.parquet"
    scan_to_files(load_manifest(manifest), index, ledger, runner)
    assert not [p for p in out.iterdir() if p.name.startswith(".")], "spill or temporary files left behind"
    return digest(index), digest(ledger)


@pytest.mark.slow
def test_same_bytes_whatever_the_cut_and_the_processes(manifest: Path, tmp_path: Path, monkeypatch) -> None:
    """One batch and one group task in this process, against batches of 7 files (every CT series
    spans several) and group tasks of 20 records in a pool of 2 processes, with row groups of 50."""
    monkeypatch.setattr(sorted_parquet, "ROW_GROUP_ROWS", 50)
    whole = scan_bytes(manifest, tmp_path / "a", LocalRunner(1))
    monkeypatch.setattr(scan_module, "BATCH_FILES", 7)
    monkeypatch.setattr(scan_module, "GROUP_RECORDS", 20)
    with_pool = LocalRunner(2)
    try:
        assert scan_bytes(manifest, tmp_path / "b", with_pool) == whole
    finally:
        with_pool.close()
    assert pq.ParquetFile(tmp_path / "a" / "ledger.parquet").num_row_groups > 1


def test_a_scan_beside_other_threads_takes_its_workers_from_a_fork_server(manifest: Path, tmp_path: Path, monkeypatch) -> None:
    """A build scans in a thread while Ray starts in another, and forking a process that has
    threads is unsafe: the pool's workers then come from a fork server. Same bytes."""
    import threading

    whole = scan_bytes(manifest, tmp_path / "a", LocalRunner(1))
    monkeypatch.setattr(scan_module, "BATCH_FILES", 7)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    runner = LocalRunner(2)
    try:
        result: dict[str, tuple[str, str]] = {}
        scanning = threading.Thread(target=lambda: result.update(b=scan_bytes(manifest, tmp_path / "b", runner)))
        scanning.start()
        scanning.join()
        assert result.get("b") == whole
        assert runner._pool is not None and runner._pool._mp_context.get_start_method() == "forkserver"
    finally:
        stop.set()
        other.join()
        runner.close()


def test_in_memory_index_writes_the_same_bytes(manifest: Path, tmp_path: Path) -> None:
    from curation.ingest.index import write_index

    whole = scan_bytes(manifest, tmp_path / "a", LocalRunner(1))
    index = build_index(load_manifest(manifest))
    write_index(index, tmp_path / "b" / "index.parquet", tmp_path / "b" / "ledger.parquet")
    assert (digest(tmp_path / "b" / "index.parquet"), digest(tmp_path / "b" / "ledger.parquet")) == whole
    ct = [i for i in index.items if i.source == "ct"]
    assert len(ct) == 2 and all(i.n_files >= 40 for i in ct)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_tasks_write_the_same_bytes(manifest: Path, tmp_path: Path, monkeypatch) -> None:
    import ray

    from curation.build.scan import RayRunner

    whole = scan_bytes(manifest, tmp_path / "a", LocalRunner(1))
    monkeypatch.setattr(scan_module, "BATCH_FILES", 7)
    monkeypatch.setattr(scan_module, "GROUP_RECORDS", 20)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert scan_bytes(manifest, tmp_path / "b", RayRunner()) == whole
    finally:
        ray.shutdown()


def test_merge_keeps_position_order_across_parts(tmp_path: Path, monkeypatch) -> None:
    import pyarrow as pa

    monkeypatch.setattr(sorted_parquet, "ROW_GROUP_ROWS", 3)
    parts = []
    for n, positions in enumerate([[0, 3, 4, 9], [1, 2, 8], [5, 6, 7]]):
        path = tmp_path / f"p{n}.parquet"
        pq.write_table(pa.table({"uri": [f"f{p}" for p in positions], "pos": positions}), path)
        parts.append(str(path))
    schema = pa.schema([("uri", pa.string())])
    with RowGroupWriter(tmp_path / "out.parquet", schema) as out:
        merge_parts(parts, ("pos",), out, batch_rows=2)
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("uri").to_pylist() == [f"f{p}" for p in range(10)]
    assert [pq.ParquetFile(tmp_path / "out.parquet").metadata.row_group(i).num_rows for i in range(4)] == [3, 3, 3, 1]


# -- the walk ---------------------------------------------------------------------------------------


def test_walk_lists_each_file_once_and_every_odd_entry_with_a_reason(tmp_path: Path) -> None:
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "a").mkdir(parents=True)
    (outside / "deep").mkdir(parents=True)
    (root / "a" / "f1").write_text("1")
    (root / "a.txt").write_text("2")
    (outside / "deep" / "o1").write_text("3")
    (outside / "o2").write_text("4")
    os.symlink(".", root / "loop")
    os.symlink("../a", root / "a" / "up")
    os.symlink(outside, root / "ext")
    os.symlink(outside, root / "ext2")  # a second path to the same outside folder
    os.symlink(outside / "o2", root / "o2link")  # the same file as ext/o2
    os.symlink(root / "a" / "f1", root / "f1link")  # a file inside the root
    os.symlink("nowhere", root / "broken")
    os.mkfifo(root / "pipe")
    entries = list(walk(root))
    listed = [e.uri for e in entries if e.skip is None]
    assert listed == ["a.txt", "a/f1", "ext/deep/o1", "ext/o2"]
    skipped = {e.uri: e.skip for e in entries if e.skip}
    assert set(skipped) == {"a/up", "broken", "ext2", "f1link", "loop", "o2link", "pipe"}
    assert "named pipe" in skipped["pipe"] and "broken" in skipped["broken"]
    assert len({e.uri for e in entries}) == len(entries)
    not_followed = {e.uri: e.skip for e in walk(root, follow_links=False)}
    assert not_followed["ext"] == not_followed["loop"] == "symbolic link not followed (follow_links: false)"


def test_names_of_any_bytes_lead_back_to_their_file(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    odd = os.fsdecode(b"caf\xe9 50%.png")
    (root / odd).write_bytes(b"odd")
    (root / "plain 50%.png").write_bytes(b"plain")
    uris = [e.uri for e in walk(root)]
    assert uris == ["caf%E9 50%25.png", "plain 50%.png"]
    assert uri_text(odd) == "caf%E9 50%25.png" and uri_name("caf%E9 50%25.png") == odd
    assert source_path(root, uris[0]).read_bytes() == b"odd" and source_path(root, uris[1]).read_bytes() == b"plain"
    import pyarrow as pa

    assert pa.array(uris, pa.string()).to_pylist() == uris  # Arrow takes the text as it is


def test_an_escaped_name_that_is_taken_is_set_aside_not_confused(tmp_path: Path) -> None:
    root = tmp_path / "r"
    root.mkdir()
    (root / os.fsdecode(b"x\xe9")).write_bytes(b"odd")
    (root / "x%E9").write_bytes(b"plain")
    entries = list(walk(root))
    assert [e.uri for e in entries if e.skip is None] == ["x%E9"]
    (odd,) = [e for e in entries if e.skip]
    assert "escaped form names another file" in odd.skip and odd.uri != "x%E9"
    assert source_path(root, "x%E9").read_bytes() == b"plain"
