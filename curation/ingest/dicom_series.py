"""Which DICOM files become which items: per-file selection rules, then grouping into series and
sub-series, then slice order and geometry facts of each stack.

Selection follows the spirit of MONAI Deploy's series selector but every rejection has its own
reason, so the ledger says *why* a file was not used. Grouping is by SeriesInstanceUID, split
further wherever one UID holds more than one volume: a second orientation or matrix size, a
different SeriesNumber (as dcm2niix splits), or files that are volumes by themselves (a mosaic,
an enhanced multi-frame, a single radiograph).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from curation.ingest.dicom_geometry import order_slices, same_orientation, slice_normal, slice_vector, stack_summary
from curation.ingest.dicom_headers import MEDIA_DIRECTORY, Header
from curation.manifest import SeriesRules

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # and its multi-frame variants .7.1 … .7.4
PLANAR_MODALITIES = frozenset({"CR", "DX", "MG"})  # a single-frame image of these is 2D
MEDIA_DIRECTORY_REASON = "media directory (DICOMDIR): an index of the other files, not an image"

SubSeriesKind = Literal["stack", "mosaic", "multiframe", "image2d"]


def skip_reason(h: Header, rules: SeriesRules, keep_burned_in: bool = False) -> str | None:
    """Why a readable file is not used, or None. Checked in an order that gives the most
    specific reason: a secondary capture often claims ORIGINAL/PRIMARY, so its SOP class comes
    first."""
    if h.sop_class == MEDIA_DIRECTORY:
        return MEDIA_DIRECTORY_REASON
    if h.sop_class == SECONDARY_CAPTURE or h.sop_class.startswith(SECONDARY_CAPTURE + "."):
        return f"secondary capture (SOPClassUID {h.sop_class})"
    if not h.has_pixels:
        return f"no pixel data (SOPClassUID {h.sop_class or 'missing'})"
    if not keep_burned_in and (reason := burned_in_reason(h)):
        return reason
    image_type = h.image_type or ()
    for value in rules.image_type_none:
        if value.upper() in image_type:
            return "localizer (ImageType contains LOCALIZER)" if value.upper() == "LOCALIZER" else f"ImageType contains {value.upper()}"
    if any(v.upper() not in image_type for v in rules.image_type_all):
        shown = "\\".join(image_type) if h.image_type is not None else "(no ImageType)"
        return f"ImageType lacks {'/'.join(v.upper() for v in rules.image_type_all)}: {shown}"
    if rules.modalities is not None and h.modality not in rules.modalities:
        return f"modality {h.modality or '(none)'} not in {'/'.join(rules.modalities)}"
    if h.samples != 1:
        return f"unsupported: SamplesPerPixel {h.samples} (colour image)"
    if h.unsupported:
        return h.unsupported
    if not is_planar(h) and (h.orientation is None or h.positions is None):
        return "no slice geometry (ImageOrientationPatient or ImagePositionPatient missing)"
    return None


def burned_in_reason(h: Header) -> str | None:
    """Why an image risks text burned into its pixels (a name, a date, an ID that no header
    scrubbing removes), or None: the header says so, or it is ultrasound, whose scanners print
    the patient's details into the picture."""
    if h.burned_in:
        return "burned-in annotation (BurnedInAnnotation YES): text in the pixels may identify the patient"
    if h.modality == "US":
        return "ultrasound: text burned into the pixels is likely (keep_burned_in: true keeps it)"
    return None


def is_planar(h: Header) -> bool:
    """A single-frame radiograph (CR/DX/MG): a 2D item, exempt from `min_slices`."""
    return h.modality in PLANAR_MODALITIES and h.n_frames == 1 and not h.tiles


def kind_of(h: Header) -> SubSeriesKind:
    if is_planar(h):
        return "image2d"
    if h.tiles:
        return "mosaic"
    return "multiframe" if h.n_frames > 1 else "stack"


@dataclass(slots=True)
class SubSeries:
    """Files that make one item: `index` numbers the sub-series of one SeriesInstanceUID in the
    order of their first file, so item ids are stable for the same files."""

    series_uid: str
    index: int
    kind: SubSeriesKind
    headers: list[Header] = field(default_factory=list)


