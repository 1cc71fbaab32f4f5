"""The DICOM source reader: series (and their sub-series) of a folder tree as StudyItems, and
one item's files as a RAS volume.

`read` takes headers only, one file at a time (any partition of the archive, in any process):
a file is quarantined ("corrupt: …", truncated pixel data included), skipped by a selection rule
with the rule's own reason, or kept with its SeriesInstanceUID as the key. `group` then makes
the items of each SeriesInstanceUID and ledgers every file once: "indexed" (with the item id) or
"skipped" (a repeated slice position, too few slices, a declared size over the caps). `load`
reads each file once — uncompressed pixels straight into the volume — and applies the rescale.

    >>> from curation.manifest import DicomSourceSpec
    >>> from curation.keys import Keyer
    >>> reader = DicomReader(DicomSourceSpec(name="ct", kind="dicom", root="/data/ct"), Keyer("k"))
    >>> reader.kind
    'dicom'
"""

from __future__ import annotations

import math
import os
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import numpy as np

from curation.errors import ItemError
from curation.imaging import flip_axis
from curation.ingest.base import Record, Scan, SourceReader
from curation.ingest.dicom_geometry import affine_ras, order_slices, same_orientation, slice_normal, slice_vector
from curation.ingest.dicom_headers import Header, read_header
from curation.ingest.dicom_pixels import read_file, read_image_2d, read_slices, rescale
from curation.ingest.reasons import describe
from curation.ingest.dicom_series import SubSeries, in_plane_spacing, item_facts, skip_reason, split_series
from curation.items import StudyItem, Volume

NOT_DICOM_SUFFIXES = (".nii", ".nii.gz", ".png", ".jpg", ".jpeg", ".csv", ".json", ".txt", ".md", ".tsv", ".yaml", ".yml", ".bval", ".bvec")
LABEL_SUFFIX = ".nii.gz"


