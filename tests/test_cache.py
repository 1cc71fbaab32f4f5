from pathlib import Path

from curation.store.cache import FindingsCache, content_hash
from curation.items import StudyItem
from curation.findings import ClassResult, Findings, Image


def item(uris: list[str]) -> StudyItem:
    return StudyItem(item_id="i", patient_key="p", study_key="s", source="src", kind="image2d", modality="CR",
                     shape=[2, 2], spacing=[1.0, 1.0], n_files=len(uris), uris=uris)


def test_content_hash_follows_bytes(tmp_path: Path):
    (tmp_path / "a.png").write_bytes(b"one")
    first = content_hash(item(["a.png"]), tmp_path)
    assert first == content_hash(item(["a.png"]), tmp_path)
    (tmp_path / "a.png").write_bytes(b"two")
    assert content_hash(item(["a.png"]), tmp_path) != first


def test_round_trip_keyed_by_fingerprint_and_args(tmp_path: Path):
    cache = FindingsCache(tmp_path)
    f = Findings(expert="CXR", runner="cxr_ensemble", classes=[ClassResult("Effusion", 0.8, True)],
                 images=[Image(kind="key_slice", png=b"\x89PNG fake")])
    cache.put("c0ffee", "fp1", f, args="organs")
    assert cache.get("c0ffee", "fp1", "organs") == f
    assert cache.get("c0ffee", "fp1", "everything") is None
    assert cache.get("c0ffee", "fp2", "organs") is None
    assert not list(tmp_path.rglob("*.tmp"))


def test_an_entry_that_does_not_read_is_moved_aside_named_and_made_again(tmp_path: Path, caplog):
    """Cached findings cut short (a failing disk) or changed by hand: the build sets the item's
    conversations aside for this run with the reason (its ledger and card), the warning names
    the file, and the entry is moved aside, so the next build runs the expert again; a damaged
    failure record or expert registry counts as none. Before, each was a JSON traceback that
    ended the build, `render` and `preview`."""
    import logging
    from types import SimpleNamespace

    from curation.build.stages import _cached_result
    from curation.store.cache import DAMAGED

    cache = FindingsCache(tmp_path)
    f = Findings(expert="CXR", runner="cxr_ensemble", classes=[ClassResult("Effusion", 0.8, True)],
                 images=[Image(kind="key_slice", png=b"\x89PNG fake")])
    entry = cache.put("c0ffee", "fp1", f, args="")
    entry.write_bytes(entry.read_bytes()[:-30])
    with caplog.at_level(logging.WARNING):
        result = _cached_result("CXR", "", "c0ffee", SimpleNamespace(fingerprints={"CXR": "fp1"}), cache, report=None)
    assert result.findings is None and result.status == "quarantined"
    assert result.reason.startswith("CXR(): its cached findings did not read (JSONDecodeError: ") and result.reason.endswith(
        ") and were moved aside: the next build runs CXR again") and str(tmp_path) not in result.reason  # reasons reach the card
    assert [r.getMessage().split(": does not read (")[0] for r in caplog.records] == [str(entry)]
    assert not cache.has("c0ffee", "fp1") and not cache.settled("c0ffee", "fp1")  # the next build runs it
    assert entry.with_name(entry.name + DAMAGED).is_file()
    cache.put("c0ffee", "fp1", f)
    assert cache.get("c0ffee", "fp1") == f

    error = cache.put_error("bad", "fp1", "load failed: truncated")
    error.write_text('{"status": "quarant')
    assert cache.get_error("bad", "fp1") is None and not cache.settled("bad", "fp1")
    cache.register([{"spec": {"name": "CXR"}, "fingerprint": "fp1"}])
    cache.registry_path.write_text("[{")
    assert cache.experts() == []
    cache.register([{"spec": {"name": "CXR"}, "fingerprint": "fp1"}])
    assert cache.experts() == [{"spec": {"name": "CXR"}, "fingerprint": "fp1"}]


def test_a_byte_changed_in_an_entry_that_still_reads_as_json_is_found(tmp_path: Path):
    """A digit changed on disk (a failing disk, an edit) leaves valid JSON with another volume
    or probability, which an answer would state as the expert's: the entry's seal (sha256 of
    its contents) finds it, and it is moved aside as one that does not read. Entries written
    before the seal are read as they are."""
    import json

    import pytest

    from curation.store.cache import SEAL, DamagedEntry

    cache = FindingsCache(tmp_path)
    f = Findings(expert="CXR", runner="cxr_ensemble", classes=[ClassResult("Effusion", 0.8125, True)])
    entry = cache.put("c0ffee", "fp1", f)
    text = entry.read_text()
    assert "0.8125" in text and json.loads(text)[SEAL]
    entry.write_text(text.replace("0.8125", "0.3125"))
    with pytest.raises(DamagedEntry, match=r"ValueError: its contents do not match their sha256"):
        cache.get("c0ffee", "fp1")
    assert not cache.has("c0ffee", "fp1")
    unsealed = {k: v for k, v in json.loads(text).items() if k != SEAL}
    entry.write_text(json.dumps(unsealed))
    assert cache.get("c0ffee", "fp1") == f