def split_series(headers: list[Header]) -> list[SubSeries]:
    """Group usable files into sub-series. Files that are volumes by themselves get their own;
    single-frame slices join the sub-series of their UID with the same SeriesNumber, matrix and
    orientation (within 1e-4)."""
    by_uid: dict[str, list[SubSeries]] = {}
    for h in headers:
        subs = by_uid.setdefault(h.series_uid, [])
        kind = kind_of(h)
        target = next((s for s in subs if kind == "stack" and s.kind == "stack" and _same_stack(s.headers[0], h)), None)
        if target is None:
            target = SubSeries(h.series_uid, len(subs), kind)
            subs.append(target)
        target.headers.append(h)
    return [s for subs in by_uid.values() for s in subs]


def _same_stack(a: Header, b: Header) -> bool:
    return (
        a.series_number == b.series_number
        and (a.rows, a.cols) == (b.rows, b.cols)
        and same_orientation(a.orientation, b.orientation)  # type: ignore[arg-type]
    )


@dataclass(slots=True)
class Stack:
    """A sub-series in slice order. `keep` indexes its slices (files of a stack, frames or
    tiles of a single file) along the normal; `duplicates` are the slices dropped for sharing
    a position with a kept one."""

    positions: np.ndarray  # (n kept, 3) LPS, in order
    keep: np.ndarray
    duplicates: np.ndarray
    step: np.ndarray  # LPS mm from one slice to the next
    attrs: dict[str, object]


def slice_positions(sub_headers: list[Header]) -> np.ndarray:
    """One LPS position per slice: the files' positions for a stack of single frames, the
    frames' or tiles' positions for a single multi-slice file."""
    if len(sub_headers) == 1 and sub_headers[0].n_slices > 1:
        return np.asarray(sub_headers[0].positions, float)
    return np.array([h.positions[0] for h in sub_headers], float)  # type: ignore[index]


def plan_stack(sub_headers: list[Header]) -> Stack:
    """Order slices along the normal (never by InstanceNumber), drop repeated positions, and
    sum up the geometry: tilt, uneven spacing, the slice step of the affine."""
    first = sub_headers[0]
    normal = slice_normal(first.orientation)  # type: ignore[arg-type]
    positions = slice_positions(sub_headers)
    keep, duplicates = order_slices(positions, normal)
    ordered = positions[keep]
    gap = first.slice_gap or 1.0
    return Stack(ordered, keep, duplicates, slice_vector(ordered, normal, gap), stack_summary(ordered, normal, gap))


@dataclass(slots=True)
class ItemFacts:
    """What a sub-series contributes to its StudyItem: NIfTI-order shape and spacing, attrs,
    the files used (in slice order) and the files dropped as repeated positions."""

    shape: list[int]
    spacing: list[float]
    attrs: dict[str, object]
    used: list[Header]
    dropped: list[Header]


def item_facts(sub: SubSeries, min_slices: int) -> ItemFacts | str:
    """The item a sub-series makes, or the reason its files are skipped (too few slices)."""
    first = sub.headers[0]
    in_plane = in_plane_spacing(first)
    attrs: dict[str, object] = {} if first.pixel_spacing else {"pixel_spacing_assumed": True}
    if sub.kind == "image2d":
        if first.photometric == "MONOCHROME1":
            attrs["monochrome1_inverted"] = True
        return ItemFacts([first.cols, first.rows], list(in_plane), attrs, sub.headers, [])
    stack = plan_stack(sub.headers)
    n = len(stack.keep)
    if n < min_slices:
        return f"too few slices: {n} < {min_slices}"
    attrs.update(stack.attrs)
    rows, cols = first.slice_shape
    shape, spacing = [cols, rows, n], [*in_plane, round(float(np.linalg.norm(stack.step)), 6)]
    if sub.kind == "stack":
        return ItemFacts(shape, spacing, attrs, [sub.headers[i] for i in stack.keep], [sub.headers[i] for i in stack.duplicates])
    attrs[sub.kind] = True
    if len(stack.duplicates):
        attrs["duplicate_frames"] = int(len(stack.duplicates))
    return ItemFacts(shape, spacing, attrs, sub.headers, [])


def in_plane_spacing(h: Header) -> tuple[float, float]:
    """(column spacing, row spacing) in mm — x then y in NIfTI order; 1 mm if the file has none."""
    row_spacing, col_spacing = h.pixel_spacing or (1.0, 1.0)
    return float(col_spacing), float(row_spacing)
