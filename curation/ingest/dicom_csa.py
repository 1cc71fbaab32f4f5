"""Siemens CSA headers and the slice geometry of a mosaic, without pydicom or nibabel.

A Siemens mosaic (fMRI, diffusion) tiles a volume's slices into one frame; how many tiles it
holds and which way the slices run are kept only in the private "CSA Image Header Info"
element (0029,xx10). Reading that through a pydicom Dataset and nibabel's MosaicWrapper cost
about 2 ms a file and 0.2 s of imports in every process that met one; the element is a plain
table (SPM's `spm_dicom_headers` defines it; nibabel's `csareader` reads it the same way), and
the geometry is a few lines of nibabel's MosaicWrapper. `tests/test_dicom.py` and
`tests/test_realdata.py` keep both equal to nibabel's and dcm2niix's results.
"""

from __future__ import annotations

import math
import struct

import numpy as np

CREATOR = "SIEMENS CSA HEADER"  # the private creator of group 0029's CSA block
IMAGE_INFO = 0x10  # "CSA Image Header Info": element xx10 of that block
MAX_TAGS = 1000
NUMERIC = {"FL": float, "FD": float, "DS": float, "SS": int, "US": int, "SL": int, "UL": int, "IS": int}
_TAG = struct.Struct("<64si4s3i")
_ITEM = struct.Struct("<4i")


class CsaError(ValueError):
    """The CSA header is missing, malformed, or lacks what a mosaic needs."""


def read_csa(data: bytes) -> dict[str, list[object]]:
    """Each CSA tag's values (numbers converted by the tag's VR), as SPM and nibabel read them:
    CSA2 ("SV10") gives each item's length in its second word; the older CSA1 in its first, less
    the first tag's item count. A numeric tag's values end at its first empty item.

    >>> read_csa(b"SV10" + bytes(4) + struct.pack("<2I", 1, 77) + _TAG.pack(b"N", 1, b"IS", 6, 1, 77)
    ...          + _ITEM.pack(2, 2, 77, 2) + b"7" + bytes(3))
    {'N': [7]}
    """
    csa2 = data[:4] == b"SV10"
    pos = 8 if csa2 else 0
    try:
        n_tags, _ = struct.unpack_from("<2I", data, pos)
        if not 0 < n_tags <= MAX_TAGS:
            raise CsaError(f"{n_tags} tags (expected 1 to {MAX_TAGS})")
        pos += 8
        tags: dict[str, list[object]] = {}
        first_items = 0
        for tag_no in range(n_tags):
            name, vm, vr, _, n_items, _ = _TAG.unpack_from(data, pos)
            pos += _TAG.size
            if tag_no == 0:
                first_items = n_items
            if not 0 <= n_items <= MAX_TAGS:
                raise CsaError(f"tag {_text(name)!r} has {n_items} items (expected at most {MAX_TAGS})")
            values, pos = _items(data, pos, n_items, vm or n_items, NUMERIC.get(_text(vr)), csa2, first_items)
            tags[_text(name)] = values
    except struct.error as e:
        raise CsaError(f"cut short ({e})") from e
    return tags


def _items(data: bytes, pos: int, n_items: int, n_values: int, convert: type | None, csa2: bool, first_items: int) -> tuple[list[object], int]:
    """One tag's values and the position after its items."""
    values: list[object] = []
    for item_no in range(n_items):
        words = _ITEM.unpack_from(data, pos)
        pos += _ITEM.size
        length = words[1] if csa2 else words[0] - first_items
        if length < 0 or pos + length > len(data):
            if csa2:
                raise CsaError("an item runs past the end of the header")
            if item_no < n_values:
                values.append("")
            break
        if item_no >= n_values:
            if length:
                raise CsaError("more values than the tag's multiplicity")
            continue
        value = _text(data[pos : pos + length])
        pos += length + (-length % 4)  # items are padded to four bytes
        if convert is not None:
            if not length:
                n_values = item_no
                continue
            try:
                values.append(convert(value))
            except ValueError as e:
                raise CsaError(f"a value that is not a number: {value!r}") from e
        else:
            values.append(value)
    return values, pos


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("latin-1")


def mosaic_geometry(csa: bytes | None, frame: tuple[int, int], orientation: tuple[float, ...] | None,
                    pixel_spacing: tuple[float, float] | None, position: np.ndarray | None, gap: float | None) -> tuple[int, np.ndarray, float]:
    """(tiles, LPS position of each tile's first voxel, distance between tiles) of a mosaic
    whose whole frame is `frame` (rows, columns), as nibabel's MosaicWrapper computes them
    (and dcm2niix agrees): ImagePositionPatient is that of the whole tiled frame, so it is moved
    to the first tile's corner; the slices run along the normal of the orientation, signed by the
    CSA's SliceNormalVector, `gap` (else 1 mm) apart."""
    if csa is None:
        raise CsaError("no CSA image header")
    tags = read_csa(csa)
    tiles = (tags.get("NumberOfImagesInMosaic") or [0])[0]
    if not isinstance(tiles, int) or tiles <= 0:
        raise CsaError("no NumberOfImagesInMosaic")
    if orientation is None or pixel_spacing is None or position is None:
        raise CsaError("no orientation, pixel spacing or position")
    row_cos, col_cos = np.array(orientation[:3], float), np.array(orientation[3:], float)
    normal = _signed_normal(np.cross(col_cos, row_cos), tags.get("SliceNormalVector"))
    rotation = np.column_stack([col_cos, row_cos, normal])
    if not np.allclose(rotation @ rotation.T, np.eye(3), atol=5e-5):
        raise CsaError("orientation is not nearly orthogonal")
    grid = math.ceil(math.sqrt(tiles))
    whole = np.array(frame, float)
    shift = (whole - whole / grid) / 2  # from the frame's corner to the first tile's, in (rows, columns)
    corner = np.asarray(position, float) + col_cos * pixel_spacing[0] * shift[0] + row_cos * pixel_spacing[1] * shift[1]
    step = normal * (gap or 1.0)
    return tiles, corner + np.arange(tiles)[:, None] * step, float(np.linalg.norm(step))


def _signed_normal(normal: np.ndarray, csa_normal: list[object] | None) -> np.ndarray:
    """The orientation's normal (the most orthogonal), with the sign of the CSA's own."""
    if not csa_normal:
        return normal
    if len(csa_normal) != 3:
        raise CsaError(f"SliceNormalVector has {len(csa_normal)} values, not 3")
    dot = float(np.dot(np.array(csa_normal, float), normal))
    if not np.isclose(abs(dot), 1.0, atol=1e-5):
        raise CsaError("SliceNormalVector is not the orientation's normal")
    return -normal if dot < 0 else normal
