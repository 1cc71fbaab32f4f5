"""NIfTI sources: single volumes (`nifti`) and one case's sequences (`nifti_group`).

Only headers are read at scan time (nibabel loads lazily), so indexing a large NIfTI archive
costs one small read per file.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import numpy as np

from curation.errors import ItemError
from curation.ingest.base import Scan, SourceReader
from curation.items import StudyItem, Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(uri: str) -> bool:
    return uri.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(uri: str) -> str:
    name = Path(uri).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


def read_header(path: Path) -> nib.Nifti1Image:
    """Open lazily; raise ItemError with a one-line reason when the file is not usable NIfTI."""
    try:
        img = nib.load(path)
        img.header.get_data_shape()
        return img
    except Exception as e:  # nibabel raises many kinds for bad files
        raise ItemError(str(path), f"corrupt: not a readable NIfTI file ({type(e).__name__}: {e})".replace("\n", " "))


def load_nifti(path: Path, frame: int | None = None) -> Volume:
    """Voxels with the file's scaling applied, and its (RAS) affine."""
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj[..., frame] if frame is not None else img.dataobj)
    except Exception as e:
        raise ItemError(str(path), f"cannot read voxels ({type(e).__name__}: {e})".replace("\n", " ")) from e
    return Volume(array=np.asarray(data), affine=np.asarray(img.affine, dtype=np.float64))


class NiftiReader(SourceReader):
    """Each 3D file is an item; a 4D file is split into its volumes or set aside (`split_4d`)."""

    kind = "nifti"

    def scan(self, files: list[str]) -> Scan:
        scan = Scan()
        for uri in filter(is_nifti, files):
            try:
                img = read_header(self.root / uri)
            except ItemError as e:
                scan.ledger.append(self.entry(uri, "quarantined", e.reason))
                continue
            shape = img.header.get_data_shape()
            if len(shape) == 4 and shape[3] == 1:
                shape = shape[:3]
            if len(shape) == 3:
                frames: list[int | None] = [None]
            elif len(shape) == 4 and self.spec.split_4d:
                frames = list(range(shape[3]))
            elif len(shape) == 4:
                scan.ledger.append(self.entry(uri, "skipped", f"4D volume ({shape[3]} volumes); set split_4d: true to use each volume"))
                continue
            else:
                scan.ledger.append(self.entry(uri, "skipped", f"not a 3D volume (shape {list(shape)})"))
                continue
            items = [self._item(uri, img, shape[:3], f) for f in frames]
            scan.items.extend(items)
            scan.ledger.append(self.entry(uri, "indexed", "volume" if len(items) == 1 else f"4D split into {len(items)} volumes", items[0].item_id))
        return scan

    def _patient(self, uri: str) -> str:
        pattern = self.spec.patient_pattern
        if pattern:
            m = re.search(pattern, uri)
            if m and "patient" in m.groupdict():
                return m.group("patient")
        return nifti_stem(uri)

    def _item(self, uri: str, img: nib.Nifti1Image, shape: tuple[int, ...], frame: int | None) -> StudyItem:
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
        return StudyItem(
            item_id=self.keyer("item", self.spec.name, uri, frame),
            patient_key=self.keyer("patient", self._patient(uri)),
            study_key=self.keyer("study", self.spec.name, uri),
            source=self.spec.name,
            kind="nifti",
            modality=self.spec.modality,
            shape=[int(s) for s in shape],
            spacing=zooms,
            n_files=1,
            uris=[uri],
            frame=frame,
        )

    def load(self, item: StudyItem) -> Volume:
        return load_nifti(self.root / item.uris[0], item.frame)


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """`{case}/{case}_{channel}.nii.gz` → a regex with named groups; repeats of `{case}` must
    match the same text.

    >>> pattern_regex("{case}/{case}_{channel}.nii.gz").fullmatch("A1/A1_t1c.nii.gz").group("channel")
    't1c'
    """
    out, seen = "", set()
    for part in re.split(r"(\{case\}|\{channel\})", pattern):
        if part in ("{case}", "{channel}"):
            name = part[1:-1]
            out += f"(?P={name})" if name in seen else f"(?P<{name}>[^/]+?)"
            seen.add(name)
        else:
            out += re.escape(part)
    return re.compile(out)