class DicomReader(SourceReader):
    """Reads a `DicomSourceSpec` source (`kind: dicom`)."""

    kind: ClassVar[str] = "dicom"

    def read_one(self, uri: str) -> Record | None:
        if self._is_label(uri):
            return Record(uri, key=uri.rsplit("/", 1)[-1].removesuffix(LABEL_SUFFIX), facts="label")
        if uri.lower().endswith(NOT_DICOM_SUFFIXES):
            return None
        h = read_header(self.root, uri)
        if h.problem:
            return Record(uri, uri, "quarantined", h.problem)
        if reason := skip_reason(h, self.spec.select, self.spec.keep_burned_in):
            return Record(uri, uri, "skipped", reason)
        return Record(uri, key=h.series_uid, facts=h)

    def combine(self, key: str, records: list[Record], out: Scan) -> None:
        """The items of one SeriesInstanceUID, then the label maps named after it."""
        headers = [r.facts for r in records if isinstance(r.facts, Header)]
        for sub in split_series(headers):
            self._add_sub_series(sub, out)
        used = {it.label_uri: it.item_id for it in out.items if it.label_uri}
        for r in records:
            if r.facts == "label":
                if r.uri in used:
                    out.ledger.append(self.entry(r.uri, "indexed", "label map", used[r.uri]))
                else:
                    out.ledger.append(self.entry(r.uri, "skipped", "label map without an indexed series"))

    def load(self, item: StudyItem) -> Volume:
        """The item's voxels (x = column, y = row, z = slice) in HU for CT, and the RAS affine."""
        self.refuse_too_large(item.uris[0], item.shape)
        try:
            if item.kind == "image2d":
                return self._load_image2d(item)
            if item.attrs.get("mosaic") or item.attrs.get("multiframe"):
                return self._load_single_file(item)
            return self._load_stack(item)
        except ItemError:
            raise
        except Exception as e:  # geometry of damaged values; the file reads already name theirs
            raise ItemError(where=item.uris[0], reason=describe(e, *item.uris)) from e

    # -- scan ---------------------------------------------------------------------------------

    def _add_sub_series(self, sub: SubSeries, out: Scan) -> None:
        """One item from a sub-series, or its files skipped with the reason."""
        facts = item_facts(sub, self.spec.select.min_slices)
        if isinstance(facts, str):
            out.ledger.extend(self.entry(h.uri, "skipped", facts) for h in sub.headers)
            return
        if too_large := self.too_large(facts.shape):
            out.ledger.extend(self.entry(h.uri, "skipped", too_large) for h in sub.headers)
            return
        first = sub.headers[0]
        item_id = self.keyer("item", sub.series_uid, sub.index)
        label = f"{sub.series_uid}{LABEL_SUFFIX}"
        out.items.append(
            StudyItem(
                item_id=item_id,
                patient_key=self._patient_key(first),
                study_key=self.keyer("study", first.study_uid),
                source=self.spec.name,
                kind="image2d" if sub.kind == "image2d" else "dicom",
                modality=first.modality,
                shape=facts.shape,
                spacing=facts.spacing,
                n_files=len(facts.used),
                uris=[h.uri for h in facts.used],
                series_number=first.series_number,
                label_uri=self._label_uri(label) if label in self._label_names else None,
                attrs=facts.attrs,
            )
        )
        out.ledger.extend(self.entry(h.uri, "indexed", "", item_id) for h in facts.used)
        out.ledger.extend(self.entry(h.uri, "skipped", "duplicate slice position") for h in facts.dropped)

    def _patient_key(self, h: Header) -> str:
        """Keyed PatientID; a file without one gets a key of its study, so that two
        anonymous patients are never merged into one (and split leakage stays impossible)."""
        if h.patient_id.strip():
            return self.keyer("patient", h.patient_id)
        return self.keyer("patient-of-study", h.study_uid)

    @cached_property
    def _label_names(self) -> frozenset[str]:
        folder = self.spec.labels
        if folder is None or not Path(folder).is_dir():
            return frozenset()
        return frozenset(p.name for p in Path(folder).iterdir() if p.name.endswith(LABEL_SUFFIX))

    def _label_uri(self, name: str) -> str:
        return Path(os.path.relpath(Path(self.spec.labels) / name, self.root)).as_posix()

    @cached_property
    def _label_prefix(self) -> str | None:
        """The labels folder relative to the root, with a trailing slash ("" for the root
        itself), or None when it lies outside the root."""
        if self.spec.labels is None:
            return None
        folder = Path(os.path.relpath(self.spec.labels, self.root)).as_posix()
        if folder.startswith(".."):
            return None
        return "" if folder == "." else folder + "/"

    def _is_label(self, uri: str) -> bool:
        """A label map that lives under the root: claimed here, not read as DICOM."""
        prefix = self._label_prefix
        return prefix is not None and uri.startswith(prefix) and "/" not in uri[len(prefix):] and uri.endswith(LABEL_SUFFIX)

    # -- load ---------------------------------------------------------------------------------

    def _load_stack(self, item: StudyItem) -> Volume:
        headers, stored = read_slices(self.root, item.uris, self.spec.workers, frame=(item.shape[1], item.shape[0]))
        first = headers[0]
        _check_same_geometry(headers)
        positions = np.array([h.positions[0] for h in headers], float)  # type: ignore[index]
        slopes = np.array([h.slopes[0] for h in headers])
        intercepts = np.array([h.intercepts[0] for h in headers])
        return self._volume(item, first, stored, slopes, intercepts, positions)

    def _load_single_file(self, item: StudyItem) -> Volume:
        h, stored = read_file(self.root, item.uris[0], max_values=max(math.prod(item.shape), 1) * 4)  # a mosaic's frame holds up to ~2x its tiles
        if h.orientation is None or h.positions is None:
            raise ItemError(where=item.uris[0], reason=h.unsupported or "no slice geometry")
        keep, _ = order_slices(h.positions, slice_normal(h.orientation))
        return self._volume(item, h, stored[keep], h.slopes[keep], h.intercepts[keep], h.positions[keep])

    def _volume(self, item: StudyItem, first: Header, stored: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray, positions: np.ndarray) -> Volume:
        """(slices, rows, columns) stored values → (columns, rows, slices) rescaled, as a
        transposed view: Fortran order, which is what NIfTI stores, so saving needs no copy.

        Rows are stored bottom-up, as dcm2niix (the reference converter) stores them, so our
        NIfTI files equal its output voxel for voxel and affine for affine."""
        shape = [stored.shape[2], stored.shape[1], stored.shape[0]]
        if shape != list(item.shape):
            raise ItemError(where=item.uris[0], reason=f"files give a {shape} volume, the index says {list(item.shape)}: the files changed since indexing")
        normal = slice_normal(first.orientation)  # type: ignore[arg-type]
        step = slice_vector(positions, normal, first.slice_gap or 1.0)
        affine = affine_ras(first.orientation, first.pixel_spacing or (1.0, 1.0), positions[0], step)  # type: ignore[arg-type]
        array, affine = flip_axis(rescale(stored, slopes, intercepts).transpose(2, 1, 0), affine, axis=1)
        return Volume(array=array, affine=affine)

    def _load_image2d(self, item: StudyItem) -> Volume:
        h, image = read_image_2d(self.root, item.uris[0], frame=(item.shape[1], item.shape[0]))
        if h.orientation is not None and h.positions is not None:
            affine = affine_ras(h.orientation, h.pixel_spacing or (1.0, 1.0), h.positions[0], slice_normal(h.orientation))
        else:  # a radiograph has no patient frame: just the pixel spacing
            affine = np.diag([*in_plane_spacing(h), 1.0, 1.0])
        return Volume(array=image, affine=affine)


def _check_same_geometry(headers: list[Header]) -> None:
    """Every slice of a stack still has a position and the first slice's orientation (the
    scan made sure of it; a file replaced since then is caught here, by name)."""
    first = headers[0]
    for h in headers:
        if h.positions is None or h.orientation is None or not same_orientation(h.orientation, first.orientation):  # type: ignore[arg-type]
            raise ItemError(where=h.uri, reason="slice position or orientation differs from the index: the files changed since indexing")
