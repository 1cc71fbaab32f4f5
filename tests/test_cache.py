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
