"""One output layout for every command: what is shareable, what is internal, and where the cache is."""

from __future__ import annotations

import pytest

from curation.errors import CurationError
from curation.manifest import BuildSpec
from curation.store.layout import Layout, shard_files


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
    part.write_bytes(b"")
    assert shard_files(tmp_path / given) == shard_files(tmp_path / given, "train") == [part]
    with pytest.raises(CurationError, match="no shards for split 'test'.*splits with shards here: train"):
        shard_files(tmp_path / given, "test")


def test_a_folder_without_shards_is_named(tmp_path):
    with pytest.raises(CurationError, match="no shards"):
        shard_files(tmp_path)
    with pytest.raises(CurationError, match="no such folder"):
        shard_files(tmp_path / "missing")
