"""NIfTI sources: single volumes (`nifti`) and one case's sequences (`nifti_group`).

Only headers are read at scan time (nibabel loads lazily), so indexing a large NIfTI archive
costs one small read per file. A header's declared shape is checked against `max_voxels` at
scan time and again before any voxel is read: a 368-byte file can claim 4096 × 4096 × 1024.

The patient of a `nifti` volume is, in order: the manifest's `patient_pattern`, the `PatientID`
of a JSON sidecar of the same name (as dcm2niix writes with `-ba n`), a BIDS `sub-<label>`
folder or file-name entity, and last the file's stem (one patient per file).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from curation.errors import ItemError
from curation.ingest.base import Record, Scan, SetAside, SizeCaps, SourceReader
from curation.ingest.reasons import describe
from curation.items import StudyItem, Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SIDECAR_MAX_BYTES = 1 << 20  # a JSON sidecar larger than this is not read
BIDS_SUBJECT = re.compile(r"(?:^|[/_])(sub-[A-Za-z0-9]+)")


def is_nifti(uri: str) -> bool:
    return uri.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(uri: str) -> str:
    name = Path(uri).name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else Path(name).stem


def volume_key(uri: str) -> str:
    """The uri without its extension: a volume and its JSON sidecar share it.

    >>> volume_key("sub-01/anat/sub-01_T1w.nii.gz"), volume_key("sub-01/anat/sub-01_T1w.json")
    ('sub-01/anat/sub-01_T1w', 'sub-01/anat/sub-01_T1w')
    """
    lower = uri.lower()
    for suffix in (".nii.gz", ".nii", ".json"):
        if lower.endswith(suffix):
            return uri[: -len(suffix)]
    return uri


@dataclass(frozen=True, slots=True)
class NiftiHeader:
    """What a NIfTI header declares: the data shape, voxel sizes (x, y, z) and the affine."""

    shape: tuple[int, ...]
    zooms: tuple[float, float, float]
    affine: tuple[tuple[float, ...], ...]


def read_header(path: Path, where: str) -> NiftiHeader:
    """The header alone; an ItemError with a path-free, one-line reason when the file is not
    usable NIfTI."""
    import nibabel as nib  # here, not at the top: DICOM-only work never pays for its import

    try:
        img = nib.load(path)
        shape = tuple(int(s) for s in img.header.get_data_shape())
        zooms = tuple(float(z) for z in (tuple(img.header.get_zooms()) + (1.0, 1.0, 1.0))[:3])
        affine = tuple(tuple(float(v) for v in row) for row in np.asarray(img.affine, float))
    except Exception as e:  # nibabel raises many kinds for bad files
        raise ItemError(where, f"corrupt: not a readable NIfTI file ({describe(e, path, where)})") from e
    return NiftiHeader(shape, zooms, affine)  # type: ignore[arg-type]


def load_nifti(path: Path, frame: int | None = None, *, where: str | None = None, caps: SizeCaps | None = None) -> Volume:
    """Voxels with the file's scaling applied, and its (RAS) affine. The shape its header
    declares (`frame`'s volume, or the whole file with any 4th dimension as channels) is
    checked against `caps` before any voxel is read, in the scan's words (`size_problem`)."""
    import nibabel as nib

    where = where or path.name
    try:
        img = nib.load(path)
        if caps is not None:
            shape = img.header.get_data_shape()
            caps.refuse(where, shape[:3], 1 if frame is not None else math.prod(shape[3:]))
        data = np.asanyarray(img.dataobj[..., frame] if frame is not None else img.dataobj)
    except ItemError:
        raise
    except Exception as e:
        raise ItemError(where, f"cannot read voxels ({describe(e, path, where)})") from e
    return Volume(array=np.asarray(data), affine=np.asarray(img.affine, dtype=np.float64))


class NiftiReader(SourceReader):
    """Each 3D file is an item; a 4D file is split into its volumes or set aside (`split_4d`).
    A JSON sidecar of the same name is read for the patient."""

    kind = "nifti"

    def read_one(self, uri: str) -> Record | None:
        if is_nifti(uri):
            return Record(uri, volume_key(uri), facts=read_header(self.path(uri), uri))
        if uri.lower().endswith(".json"):
            return Record(uri, volume_key(uri), facts=self._sidecar(uri))
        return None

    def _sidecar(self, uri: str) -> str | None:
        """The PatientID a JSON sidecar names, or None (too large, not JSON, no PatientID)."""
        path = self.path(uri)
        if path.stat().st_size > SIDECAR_MAX_BYTES:
            return None
        try:
            data = json.loads(path.read_bytes())
        except ValueError:
            return None
        value = data.get("PatientID") if isinstance(data, dict) else None
        return str(value).strip() or None if value is not None else None

    def combine(self, key: str, records: list[Record], out: Scan) -> None:
        volumes = [r for r in records if isinstance(r.facts, NiftiHeader)]
        sidecars = [r for r in records if not isinstance(r.facts, NiftiHeader)]
        patient_id = next((r.facts for r in sidecars if r.facts), None)
        first_item = None
        for r in volumes:
            made = self._volume(r, patient_id, out)
            first_item = first_item or made
        for r in sidecars:
            if first_item is not None:
                out.ledger.append(self.entry(r.uri, "indexed", "JSON sidecar" + (" (PatientID)" if r.facts else ""), first_item))
            else:
                out.ledger.append(self.entry(r.uri, "skipped", "JSON file without an indexed volume of the same name"))

    def _volume(self, r: Record, patient_id: str | None, out: Scan) -> str | None:
        """Items of one volume file (its first item's id), or its ledger row with the reason."""
        header: NiftiHeader = r.facts
        shape = header.shape
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) == 3:
            frames: list[int | None] = [None]
        elif len(shape) == 4 and self.spec.split_4d:
            frames = list(range(shape[3]))
        elif len(shape) == 4:
            out.ledger.append(self.entry(r.uri, "skipped", f"4D volume ({shape[3]} volumes); set split_4d: true to use each volume"))
            return None
        else:
            out.ledger.append(self.entry(r.uri, "skipped", f"not a 3D volume (shape {list(shape)})"))
            return None
        if too_large := self.too_large(shape[:3]):
            out.ledger.append(self.entry(r.uri, "skipped", too_large))
            return None
        patient = self._patient(r.uri, patient_id)
        items = [self._item(r.uri, header, shape[:3], f, patient) for f in frames]
        out.items.extend(items)
        out.ledger.append(self.entry(r.uri, "indexed", "volume" if len(items) == 1 else f"4D split into {len(items)} volumes", items[0].item_id))
        return items[0].item_id

    def _patient(self, uri: str, patient_id: str | None) -> str:
        pattern = self.spec.patient_pattern
        if pattern:
            m = re.search(pattern, uri)
            if m and "patient" in m.groupdict():
                return m.group("patient")
        if patient_id:
            return patient_id
        bids = BIDS_SUBJECT.search(uri)
        return bids.group(1) if bids else nifti_stem(uri)

    def _item(self, uri: str, header: NiftiHeader, shape: tuple[int, ...], frame: int | None, patient: str) -> StudyItem:
        return StudyItem(
            item_id=self.keyer("item", self.spec.name, uri, frame),
            patient_key=self.keyer("patient", patient),
            study_key=self.keyer("study", self.spec.name, uri),
            source=self.spec.name,
            kind="nifti",
            modality=self.spec.modality,
            shape=[int(s) for s in shape],
            spacing=list(header.zooms),
            n_files=1,
            uris=[uri],
            frame=frame,
        )

    def load(self, item: StudyItem) -> Volume:
        where = item.uris[0]
        self.refuse_too_large(where, item.shape)
        return load_nifti(self.path(where), item.frame, where=where, caps=self.caps)


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

    @property
    def _regex(self) -> re.Pattern[str]:
        return pattern_regex(self.spec.pattern)

    def read_one(self, uri: str) -> Record | None:
        if not is_nifti(uri):
            return None
        m = self._regex.fullmatch(uri)
        wanted = list(self.spec.channels) + ([self.spec.labels] if self.spec.labels else [])
        if not m:
            return Record(uri, uri, "skipped", f"file name does not match pattern {self.spec.pattern!r}")
        if m.group("channel") not in wanted:
            return Record(uri, uri, "skipped", f"channel {m.group('channel')!r} is not one of {wanted}")
        try:
            header: NiftiHeader | str = read_header(self.path(uri), uri)
        except ItemError as e:
            header = e.reason
        return Record(uri, key=m.group("case"), facts=(m.group("channel"), header))

    def combine(self, key: str, records: list[Record], out: Scan) -> None:
        found: dict[str, Record] = {}
        for r in records:
            channel = r.facts[0]
            if channel in found:
                out.ledger.append(self.entry(r.uri, "skipped", f"a second file for channel {channel!r} of the case"))
            else:
                found[channel] = r
        try:
            headers = self._case_headers(found)
        except SetAside as e:
            out.ledger.extend(self.entry(r.uri, e.status, e.reason) for r in found.values())
            return
        first = headers[self.spec.channels[0]]
        item = StudyItem(
            item_id=self.keyer("item", self.spec.name, key),
            patient_key=self.keyer("patient", key),
            study_key=self.keyer("study", self.spec.name, key),
            source=self.spec.name,
            kind="nifti_group",
            modality=self.spec.modality,
            shape=[int(s) for s in first.shape[:3]],
            spacing=list(first.zooms),
            n_files=len(found),
            uris=[found[c].uri for c in self.spec.channels],
            channels=list(self.spec.channels),
            label_uri=found[self.spec.labels].uri if self.spec.labels in found else None,
        )
        out.items.append(item)
        for c, r in found.items():
            reason = "ground-truth label map" if c == self.spec.labels else f"sequence {c}"
            out.ledger.append(self.entry(r.uri, "indexed", reason, item.item_id))

    def _case_headers(self, found: dict[str, Record]) -> dict[str, NiftiHeader]:
        """The case's headers by channel, or a `SetAside` with why the case is no item and its
        status: a case without all its sequences or over the size cap is skipped, one with an
        unreadable file or with sequences that disagree is quarantined."""
        where = next(iter(found.values())).uri
        missing = [c for c in self.spec.channels if c not in found]
        if missing:
            raise SetAside(where, f"incomplete case: missing {', '.join(missing)}", "skipped")
        headers = {c: r.facts[1] for c, r in found.items()}
        broken = next(((c, h) for c, h in headers.items() if isinstance(h, str)), None)
        if broken:
            raise SetAside(where, f"case has an unreadable file (sequence {broken[0]}): {broken[1]}", "quarantined")
        if problem := self._disagreement(headers):
            raise SetAside(where, problem, "quarantined")
        self.refuse_too_large(where, headers[self.spec.channels[0]].shape, len(self.spec.channels))
        return headers

    @staticmethod
    def _disagreement(headers: dict[str, NiftiHeader]) -> str | None:
        ref_name, ref = next(iter(headers.items()))
        for name, h in headers.items():
            if len(h.shape) != 3:
                return f"sequence {name} is not 3D (shape {list(h.shape)})"
            if h.shape != ref.shape:
                return f"sequences disagree in shape: {ref_name} {list(ref.shape)} vs {name} {list(h.shape)}"
            if not np.allclose(np.array(h.affine), np.array(ref.affine), atol=1e-3):
                return f"sequences disagree in affine: {ref_name} vs {name}"
        return None

    def load(self, item: StudyItem) -> Volume:
        self.refuse_too_large(item.uris[0], item.shape, len(item.channels))
        vols = [load_nifti(self.path(u), where=u, caps=self.caps) for u in item.uris]
        shapes = {c: v.array.shape for c, v in zip(item.channels, vols)}
        if len(set(shapes.values())) > 1 or next(iter(shapes.values())) != tuple(item.shape):
            raise ItemError(item.uris[0], f"sequences have shapes {shapes}, the index says {list(item.shape)}: the files changed since indexing")
        array = np.stack([v.array.astype(np.float32, copy=False) for v in vols], axis=-1)
        return Volume(array=array, affine=vols[0].affine, channels=tuple(item.channels))
