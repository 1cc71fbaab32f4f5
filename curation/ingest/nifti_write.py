"""Writing NIfTI-1 files (`.nii`, `.nii.gz`) without nibabel: a 348-byte header and the voxels.

Why: `m3-curate convert` races dcm2niix, and importing nibabel costs ~0.3 s of a run that takes
about one second; nibabel also copies a volume whose memory is not in NIfTI order before
writing it. Here the header is packed with `struct` (qform and sform computed as nibabel's
`set_qform`/`set_sform` compute them: zooms from the affine's columns, qfac from the sign of
its determinant, the closest rotation by polar decomposition, the quaternion with the positive
real part) and the voxels are written slice by slice in Fortran order from whatever memory
layout the array has. `tests/test_convert.py` checks the result against nibabel's reading and
writing of the same volumes.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from curation.atomic import replacing

HEADER_SIZE = 348
VOX_OFFSET = 352  # the header and four bytes saying "no extensions"
DATATYPES: dict[str, int] = {"uint8": 2, "int16": 4, "int32": 8, "float32": 16, "float64": 64, "int8": 256, "uint16": 512,
                             "uint32": 768, "int64": 1024, "uint64": 1280}
XFORM_SCANNER = 1
UNITS_MM = 2


def nifti1_header(shape: tuple[int, ...], dtype: np.dtype, affine: np.ndarray) -> bytes:
    """The header (and the empty extension flag) of a volume of `shape` and `dtype` whose voxel
    indices map to RAS mm by `affine`, with qform and sform both 'scanner'."""
    name = np.dtype(dtype).name
    if name not in DATATYPES:
        raise ValueError(f"NIfTI-1 has no data type for {name}")
    if not 1 <= len(shape) <= 7:
        raise ValueError(f"NIfTI-1 holds 1 to 7 dimensions, not {len(shape)}")
    affine = np.asarray(affine, dtype=np.float64)
    qfac, zooms, quaternion = _qform(affine)
    dim = [len(shape), *shape, *[1] * (7 - len(shape))]
    pixdim = [qfac, *zooms, *[1.0] * 4]
    h = bytearray(VOX_OFFSET)
    struct.pack_into("<i", h, 0, HEADER_SIZE)
    h[38] = ord("r")  # "regular", as ANALYZE readers expect
    struct.pack_into("<8h", h, 40, *dim)
    struct.pack_into("<hhh", h, 70, DATATYPES[name], np.dtype(dtype).itemsize * 8, 0)
    struct.pack_into("<8f", h, 76, *pixdim)
    struct.pack_into("<fff", h, 108, float(VOX_OFFSET), 1.0, 0.0)  # vox_offset, scl_slope, scl_inter
    h[123] = UNITS_MM
    struct.pack_into("<hh", h, 252, XFORM_SCANNER, XFORM_SCANNER)
    struct.pack_into("<6f", h, 256, *quaternion[1:], *affine[:3, 3])
    struct.pack_into("<12f", h, 280, *affine[:3, :].ravel())
    h[344:348] = b"n+1\0"
    return bytes(h)


def _qform(affine: np.ndarray) -> tuple[float, list[float], np.ndarray]:
    """(qfac, zooms, quaternion w, b, c, d) as nibabel's `Nifti1Header.set_qform` makes them."""
    rzs = affine[:3, :3]
    zooms = np.sqrt(np.sum(rzs * rzs, axis=0))
    rotation = rzs / np.where(zooms == 0, 1.0, zooms)
    qfac = 1.0
    if np.linalg.det(rotation) <= 0:
        qfac = -1.0
        rotation[:, -1] *= -1
    p, _, qt = np.linalg.svd(rotation)
    return qfac, [float(z) for z in zooms], _quaternion(p @ qt)


def _quaternion(m: np.ndarray) -> np.ndarray:
    """The unit quaternion (w, x, y, z), w ≥ 0, of rotation matrix `m` (Bar-Itzhack's method, as
    nibabel's `quaternions.mat2quat`)."""
    qxx, qyx, qzx, qxy, qyy, qzy, qxz, qyz, qzz = m.flat
    k = np.array([
        [qxx - qyy - qzz, 0, 0, 0],
        [qyx + qxy, qyy - qxx - qzz, 0, 0],
        [qzx + qxz, qzy + qyz, qzz - qxx - qyy, 0],
        [qyz - qzy, qzx - qxz, qxy - qyx, qxx + qyy + qzz],
    ]) / 3.0
    values, vectors = np.linalg.eigh(k)
    q = vectors[[3, 0, 1, 2], np.argmax(values)]
    return -q if q[0] < 0 else q


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write `array` (x, y, z[, …] in voxel order) as NIfTI-1. float64 is written as float32
    (what experts compute in). `compress` defaults to the name: `.nii.gz` is gzip (level 1 and
    no timestamp, as nibabel writes it, so the bytes depend on the voxels alone)."""
    path = Path(path)
    if array.dtype == np.float64:
        array = array.astype(np.float32)
    if compress is None:
        compress = path.name.endswith(".gz")
    header = nifti1_header(array.shape, array.dtype, affine)
    with replacing(path) as tmp, open(tmp, "wb") as raw:  # a failed write leaves no partial file
        if compress:
            with gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=1, mtime=0) as out:  # no name, no time
                _write_all(out, header, array)
        else:
            _write_all(raw, header, array)
    return path


def _write_all(out: BinaryIO, header: bytes, array: np.ndarray) -> None:
    out.write(header)
    data = array if array.dtype.byteorder in ("<", "=", "|") else array.astype(array.dtype.newbyteorder("<"))
    if data.flags.f_contiguous:
        out.write(memoryview(np.ascontiguousarray(data.T)).cast("B"))  # the transpose of F order is C order: no copy
        return
    if data.ndim < 3:
        out.write(data.tobytes(order="F"))
        return
    # one slice of the last axes at a time: memory for one slice, whatever the layout
    for index in np.ndindex(*data.shape[:1:-1]):
        out.write(data[(slice(None), slice(None), *index[::-1])].tobytes(order="F"))
