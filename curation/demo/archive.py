"""`write_demo_archive`: the whole synthetic archive on disk, with its ground truth.

Layout (every path below is relative to the archive folder; the indexer and the demo manifest
rely on it):

    ct/<PatientID>/2/IM<NNNN>.dcm        axial CT series, one file per slice
    ct/<PatientID>/1/IM000<n>.dcm        localizer (1–3 scouts)
    ct/<PatientID>/900/IM0001.dcm        secondary capture (screen save)
    ct/<PatientID of case 0>/99/IM0001.dcm   the one truncated file, a series of its own
    ct_labels/<SeriesInstanceUID>.nii.gz ground truth of each axial series (uint8, VISTA3D ids)
    brain/<case>/<case>_{t1c,t1,t2,flair,seg}.nii.gz
    cxr/images/cxr_<NNNN>.png, cxr/labels.csv
    ground_truth.json

Nothing depends on the clock: the same `(cases, seed, cxr_images)` gives byte-identical files.

Large archives (for scale benchmarks: `--ct 500 --brain 200 --cxr 20000`) take minutes, not
hours: the first `distinct` cases of each kind are drawn as above (in `jobs` processes), and the
rest are copies of them under new identities (`curation.demo.copies`): every DICOM file gets new
UIDs and new patient identifiers, each copy is its own patient, and its ground truth is that of
the case it copies. `ct_size="full"` writes every CT at scanner size (512 × 512, 500 slices).
"""

from __future__ import annotations

import csv
import io
import json
import multiprocessing
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image

from curation.demo.brain import BRATS_LABELS, BRAIN_SPACING, SEQUENCES, brain_phantom, case_id
from curation.demo.ct import CT_LABELS, build_ct
from curation.demo.copies import extend_brain, extend_ct, extend_cxr
from curation.demo.cxr import CXR_LABELS, cxr_phantom
from curation.demo.dicom import (AXIAL_SERIES, LOCALIZER_SERIES, CAPTURE_SERIES, TRUNCATED_SERIES, study_uids,
                                 write_ct_study, write_truncated)
from curation.demo.identity import fake_identity, part_rng
from curation.errors import CurationError
from curation.signals import command_pool

GENERATOR = "m3-curate demo-archive"
FORMAT_VERSION = 1
PARTS = ("ct", "ct_labels", "brain", "cxr", "ground_truth.json")


def write_demo_archive(out: Path, *, cases: int = 4, seed: int = 0, cxr_images: int | None = None,
                       ct_cases: int | None = None, brain_cases: int | None = None, distinct: int | None = None,
                       jobs: int = 1, ct_size: str = "demo") -> dict[str, Any]:
    """Write a synthetic imaging archive with ground truth under `out`; return a summary.

    `cases` CT patients and `cases` brain MRI cases (`ct_cases`, `brain_cases` override each);
    `cxr_images` chest X-rays (default `max(16, 8 * cases)`). `distinct`: draw at most this many
    cases of each kind (chest X-rays: 16 times as many) and copy them for the rest; `jobs`:
    processes drawing them; `ct_size`: "demo" (128 × 128, 40–48 slices) or "full" (512 × 512,
    500 slices). `out` must be empty, absent, or a previous demo archive (whose parts are
    replaced; anything else in it is left alone).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     summary = write_demo_archive(Path(d), cases=1)
    >>> summary["ct"]["patients"], summary["brain"]["cases"], summary["cxr"]["images"]
    (1, 1, 16)
    """
    out = Path(out)
    n_ct = cases if ct_cases is None else ct_cases
    n_brain = cases if brain_cases is None else brain_cases
    n_cxr = max(16, 8 * cases) if cxr_images is None else cxr_images
    _check_arguments(cases, seed, cxr_images)
    _check_counts(n_ct, n_brain, distinct, jobs, ct_size)
    _prepare(out)
    plan = _Plan(out, seed, ct_size == "full", *_pools(n_ct, n_brain, n_cxr, distinct))
    ct, brain, cxr = _draw(plan, jobs)
    ct = extend_ct(out, ct, n_ct, seed) if n_ct > plan.ct else ct
    brain = extend_brain(out, brain, n_brain) if n_brain > plan.brain else brain
    cxr = extend_cxr(out, cxr, n_cxr) if n_cxr > plan.cxr else cxr
    _write_labels_csv(out / "cxr", cxr["rows"])
    truth = {"generator": GENERATOR, "format_version": FORMAT_VERSION, "seed": seed, "cases": cases,
             "ct": ct["cases"], "ct_truncated": ct["truncated"], "brain": brain,
             "cxr": {k: v for k, v in cxr.items() if k != "rows"}}
    if (n_ct, n_brain) != (cases, cases) or distinct is not None or ct_size != "demo":
        truth["counts"] = {"ct": n_ct, "brain": n_brain, "cxr": n_cxr, "distinct": distinct, "ct_size": ct_size}
    (out / "ground_truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return {
        "out": str(out),
        "seed": seed,
        "ct": {"patients": n_ct, "files": ct["files"], "label_maps": n_ct, "root": str(out / "ct")},
        "brain": {"cases": n_brain, "files": len(SEQUENCES) * n_brain + n_brain, "root": str(out / "brain")},
        "cxr": {"images": n_cxr, "patients": len({c["patient_id"] for c in cxr["images"]}),
                "labels": str(out / "cxr" / "labels.csv")},
        "ground_truth": str(out / "ground_truth.json"),
        "files": len(files),
    }


