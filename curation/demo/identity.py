"""Seeded randomness, deterministic DICOM UIDs and fake patient identifiers.

The demo archive must be byte-identical for the same `(cases, seed)`, so nothing here reads the
clock, `uuid4` or global random state. Each part of the archive draws from its own generator,
`part_rng(seed, part, *keys)`: changing how many CXR images are drawn never changes a CT phantom,
and `ct_phantom(seed, 3)` is the same whether the archive has 4 cases or 40.

The identifiers look like a real archive's (names, MRNs, accession numbers, dates, institution)
so that de-identification can be tested; every one of them is listed in `ground_truth.json`
so a test can grep outputs for each string.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import asdict, dataclass

import numpy as np

PARTS = {"archive": 0, "ct": 1, "brain": 2, "cxr": 3, "identity": 4, "dicom": 5}
UID_NAMESPACE = "m3-curate-demo"


def part_rng(seed: int, part: str, *keys: int) -> np.random.Generator:
    """A generator for one part of the archive (`PARTS`), e.g. `part_rng(seed, "ct", case)`.

    >>> float(part_rng(0, "ct", 1).random()) == float(part_rng(0, "ct", 1).random())
    True
    >>> float(part_rng(0, "ct", 1).random()) == float(part_rng(0, "ct", 2).random())
    False
    """
    return np.random.default_rng([int(seed), PARTS[part], *(int(k) for k in keys)])


def has_lesion(seed: int, part: str, case: int) -> bool:
    """Whether `case` of `part` carries a lesion: alternating cases from a seeded start, so any
    two consecutive cases hold one with and one without, whatever the archive size, and the
    answer for a case never depends on how many cases the archive has.

    >>> [has_lesion(0, "ct", c) for c in range(4)].count(True)
    2
    """
    return (int(case) + int(part_rng(seed, part).integers(2))) % 2 == 0


def demo_uid(seed: int, *parts: object) -> str:
    """A deterministic DICOM UID under the `2.25` root (an integer from a hash, as PS3.5 B.2
    allows for UUID-derived UIDs): same parts, same UID; at most 44 characters.

    >>> demo_uid(0, "study", 1) == demo_uid(0, "study", 1) != demo_uid(1, "study", 1)
    True
    >>> demo_uid(0, "x").startswith("2.25.") and len(demo_uid(0, "x")) <= 64
    True
    """
    text = "\x1f".join([UID_NAMESPACE, str(int(seed)), *(str(p) for p in parts)])
    return "2.25." + str(int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "big"))


_LAST = ("HARTWELL", "OKONKWO", "LINDQVIST", "MARCHETTI", "TANAKA", "FAIRWEATHER", "DELACROIX",
         "ABERNATHY", "KOWALCZYK", "VANDERMEER", "OYELARAN", "ST.CLAIR", "BRANDSTETTER", "QUINTERO",
         "MCALLISTER", "HOLLOWAY", "ZIMMERLI", "PENDERGAST", "NAKASHIMA", "THORNBURY")
_FEMALE = ("JANE", "MARGARETHE", "ADAEZE", "PRISCILLA", "YUKIKO", "ROSALIND", "INGRID", "BEATRIZ")
_MALE = ("JOHN", "BARTHOLOMEW", "CHUKWUEMEKA", "LEOPOLD", "HIROSHI", "CORNELIUS", "ANDERS", "RAFAEL")
_TOWNS = ("Millbrook", "Ashford Vale", "Port Elspeth", "Greyhaven", "Linden Falls", "Harrowgate")
_STREETS = ("Juniper Lane", "Foundry Road", "Wexley Avenue", "Old Mill Street", "Canal Parade")
_DOCTORS = ("OSTROWSKI^HELENA^^DR", "ABERCROMBIE^NEIL^^DR", "VASQUEZ-MORA^ELENA^^DR", "KIPLING^RUTH^^DR")


@dataclass(frozen=True, slots=True)
class Identity:
    """One fake patient's header identifiers, in DICOM value formats (dates YYYYMMDD)."""

    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    patient_age: str
    accession_number: str
    study_id: str
    study_date: str
    study_time: str
    institution_name: str
    institution_address: str
    referring_physician_name: str
    operators_name: str
    station_name: str
    device_serial_number: str

    def identifiers(self) -> dict[str, str]:
        """Every distinctive identifying string (not sex or age): what de-identification must
        keep out of every output, and what a test can grep for."""
        values = asdict(self)
        return {k: v for k, v in values.items() if k not in ("patient_sex", "patient_age")}

    def demographics(self) -> dict[str, str]:
        return {"patient_sex": self.patient_sex, "patient_age": self.patient_age}


def fake_identity(seed: int, case: int) -> Identity:
    """Identifiers for CT patient `case`; distinct across cases of one archive.

    PatientIDs are `MRN` + 7 digits, consecutive-ish like a hospital's registration numbers and
    unique within an archive (the step 7919 is prime, so no two cases below 10⁷ collide).

    >>> a, b = fake_identity(0, 0), fake_identity(0, 1)
    >>> a.patient_id != b.patient_id and a.patient_id.startswith("MRN") and len(a.patient_id) == 10
    True
    >>> fake_identity(0, 0) == a
    True
    """
    base = part_rng(seed, "identity").integers(1_000_000, 9_000_000)
    rng = part_rng(seed, "identity", case)
    sex = "F" if rng.random() < 0.5 else "M"
    first = rng.choice(_FEMALE if sex == "F" else _MALE)
    last = _LAST[(int(rng.integers(len(_LAST))) + 7 * case) % len(_LAST)]
    study = dt.date(2016, 1, 1) + dt.timedelta(days=int(rng.integers(0, 8 * 365)))
    age = int(rng.integers(34, 86))
    birth = study - dt.timedelta(days=age * 365 + int(rng.integers(30, 330)))
    age = (study - birth).days // 365
    town = rng.choice(_TOWNS)
    seconds = int(rng.integers(7 * 3600, 19 * 3600))
    return Identity(
        patient_name=f"{last}^{first}",
        patient_id=f"MRN{(base + 7919 * case) % 10_000_000:07d}",
        patient_birth_date=birth.strftime("%Y%m%d"),
        patient_sex=sex,
        patient_age=f"{age:03d}Y",
        accession_number=f"A{study:%y%m%d}{int(rng.integers(10_000, 99_999))}",
        study_id=f"CT{int(rng.integers(100_000, 999_999))}",
        study_date=study.strftime("%Y%m%d"),
        study_time=f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}.{int(rng.integers(0, 10**6)):06d}",
        institution_name=f"{town} General Hospital",
        institution_address=f"{int(rng.integers(2, 999))} {rng.choice(_STREETS)}, {town}",
        referring_physician_name=str(rng.choice(_DOCTORS)),
        operators_name=f"TECH^{rng.choice(_MALE + _FEMALE)}",
        station_name=f"CT{int(rng.integers(1, 9))}{town.split()[0][:4].upper()}",
        device_serial_number=f"SN{int(rng.integers(10**6, 10**7))}",
    )
