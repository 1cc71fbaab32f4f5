"""Train/val/test by patient: a keyed hash of the `patient_key` decides, so every item of a
patient lands in the same split, the same patient gets the same split on every build, and
nobody can steer a patient into a split without the secret.

The hash is drawn once per patient (not per item) and compared with the manifest's fractions:
`u < test` → test, `u < test + val` → val, else train. Fractions hold in expectation, so a
small source could end up with no val or test patient at all, and its expert would go
unmeasured. `assign_splits` therefore fills the gaps: in every source of at least
`MIN_PATIENTS` patients, each split with a non-zero fraction gets at least one of its patients.
It moves as few patients as it can (one per empty split, taken from a split that keeps
another patient of that source), choosing the patient whose draw lies closest to the empty
split's interval; every other patient keeps its hash split, so a large archive, where no
split is empty, keeps the splits it always had.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable

from curation.keys import Keyer
from curation.manifest import SplitSpec

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
MIN_PATIENTS = 3
"""A source with this many patients or more gets one in every split with a non-zero fraction."""


def unit_interval(key: str) -> float:
    """A hex digest (as `Keyer` returns) as a number in [0, 1).

    >>> unit_interval("0000000000000000"), unit_interval("8000000000000000")
    (0.0, 0.5)
    """
    return int(key[:16], 16) / 16**16


def intervals(spec: SplitSpec) -> dict[str, tuple[float, float]]:
    """The draws that fall into each split: test first, then val, then train.

    >>> intervals(SplitSpec(val=0.1, test=0.2))
    {'test': (0.0, 0.2), 'val': (0.2, 0.30000000000000004), 'train': (0.30000000000000004, 1.0)}
    """
    return {"test": (0.0, spec.test), "val": (spec.test, spec.test + spec.val), "train": (spec.test + spec.val, 1.0)}


def split_at(u: float, spec: SplitSpec) -> str:
    """The split a draw `u` in [0, 1) falls into."""
    if u < spec.test:
        return "test"
    if u < spec.test + spec.val:
        return "val"
    return "train"


def split_of(patient_key: str, spec: SplitSpec, keyer: Keyer, seed: int) -> str:
    """The hash split of a patient (what `assign_splits` keeps unless a source needs it).

    >>> s = SplitSpec(val=0.2, test=0.2)
    >>> split_of("p1", s, Keyer("k"), 7) == split_of("p1", s, Keyer("k"), 7)
    True
    >>> sorted({split_of(f"p{i}", s, Keyer("k"), 7) for i in range(50)})
    ['test', 'train', 'val']
    """
    return split_at(unit_interval(keyer("split", seed, patient_key)), spec)


def assign_splits(patients: Iterable[tuple[str, str]], spec: SplitSpec, keyer: Keyer, seed: int) -> dict[str, str]:
    """The split of every patient of an archive, given as `(source, patient_key)` pairs (one
    per item is fine). A patient found in several sources gets one split.

    Four patients whose hash splits leave `test` and `val` empty get one patient in each; the
    two moved are those whose draws lay closest to those splits:

    >>> s, k = SplitSpec(val=0.1, test=0.1), Keyer("k")
    >>> pts = ["p1", "p3", "p4", "p8"]
    >>> [split_of(p, s, k, 0) for p in pts]
    ['train', 'train', 'train', 'train']
    >>> splits = assign_splits([("ct", p) for p in pts], s, k, 0)
    >>> [splits[p] for p in pts]
    ['test', 'val', 'train', 'train']

    Two patients are too few to ask for three splits; a val fraction of 0 asks for no val:

    >>> assign_splits([("ct", "p1"), ("ct", "p2")], s, k, 0)
    {'p1': 'train', 'p2': 'train'}
    >>> sorted(assign_splits([("ct", p) for p in pts], SplitSpec(val=0, test=0.1), k, 0).values())
    ['test', 'train', 'train', 'train']
    """
    by_source: dict[str, set[str]] = defaultdict(set)
    for source, patient in patients:
        by_source[source].add(patient)
    draw = {p: unit_interval(keyer("split", seed, p)) for ps in by_source.values() for p in ps}
    split = {p: split_at(u, spec) for p, u in sorted(draw.items())}
    sources_of: dict[str, list[str]] = defaultdict(list)
    moved: set[str] = set()
    for source in sorted(by_source, key=lambda s: (len(by_source[s]), s)):  # the most constrained first
        if len(by_source[source]) < MIN_PATIENTS:
            continue
        for p in by_source[source]:
            sources_of[p].append(source)
        for missing in _empty_splits(by_source[source], split, spec):
            candidates = [p for p in by_source[source] if p not in moved and _movable(p, split, by_source, sources_of)]
            if not candidates:
                log.warning("source %r: no patient can move to the empty %s split without emptying a split of another "
                            "source that shares patients with it", source, missing)
                continue
            chosen = min(candidates, key=lambda p: (_distance(draw[p], intervals(spec)[missing]), p))
            split[chosen] = missing
            moved.add(chosen)
    return split


def required_splits(spec: SplitSpec) -> tuple[str, ...]:
    """The splits with a non-zero fraction (train always has one: val + test < 1)."""
    return tuple(s for s in SPLITS if s == "train" or getattr(spec, s) > 0)


def _empty_splits(patients: set[str], split: dict[str, str], spec: SplitSpec) -> list[str]:
    """The required splits none of `patients` is in, test first (the one that measures)."""
    present = {split[p] for p in patients}
    return [s for s in intervals(spec) if s in required_splits(spec) and s not in present]


def _movable(patient: str, split: dict[str, str], by_source: dict[str, set[str]], sources_of: dict[str, list[str]]) -> bool:
    """Whether every source already served that holds `patient` keeps another patient in its split."""
    here = split[patient]
    return all(Counter(split[p] for p in by_source[s])[here] >= 2 for s in sources_of[patient])


def _distance(u: float, interval: tuple[float, float]) -> float:
    lo, hi = interval
    return max(lo - u, u - hi, 0.0)
