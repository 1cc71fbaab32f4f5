"""More cases without drawing more phantoms: copies of drawn cases under new identities.

A scale benchmark needs tens of thousands of files, and drawing a phantom costs 20 ms (a chest
X-ray) to 1 s (a CT study written slice by slice with pydicom). A copy costs a file write: CT
files are copied byte for byte with every identifying value replaced *in place* by one of the
same length (DICOM elements keep their lengths, so the files stay valid), only in the header
(before the pixel data): each `2.25.…` UID by another of its length, and each identifier of the
drawn patient (`Identity`) by the new patient's, padded or cut to fit. A copy is its own patient
(new PatientID, new study, new series, new SOP instances); its ground truth is that of the case
it copies (`copy_of`). Brain MRI cases and chest X-rays carry no identifiers in their files;
their copies are the same bytes under the new case's name and patient.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path
from typing import Any

from curation.demo.brain import SEQUENCES, case_id
from curation.demo.cxr import CXR_LABELS, patient_of
from curation.demo.identity import fake_identity
from curation.ingest.dicom_quick import quick_header

_UID = rb"2\.25\.[0-9]+"


def reidentify(data: bytes, replacements: dict[bytes, bytes], salt: str) -> bytes:
    """`data` (a DICOM file) with, in its header only, each `2.25.` UID replaced by one of the same
    length derived from it and `salt`, and each key of `replacements` by its value (same length),
    in one pass (a replacement is never replaced again)."""
    import io

    head = quick_header(io.BytesIO(data), len(data))
    end = head.pixel_offset if head is not None and head.pixel_offset is not None else len(data)
    literals = sorted(replacements, key=len, reverse=True)
    pattern = re.compile(b"|".join([_UID, *(re.escape(k) for k in literals)]))

    def swap(m: re.Match[bytes]) -> bytes:
        found = m.group(0)
        return replacements[found] if found in replacements else _same_length_uid(found, salt)

    return pattern.sub(swap, data[:end]) + data[end:]


def _same_length_uid(uid: bytes, salt: str) -> bytes:
    digits = len(uid) - 5
    number = int.from_bytes(hashlib.sha256(uid + salt.encode()).digest(), "big") % (9 * 10 ** (digits - 1)) + 10 ** (digits - 1)
    return b"2.25." + str(number).encode()


def _fit(new: str, old: str) -> bytes:
    return new.ljust(len(old))[: len(old)].encode("latin-1")


def extend_ct(out: Path, drawn: dict[str, Any], total: int, seed: int) -> dict[str, Any]:
    """CT cases `len(drawn cases)` … `total - 1`, each a copy of drawn case `n % drawn`."""
    pool = drawn["cases"]
    cases, files = list(pool), drawn["files"]
    skip = {drawn["truncated"]["file"]} if drawn["truncated"] else set()
    for n in range(len(pool), total):
        source = pool[n % len(pool)]
        record, written = _copy_ct_case(out, source, n, seed, skip)
        cases.append(record)
        files += written
    return {**drawn, "cases": cases, "files": files}


def _copy_ct_case(out: Path, source: dict[str, Any], case: int, seed: int, skip: set[str]) -> tuple[dict[str, Any], int]:
    """Every file of the drawn case's study (but `skip`: the archive's one truncated file) under
    the new patient's folder, re-identified."""
    old, new = source["identifiers"], fake_identity(seed, case).identifiers()
    replacements = {old[k].encode("latin-1"): _fit(new[k], old[k]) for k in old if old[k]}
    salt = f"copy-{seed}-{case}"
    new_id = replacements[old["patient_id"].encode()].decode("latin-1")
    moved: dict[str, str] = {}
    folder = out / "ct" / source["patient_id"]
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(out / "ct").as_posix()
        if f"ct/{rel}" in skip:
            continue
        target = f"{new_id}/{rel.split('/', 1)[1]}"
        (out / "ct" / target).parent.mkdir(parents=True, exist_ok=True)
        (out / "ct" / target).write_bytes(reidentify(path.read_bytes(), replacements, salt))
        moved[f"ct/{rel}"] = f"ct/{target}"
    uid = {k: _same_length_uid(source[k].encode(), salt).decode() for k in ("study_uid", "series_uid")}
    label = f"ct_labels/{uid['series_uid']}.nii.gz"
    shutil.copyfile(out / source["label_file"], out / label)
    record = {**source, "case": case, "copy_of": source["case"], "patient_id": new_id, **uid, "label_file": label,
              "files": [moved[f] for f in source["files"]],
              "identifiers": {k: replacements[v.encode("latin-1")].decode("latin-1").strip() if v else v for k, v in old.items()}}
    for part in ("localizer", "secondary_capture"):
        record[part] = {**source[part], "series_uid": _same_length_uid(source[part]["series_uid"].encode(), salt).decode(),
                        "files": [moved[f] for f in source[part]["files"]]}
    return record, len(moved)


def extend_brain(out: Path, drawn: list[dict[str, Any]], total: int) -> list[dict[str, Any]]:
    """Brain cases up to `total`, each a copy of drawn case `n % drawn` under its own case id."""
    cases = list(drawn)
    for n in range(len(drawn), total):
        source = drawn[n % len(drawn)]
        cid = case_id(n)
        folder = out / "brain" / cid
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for seq in (*SEQUENCES, "seg"):
            shutil.copyfile(out / "brain" / source["case_id"] / f"{source['case_id']}_{seq}.nii.gz", folder / f"{cid}_{seq}.nii.gz")
            files[seq] = f"brain/{cid}/{cid}_{seq}.nii.gz"
        cases.append({**source, "case_id": cid, "patient_id": cid, "copy_of": source["case_id"], "seg": files.pop("seg"), "files": files})
    return cases


def extend_cxr(out: Path, drawn: dict[str, Any], total: int) -> dict[str, Any]:
    """Chest X-rays up to `total`: image n is a copy of drawn image `n % drawn`, of patient
    `patient_of(n)` (several images per patient, as drawn images are)."""
    images, rows = list(drawn["images"]), list(drawn["rows"])
    by_image = {r[0]: r for r in drawn["rows"]}
    pool = drawn["images"]
    for n in range(len(pool), total):
        source = pool[n % len(pool)]
        image = f"images/cxr_{n + 1:04d}.png"
        shutil.copyfile(out / "cxr" / source["image"], out / "cxr" / image)
        patient = patient_of(n)
        images.append({**source, "image": image, "patient_id": patient, "copy_of": source["image"]})
        rows.append([image, patient, *by_image[source["image"]][2:2 + len(CXR_LABELS)]])
    return {**drawn, "images": images, "rows": rows}