@dataclass(frozen=True, slots=True)
class _Plan:
    """What to draw: the folder, the seed, CT at full size or not, and how many cases of each
    kind are drawn (the rest are copies)."""

    out: Path
    seed: int
    full_size: bool
    ct: int
    brain: int
    cxr: int


def _pools(n_ct: int, n_brain: int, n_cxr: int, distinct: int | None) -> tuple[int, int, int]:
    if distinct is None:
        return n_ct, n_brain, n_cxr
    return min(n_ct, distinct), min(n_brain, distinct), min(n_cxr, 16 * distinct)


def _check_counts(n_ct: int, n_brain: int, distinct: int | None, jobs: int, ct_size: str) -> None:
    for name, value in (("--ct", n_ct), ("--brain", n_brain), ("--distinct", distinct if distinct is not None else 1), ("--jobs", jobs)):
        if not isinstance(value, int) or value < 1:
            raise CurationError(f"demo-archive: {name} must be a whole number ≥ 1, got {value!r}")
    if ct_size not in ("demo", "full"):
        raise CurationError(f"demo-archive: --ct-size is demo or full, got {ct_size!r}")


def _draw(plan: _Plan, jobs: int) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """Draw the distinct cases, in `jobs` processes (each case's bytes depend on its seed and
    number alone, so the split does not matter). A Ctrl-C or SIGTERM ends the workers with the
    command, rather than after their parts (`command_pool`)."""
    parts: list[tuple[str, range]] = [("ct", r) for r in _chunks(plan.ct, jobs)] + [("brain", r) for r in _chunks(plan.brain, jobs)]
    parts += [("cxr", r) for r in _chunks(plan.cxr, jobs)]
    if jobs == 1:
        results = [_draw_part(plan, kind, r) for kind, r in parts]
    else:
        with command_pool(multiprocessing.get_context("spawn"), jobs) as pool:
            results = pool.starmap(_draw_part, [(plan, kind, r) for kind, r in parts], chunksize=1)
    ct = {"cases": [], "truncated": {}, "files": 0}
    brain: list[dict[str, Any]] = []
    cxr: dict[str, Any] = {"labels_csv": "cxr/labels.csv", "label_columns": list(CXR_LABELS), "images": [], "rows": []}
    for (kind, _), result in zip(parts, results):
        if kind == "ct":
            ct["cases"] += result["cases"]
            ct["files"] += result["files"]
            ct["truncated"] = ct["truncated"] or result["truncated"]
        elif kind == "brain":
            brain += result
        else:
            cxr["images"] += result["images"]
            cxr["rows"] += result["rows"]
    return ct, brain, cxr