class NiftiGroupReader(SourceReader):
    """One case's sequences (e.g. T1c, T1, T2, FLAIR) become one multi-channel item.

    A case missing a channel, or whose sequences disagree in grid, is set aside whole: an
    expert given three of four sequences would answer something, but not the truth.
    """

    kind = "nifti_group"

    def scan(self, files: list[str]) -> Scan:
        scan = Scan()
        regex = pattern_regex(self.spec.pattern)
        wanted = list(self.spec.channels) + ([self.spec.labels] if self.spec.labels else [])
        cases: dict[str, dict[str, str]] = defaultdict(dict)
        for uri in filter(is_nifti, files):
            m = regex.fullmatch(uri)
            if not m:
                scan.ledger.append(self.entry(uri, "skipped", f"file name does not match pattern {self.spec.pattern!r}"))
            elif m.group("channel") not in wanted:
                scan.ledger.append(self.entry(uri, "skipped", f"channel {m.group('channel')!r} is not one of {wanted}"))
            else:
                cases[m.group("case")][m.group("channel")] = uri
        for case in sorted(cases):
            self._case(case, cases[case], scan)
        return scan

    def _case(self, case: str, found: dict[str, str], scan: Scan) -> None:
        uris = list(found.values())
        missing = [c for c in self.spec.channels if c not in found]
        if missing:
            scan.ledger.extend(self.entry(u, "skipped", f"incomplete case: missing {', '.join(missing)}") for u in uris)
            return
        try:
            headers = {c: read_header(self.root / u) for c, u in found.items()}
        except ItemError as e:
            scan.ledger.extend(self.entry(u, "quarantined", f"case has an unreadable file: {e}") for u in uris)
            return
        problem = self._disagreement(headers)
        if problem:
            scan.ledger.extend(self.entry(u, "quarantined", problem) for u in uris)
            return
        first = headers[self.spec.channels[0]]
        item = StudyItem(
            item_id=self.keyer("item", self.spec.name, case),
            patient_key=self.keyer("patient", case),
            study_key=self.keyer("study", self.spec.name, case),
            source=self.spec.name,
            kind="nifti_group",
            modality=self.spec.modality,
            shape=[int(s) for s in first.shape[:3]],
            spacing=[float(z) for z in first.header.get_zooms()[:3]],
            n_files=len(found),
            uris=[found[c] for c in self.spec.channels],
            channels=list(self.spec.channels),
            label_uri=found.get(self.spec.labels) if self.spec.labels else None,
        )
        scan.items.append(item)
        for c, u in found.items():
            reason = "ground-truth label map" if c == self.spec.labels else f"sequence {c}"
            scan.ledger.append(self.entry(u, "indexed", reason, item.item_id))

    @staticmethod
    def _disagreement(headers: dict[str, nib.Nifti1Image]) -> str | None:
        ref_name, ref = next(iter(headers.items()))
        for name, img in headers.items():
            if len(img.shape) != 3:
                return f"sequence {name} is not 3D (shape {list(img.shape)})"
            if img.shape != ref.shape:
                return f"sequences disagree in shape: {ref_name} {list(ref.shape)} vs {name} {list(img.shape)}"
            if not np.allclose(img.affine, ref.affine, atol=1e-3):
                return f"sequences disagree in affine: {ref_name} vs {name}"
        return None

    def load(self, item: StudyItem) -> Volume:
        vols = [load_nifti(self.root / u) for u in item.uris]
        array = np.stack([v.array.astype(np.float32, copy=False) for v in vols], axis=-1)
        return Volume(array=array, affine=vols[0].affine, channels=tuple(item.channels))
