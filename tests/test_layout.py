"""One output layout for every command: what is shareable, what is internal, and where the cache is."""

from __future__ import annotations

import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.errors import CurationError
from curation.manifest import BuildSpec
from curation.store.layout import Layout, iter_rows, shard_files


def spec(tmp_path, **output):
    return BuildSpec(name="x", sources=[{"name": "c", "kind": "image2d", "root": str(tmp_path)}], output=output)


def test_the_cache_is_where_the_manifest_puts_it_whatever_the_out_folder(tmp_path):
    elsewhere = tmp_path / "shared-cache"
    s = spec(tmp_path, dir=str(tmp_path / "a"), cache=str(elsewhere))
    assert Layout.of(s).cache == Layout.of(s, tmp_path / "b").cache == elsewhere
    plain = spec(tmp_path, dir=str(tmp_path / "a"))
    assert Layout.of(plain, tmp_path / "b").cache == (tmp_path / "b" / "internal" / "cache").resolve()


def test_shareable_and_internal_folders_do_not_overlap(tmp_path):
    layout = Layout(tmp_path)
    shareable = {layout.card, layout.readme, layout.data}
    internal = {layout.index, layout.ledger, layout.cache, layout.preview_cache}
    assert all(p.is_relative_to(layout.dataset) for p in shareable)
    assert not any(p.is_relative_to(layout.dataset) for p in internal)
    layout.mark_internal()
    assert "do not share" in (layout.internal / "README.md").read_text()


@pytest.mark.parametrize("given", ["", "dataset", "dataset/data"])
def test_shards_are_found_from_the_build_folder_or_below(tmp_path, given):
    part = tmp_path / "dataset" / "data" / "train" / "part-00000.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(pa.table({"id": ["a"]}), part)
    assert shard_files(tmp_path / given).files == shard_files(tmp_path / given, "train").files == [part]
    with pytest.raises(CurationError, match="no shards for split 'test'.*splits with shards here: train"):
        shard_files(tmp_path / given, "test")


def test_a_folder_without_shards_is_named(tmp_path):
    with pytest.raises(CurationError, match="no shards"):
        shard_files(tmp_path)
    with pytest.raises(CurationError, match="no such folder"):
        shard_files(tmp_path / "missing")


def write_split(folder, n: int) -> list:
    folder.mkdir(parents=True)
    paths = [folder / f"part-{k:05d}.parquet" for k in range(n)]
    for k, path in enumerate(paths):
        pq.write_table(pa.table({"id": [f"{k}-{i}" for i in range(20)]}), path, row_group_size=5)
    return paths


@pytest.mark.parametrize("damage", ["cut short", "not Parquet", "empty"])
def test_a_shard_that_does_not_open_is_set_aside_named_and_the_others_are_read(tmp_path, caplog, damage):
    """A copy cut short, a file of another kind, an empty file: every command that reads
    shards gets the others and the set-aside one with why (`Shards.set_aside`), and a warning
    names it."""
    paths = write_split(tmp_path / "data" / "train", 3)
    broken = paths[1]
    broken.write_bytes({"cut short": broken.read_bytes()[:-40], "not Parquet": b'{"id": "a"}', "empty": b""}[damage])
    with caplog.at_level(logging.WARNING):
        shards = shard_files(tmp_path, "train")
    assert shards.files == [paths[0], paths[2]]
    assert list(shards.set_aside) == [str(broken)] and shards.set_aside[str(broken)].startswith("not a readable Parquet file (")
    assert [r.getMessage() for r in caplog.records if str(broken) in r.getMessage()] == [
        f"{broken}: set aside, {shards.set_aside[str(broken)]}; the other shards are read (copy the dataset again, or build it "
        "again: the build writes the same bytes)"]
    assert len(list(iter_rows(shards.files))) == 40


def test_no_shard_that_opens_is_an_error_naming_the_folder(tmp_path):
    for path in write_split(tmp_path / "data" / "test", 2):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CurationError, match=r"data/test: no shard can be read: not a readable Parquet file \(.+\); copy the dataset again"):
        shard_files(tmp_path, "test")


