"""Train/val/test by patient: a keyed hash of the `patient_key` decides, so every item of a
patient lands in the same split, the same patient gets the same split on every build, and
nobody can steer a patient into a split without the secret.

The hash is drawn once per patient (not per item) and compared with the manifest's fractions:
`u < test` → test, `u < test + val` → val, else train. Fractions hold in expectation; a small
archive may have no val or test patient at all.
"""

from __future__ import annotations

from curation.keys import Keyer
from curation.manifest import SplitSpec

SPLITS: tuple[str, ...] = ("train", "val", "test")


def unit_interval(key: str) -> float:
    """A hex digest (as `Keyer` returns) as a number in [0, 1).

    >>> unit_interval("0000000000000000"), unit_interval("8000000000000000")
    (0.0, 0.5)
    """
    return int(key[:16], 16) / 16**16


def split_of(patient_key: str, spec: SplitSpec, keyer: Keyer, seed: int) -> str:
    """The split of a patient.

    >>> s = SplitSpec(val=0.2, test=0.2)
    >>> split_of("p1", s, Keyer("k"), 7) == split_of("p1", s, Keyer("k"), 7)
    True
    >>> sorted({split_of(f"p{i}", s, Keyer("k"), 7) for i in range(50)})
    ['test', 'train', 'val']
    """
    u = unit_interval(keyer("split", seed, patient_key))
    if u < spec.test:
        return "test"
    if u < spec.test + spec.val:
        return "val"
    return "train"