def _chunks(n: int, jobs: int) -> list[range]:
    step = max(1, -(-n // jobs))
    return [range(start, min(n, start + step)) for start in range(0, n, step)]


def _draw_part(plan: _Plan, kind: str, cases: range) -> Any:
    if kind == "ct":
        return _write_ct(plan.out, cases, plan.seed, full_size=plan.full_size)
    if kind == "brain":
        return _write_brain(plan.out, cases, plan.seed)
    return _write_cxr(plan.out, cases, plan.seed)


def _check_arguments(cases: int, seed: int, cxr_images: int | None) -> None:
    if not isinstance(cases, int) or cases < 1:
        raise CurationError(f"demo-archive: --cases must be a whole number ≥ 1, got {cases!r}")
    if not isinstance(seed, int) or seed < 0:
        raise CurationError(f"demo-archive: --seed must be a whole number ≥ 0, got {seed!r}")
    if cxr_images is not None and (not isinstance(cxr_images, int) or cxr_images < 1):
        raise CurationError(f"demo-archive: the number of chest X-rays must be ≥ 1, got {cxr_images!r}")


def _prepare(out: Path) -> None:
    """Refuse to write into a folder holding anything but a previous demo archive, and clear
    that archive's parts so no stale file survives (the tree must match the seed exactly)."""
    if out.exists() and not out.is_dir():
        raise CurationError(f"demo-archive: {out} exists and is not a folder; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        truth = out / "ground_truth.json"
        try:
            previous = json.loads(truth.read_text()).get("generator") if truth.is_file() else None
        except (OSError, ValueError):
            previous = None
        if previous != GENERATOR:
            raise CurationError(f"demo-archive: {out} is not empty and holds no earlier demo archive "
                                f"(no ground_truth.json written by it); give a new or empty folder")
        for part in PARTS:
            path = out / part
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """NIfTI-1 with sform and qform both 'scanner' (code 1) and mm units, gzip deterministic
    (nibabel writes mtime 0)."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _write_ct(out: Path, cases: range, seed: int, *, full_size: bool = False) -> dict[str, Any]:
    root = out / "ct"
    shuffled_case = 0  # case 0 is the untidy one: shuffled InstanceNumbers, the truncated file
    records, n_files, truncated = [], 0, {}
    for case in cases:
        p = build_ct(seed, case)
        if full_size:
            p = p.at_scanner_size()
        ident = fake_identity(seed, case)
        uids = study_uids(seed, case)
        rng = part_rng(seed, "dicom", case)
        files = write_ct_study(root, p, ident, uids, seed, case, shuffle=rng if case == shuffled_case else None,
                               n_localizers=int(rng.integers(1, 4)))
        label_file = f"ct_labels/{uids['axial']}.nii.gz"
        labels, affine = p.converted(p.labels)
        _save_nifti(labels, affine, out / label_file)
        n_files += sum(len(v) for v in files.values())
        counts = np.bincount(p.labels.ravel(), minlength=256)
        structures = {name: {"label": lid, "voxels": int(counts[lid]), "volume_ml": round(float(counts[lid]) * p.voxel_ml, 2)}
                      for name, lid in CT_LABELS.items() if counts[lid]}
        records.append({
            "case": case,
            "patient_id": ident.patient_id,
            "study_uid": uids["study"],
            "series_uid": uids["axial"],
            "series_number": AXIAL_SERIES,
            "files": [f"ct/{f}" for f in files["axial"]],
            "shape": list(p.hu.shape),
            "pixel_spacing_mm": p.pixel_spacing,
            "slice_spacing_mm": p.slice_spacing,
            "affine_ras": affine.round(4).tolist(),
            "instance_order": "shuffled" if case == shuffled_case else "superior_first",
            "label_file": label_file,
            "structures": structures,
            "hepatic_tumor": bool(p.tumours),
            "hepatic_tumor_count": len(p.tumours),
            "hepatic_tumors": p.tumours,
            "localizer": {"series_uid": uids["localizer"], "series_number": LOCALIZER_SERIES,
                          "files": [f"ct/{f}" for f in files["localizer"]]},
            "secondary_capture": {"series_uid": uids["capture"], "series_number": CAPTURE_SERIES,
                                  "files": [f"ct/{f}" for f in files["capture"]]},
            "identifiers": ident.identifiers(),
            "demographics": ident.demographics(),
        })
        if case == 0:
            rel = write_truncated(root, p, ident, uids, seed, case)
            n_files += 1
            truncated = {"file": f"ct/{rel}", "patient_id": ident.patient_id, "series_uid": uids["truncated"],
                         "series_number": TRUNCATED_SERIES}
    return {"cases": records, "truncated": truncated, "files": n_files}


def _write_brain(out: Path, cases: range, seed: int) -> list[dict[str, Any]]:
    records = []
    for case in cases:
        p = brain_phantom(seed, case)
        cid = case_id(case)
        folder = out / "brain" / cid
        files = {}
        for seq in SEQUENCES:
            _save_nifti(p.images[seq], p.affine, folder / f"{cid}_{seq}.nii.gz")
            files[seq] = f"brain/{cid}/{cid}_{seq}.nii.gz"
        _save_nifti(p.seg, p.affine, folder / f"{cid}_seg.nii.gz")
        counts = {name: int((p.seg == lid).sum()) for name, lid in BRATS_LABELS.items()}
        voxel_ml = BRAIN_SPACING**3 / 1000.0
        records.append({
            "case_id": cid,
            "patient_id": cid,
            "files": files,
            "seg": f"brain/{cid}/{cid}_seg.nii.gz",
            "tumor": bool(p.tumour),
            "label_voxels": {str(BRATS_LABELS[n]): v for n, v in counts.items()},
            "whole_tumor_ml": round(sum(counts.values()) * voxel_ml, 2),
            "tumor_core_ml": round((counts["necrotic core"] + counts["enhancing tumour"]) * voxel_ml, 2),
            "enhancing_ml": round(counts["enhancing tumour"] * voxel_ml, 2),
            **({"tumor_geometry": p.tumour} if p.tumour else {}),
        })
    return records


def _write_cxr(out: Path, indices: range, seed: int) -> dict[str, Any]:
    """The chest X-rays `indices` and their rows of the labels table."""
    folder = out / "cxr"
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows, records = [], []
    for index in indices:
        s = cxr_phantom(seed, index)
        image = f"images/cxr_{index + 1:04d}.png"
        Image.fromarray(s.image, mode="L").save(folder / image, format="PNG")
        rows.append([image, s.patient_id, *(s.labels[name] for name in CXR_LABELS)])
        records.append({"image": image, "patient_id": s.patient_id,
                        "positives": [name for name in CXR_LABELS if s.labels[name]],
                        "cardiothoracic_ratio": round(s.chest.ctr, 3), "findings": s.findings})
    return {"images": records, "rows": rows}


def _write_labels_csv(folder: Path, rows: list[list[Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", "patient_id", *CXR_LABELS])
    writer.writerows(rows)
    (folder / "labels.csv").write_text(buffer.getvalue())