def test_a_shard_whose_rows_do_not_read_stops_the_reader_naming_it(tmp_path):
    """Bytes changed inside a row group: the footer opens, so only reading the rows finds it."""
    path = write_split(tmp_path / "data" / "train", 1)[0]
    chunk = pq.read_metadata(path).row_group(2).column(0)
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset : chunk.data_page_offset + chunk.total_compressed_size] = b"\xff" * chunk.total_compressed_size
    path.write_bytes(bytes(data))
    assert shard_files(tmp_path).files == [path]
    rows = iter_rows([path], batch_rows=5)
    assert len([next(rows) for _ in range(10)]) == 10  # the first two row groups
    with pytest.raises(CurationError, match=rf"^{path}: its rows do not read \(.+\): the file is damaged; copy the dataset again"):
        next(rows)


IMAGES = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


@pytest.mark.parametrize("columns, problem", [
    ({"id": pa.large_string(), "images": pa.large_list(pa.struct([("bytes", pa.large_binary()), ("path", pa.string_view()),
                                                                  ("width", pa.int32())]))}, None),  # a rewrite by polars
    ({"id": pa.dictionary(pa.int32(), pa.string()), "images": IMAGES}, None),  # pandas' categorical
    ({"id": pa.null(), "images": IMAGES}, None),  # every value null
    ({"images": IMAGES}, "no id column"),
    ({"id": pa.string(), "images": pa.list_(pa.string())},  # LLaVA's JSON turned to Parquet: image paths
     "images is list<string>, not list<struct<bytes: binary, path: string>>"),
    ({"id": pa.int64(), "images": pa.list_(pa.struct([("path", pa.string())]))},
     "id is int64, not string; images is list<struct<path: string>>, not list<struct<bytes: binary, path: string>>"),
])
def test_a_shard_without_the_columns_a_command_reads_is_set_aside_saying_which(tmp_path, caplog, columns, problem):
    """The columns a command reads are checked in the footer, so a dataset from another tool, or
    one written before a column existed, is set aside with what it lacks instead of failing at
    its first row; forms that read as the same Python values (large, view, dictionary, extra
    struct fields, all null) are read."""
    good, other = write_split(tmp_path / "data" / "train", 2)
    pq.write_table(pa.table({"id": ["a"], "images": pa.array([[{"bytes": b"png", "path": None}]], IMAGES)}), good)
    pq.write_table(pa.table({name: pa.nulls(2, type) for name, type in columns.items()}), other)
    with caplog.at_level(logging.WARNING):
        shards = shard_files(tmp_path, columns=["id", "images"])
    if problem is None:
        assert shards.files == [good, other] and not shards.set_aside and not caplog.records
        return
    assert shards.files == [good] and shards.set_aside == {str(other): f"not the rows this command reads ({problem})"}
    assert [r.getMessage() for r in caplog.records] == [
        f"{other}: set aside, not the rows this command reads ({problem}); the other shards are read (a dataset from another tool, "
        "or written before this version's columns: build it again)"]
    caplog.clear()
    assert shard_files(tmp_path, columns=["id", "images"], warn=False).files == [good] and not caplog.records
    good.unlink()
    with pytest.raises(CurationError, match=rf"^{tmp_path / 'data'}: no shard can be read: not the rows this command reads"):
        shard_files(tmp_path, columns=["id", "images"])


@pytest.mark.parametrize("how", ["rebuilt", "removed"])
def test_a_shard_replaced_after_the_command_found_it_stops_the_reader_naming_it(tmp_path, how):
    """A build into the same folder swaps in a new dataset under a reader that has the old
    one's paths: read on, it would mix the two (the new files at the old paths). With the
    stamps `shard_files` took, the reader stops at the first file that is not what it found."""
    first, second = write_split(tmp_path / "data" / "train", 2)
    shards = shard_files(tmp_path)
    rows = iter_rows(shards.files, stamps=shards.stamps, batch_rows=5)
    assert len([next(rows) for _ in range(20)]) == 20  # the first shard, read whole
    if how == "rebuilt":
        pq.write_table(pa.table({"id": [f"new-{i}" for i in range(20)]}), second, row_group_size=5)
    else:
        second.unlink()
    with pytest.raises(CurationError, match=rf"^{second}: replaced since this command started \(a build into the same folder\?\)"):
        next(rows)
    assert len(list(iter_rows(shard_files(tmp_path).files))) == 40 - 20 * (how == "removed")  # a new command reads the new dataset
