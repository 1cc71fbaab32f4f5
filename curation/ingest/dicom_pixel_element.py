"""Where a DICOM file's pixel data element is, and whether it fits in the file — checked from
the element and fragment headers alone, without reading the pixels.

A copy interrupted mid-file leaves headers that parse and pixel data that stops short. For
uncompressed data the header promises Rows × Columns × SamplesPerPixel × BitsAllocated/8 ×
NumberOfFrames bytes, so comparing that with the bytes left in the file finds the cut for the
price of a `stat`. Encapsulated (compressed) data is a sequence of fragments, each with its
length: seeking from one fragment header to the next finds a cut just as cheaply.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from curation.ingest.dicom_quick import DEFLATED_VR_LE

if TYPE_CHECKING:
    from curation.ingest.dicom_headers import Header

PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # PixelData, FloatPixelData, DoubleFloatPixelData
ITEM_TAG, SEQUENCE_END_TAG = 0xFFFEE000, 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(slots=True, frozen=True)
class PixelElement:
    """Whether a pixel data element follows the header, and what is wrong with it, if anything
    (a ledger reason starting "corrupt: ")."""

    present: bool
    problem: str | None = None


def check_pixel_element(fp: BinaryIO, h: Header, size: int) -> PixelElement:
    """Check the element at `fp` (where a header-only dcmread stopped) against file `size`."""
    if h.transfer_syntax == DEFLATED_VR_LE:
        return PixelElement(True)  # the body is deflated: file offsets say nothing; decoding will tell
    endian = "<" if h.little_endian else ">"
    head = fp.read(8)
    if len(head) < 8:
        return PixelElement(False)  # the dataset simply ends: no pixel data
    group, element, length = struct.unpack(endian + "HHI", head)
    if (group << 16) | element not in PIXEL_TAGS:
        return PixelElement(False)
    if not h.implicit_vr:
        more = fp.read(4)
        if len(more) < 4:
            return PixelElement(True, "corrupt: truncated pixel data (element header cut)")
        length = struct.unpack(endian + "I", more)[0]
    if length == UNDEFINED_LENGTH:
        return PixelElement(True, fragments_problem(fp, size))
    expected = expected_bytes(h)
    available = size - fp.tell()
    if available < min(length, expected):
        return PixelElement(True, f"corrupt: truncated pixel data ({available} of {expected} bytes)")
    if length < expected:
        return PixelElement(True, f"corrupt: pixel data holds {length} bytes, Rows x Columns x frames needs {expected}")
    return PixelElement(True)


def expected_bytes(h: Header) -> int:
    """Bytes of uncompressed pixel data the header promises: pydicom's `get_expected_length`
    rule (bit-packed data rounds up to whole bytes; YBR_FULL_422 holds 2 samples a pixel),
    written out because building a Dataset for it costs more than the rest of the check."""
    samples = 2 if h.photometric == "YBR_FULL_422" and h.samples == 3 else h.samples
    bits = h.rows * h.cols * samples * h.n_frames * h.bits_allocated
    return (bits + 7) // 8


def fragments_problem(fp: BinaryIO, size: int) -> str | None:
    """Walk the item headers of encapsulated pixel data from `fp` (the first item), seeking past
    each fragment; stops at the sequence delimiter, with `fp` just after it."""
    n = 0
    while True:
        head = fp.read(8)
        if len(head) < 8:
            return f"corrupt: truncated pixel data (ends after {n} fragments, no sequence delimiter)"
        group, element, length = struct.unpack("<HHI", head)
        tag = (group << 16) | element
        if tag == SEQUENCE_END_TAG:
            return None
        if tag != ITEM_TAG:
            return f"corrupt: encapsulated pixel data has tag ({group:04X},{element:04X}) where an item was expected"
        end = fp.tell() + length
        if end > size:
            return f"corrupt: truncated pixel data (fragment {n} runs {end - size} bytes past the end of the file)"
        fp.seek(end)
        n += 1


def fragments_end(fp: BinaryIO, size: int) -> int:
    """File offset of the sequence delimiter that ends encapsulated pixel data (`fp` at the
    first item); raises ValueError if the data is cut."""
    problem = fragments_problem(fp, size)
    if problem:
        raise ValueError(problem.removeprefix("corrupt: "))
    return fp.tell() - 8
