"""Pixel values of DICOM files, read once per file and fast.

Uncompressed pixel data (the bulk of CT archives) is read straight from the file into its place
in a preallocated stack — `readinto`, no intermediate bytes and no pydicom decode — right after
the header, from the same open file. Compressed data goes through pydicom's decoders (with
the plugins this project depends on), also from the bytes already open. Rescale is applied per
slice, keeping int16 wherever that is lossless: CT in HU fits, and the output then matches what
dcm2niix writes, at half the size of float32.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from curation.cpus import available_cpus
from curation.errors import ItemError
from curation.ingest.dicom_headers import Header, mosaic_grid, one_line, open_header
from curation.ingest.dicom_pixel_element import fragments_end
from curation.ingest.dicom_quick import NATIVE_SYNTAXES, is_encapsulated
from curation.ingest.reasons import describe
from curation.items import source_path

INT16 = np.iinfo(np.int16)


class _QuietDecoderFailures(logging.Filter):
    """pydicom logs each decoder plugin's failure with its traceback before raising one error
    that lists them all; that error becomes the item's ledger reason, so the tracebacks are noise
    (and a traceback on a user's terminal reads as a crash)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and record.pathname.replace("\\", "/").endswith("pixels/decoders/base.py"))


logging.getLogger("pydicom.pixels.decoders.base").addFilter(_QuietDecoderFailures())


class PixelError(Exception):
    """A file's pixels could not be read; `read_file` turns it into an ItemError naming the file."""


def stored_dtype(h: Header) -> np.dtype:
    """The numpy type of stored values: BitsAllocated and PixelRepresentation."""
    if h.bits_allocated not in (8, 16, 32):
        raise PixelError(f"BitsAllocated {h.bits_allocated} is not supported (8, 16 or 32)")
    return np.dtype(f"{'i' if h.signed else 'u'}{h.bits_allocated // 8}")


def read_file(root: Path, uri: str, out: np.ndarray | None = None, *, frame: tuple[int, int] | None = None,
              max_values: int | None = None) -> tuple[Header, np.ndarray]:
    """Header and stored values of one file as (slices, rows, columns), in file order: a
    mosaic's tiles cut apart, a multi-frame's frames. With `out` (shape and dtype of the
    file's frames), uncompressed values land there directly.

    Before anything is allocated or decoded, the file's declared size is checked: `frame`
    (rows, columns) is what the index planned, `max_values` the most values one file may hold;
    a file that claims more is refused (a file changed since indexing, or a lying header). Any
    failure is an `ItemError` whose `where` is `uri` and whose reason names no path."""
    path = source_path(root, uri)
    try:
        with open(path, "rb") as fp:
            size = os.fstat(fp.fileno()).st_size
            h = open_header(fp, uri, size)
            if h.problem:
                raise PixelError(h.problem.removeprefix("corrupt: "))
            if not h.has_pixels:
                raise PixelError(f"no pixel data (SOPClassUID {h.sop_class})")
            if h.samples != 1:
                raise PixelError(f"SamplesPerPixel {h.samples} (colour) is not supported")
            _check_size(h, frame, max_values)
            frames = _read_frames(fp, h, size, out)
    except PixelError as e:
        raise ItemError(where=uri, reason=str(e)) from e
    except OSError as e:
        raise ItemError(where=uri, reason=f"cannot read file: {e.strerror or type(e).__name__}") from e
    except Exception as e:  # pydicom raises many types on damaged headers
        raise ItemError(where=uri, reason=f"unreadable DICOM: {one_line(e, path, uri)}") from e
    if h.tiles:
        frames = cut_mosaic(frames[0], h.tiles)
    return h, frames


def read_image_2d(root: Path, uri: str, frame: tuple[int, int]) -> tuple[Header, np.ndarray]:
    """A single-frame image (a radiograph) as it is meant to be seen, (columns, rows): rescaled,
    and MONOCHROME1 (high values dark) inverted within its own range. The one way both readers
    of 2D DICOM (`dicom` series and `image2d` pictures) load one."""
    h, stored = read_file(root, uri, frame=frame)
    image = rescale(stored, h.slopes, h.intercepts)[0]
    if h.photometric == "MONOCHROME1":
        image = (float(image.max()) + float(image.min()) - image.astype(np.float64)).astype(image.dtype)
    return h, image.T


def _check_size(h: Header, frame: tuple[int, int] | None, max_values: int | None) -> None:
    if frame is not None and (h.rows, h.cols) != tuple(frame):
        raise PixelError(f"a {h.rows}x{h.cols} frame where the index planned {frame[0]}x{frame[1]}: the files changed since indexing")
    values = h.rows * h.cols * h.n_frames
    if max_values is not None and values > max_values:
        raise PixelError(f"declares {h.rows}x{h.cols}x{h.n_frames} values, more than the {max_values} allowed: the files changed since indexing")


def _read_frames(fp: BinaryIO, h: Header, size: int, out: np.ndarray | None) -> np.ndarray:
    dtype = stored_dtype(h)
    shape = (h.n_frames, h.rows, h.cols)
    if out is None or out.shape != shape or out.dtype != dtype:
        out = np.empty(shape, dtype)
    if h.transfer_syntax in NATIVE_SYNTAXES:
        return _read_native(fp, h, out)
    out[...] = _decode(fp, h, size).reshape(shape)
    return out


def _read_native(fp: BinaryIO, h: Header, out: np.ndarray) -> np.ndarray:
    """Uncompressed values straight into `out`, then byte order and unused high bits fixed the
    way pydicom does it (so both paths give the same numbers)."""
    fp.seek(h.pixel_offset + (8 if h.implicit_vr else 12))
    wanted = out.nbytes
    got = fp.readinto(memoryview(out).cast("B"))  # type: ignore[attr-defined]
    if got != wanted:
        raise PixelError(f"truncated pixel data ({got} of {wanted} bytes)")
    if not h.little_endian and out.dtype.itemsize > 1:
        out.byteswap(inplace=True)
    shift = h.bits_allocated - h.bits_stored
    if 0 < shift < h.bits_allocated:
        np.left_shift(out, shift, out=out)
        np.right_shift(out, shift, out=out)
    return out


def _decode(fp: BinaryIO, h: Header, size: int) -> np.ndarray:
    """Compressed frames through pydicom's decoders, from the encapsulated bytes of the file
    already open, handed over with just the pixel description (the header is not parsed a
    second time). A deflated file (the whole body compressed) is simply read again in full."""
    from pydicom import dcmread  # only compressed data needs pydicom (its import costs ~0.3 s)
    from pydicom.uid import UID

    try:
        if is_encapsulated(h.transfer_syntax):
            fp.seek(h.pixel_offset + 12)  # encapsulated pixel data is always explicit VR: 12-byte header
            end = fragments_end(fp, size)
            fp.seek(h.pixel_offset + 12)
            return _pixel_dataset(h, fp.read(end - fp.tell())).pixel_array
        fp.seek(0)
        return dcmread(fp).pixel_array
    except Exception as e:  # decoder plugins raise their own types
        name = getattr(UID(h.transfer_syntax), "name", h.transfer_syntax)
        raise PixelError(f"cannot decode pixel data ({name}): {describe(e, h.uri)}") from e


def _pixel_dataset(h: Header, encapsulated: bytes) -> Any:
    """The smallest Dataset pydicom's decoders accept: the Image Pixel module and the data."""
    from pydicom.dataset import Dataset, FileMetaDataset

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = h.transfer_syntax
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.NumberOfFrames = h.rows, h.cols, h.samples, h.n_frames
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = h.bits_allocated, h.bits_stored, h.bits_stored - 1
    ds.PixelRepresentation, ds.PhotometricInterpretation = int(h.signed), h.photometric
    ds.PixelData = encapsulated
    ds["PixelData"].VR, ds["PixelData"].is_undefined_length = "OB", True
    return ds


def cut_mosaic(frame: np.ndarray, tiles: int) -> np.ndarray:
    """A Siemens mosaic frame (rows, columns) cut into its tiles, row by row: (tiles, r, c).

    >>> cut_mosaic(np.arange(16).reshape(4, 4), 3)[:, 0, 0].tolist()
    [0, 2, 8]
    """
    grid = mosaic_grid(tiles)
    rows, cols = frame.shape[0] // grid, frame.shape[1] // grid
    blocks = frame[: rows * grid, : cols * grid].reshape(grid, rows, grid, cols).transpose(0, 2, 1, 3)
    return blocks.reshape(grid * grid, rows, cols)[:tiles]


def read_slices(root: Path, uris: Sequence[str], workers: int | None = None, *, frame: tuple[int, int] | None = None) -> tuple[list[Header], np.ndarray]:
    """A stack of single-frame files in the given order: (n, rows, columns) stored values.

    The first file fixes the buffer's type and shape (each file is checked against `frame`
    first, so a changed file never sizes the buffer); the others are read by a thread pool
    straight into their slot. A file of a different stored type (rare: a scanner mixing signed
    and unsigned) is converted when its values fit, else refused. A failure names the slice
    ("slice 6 of 40") in its reason and the file in `where`."""
    n = len(uris)
    first, values = _slice(root, uris, 0, None, frame)
    stack = np.empty((n,) + values.shape[1:], values.dtype)
    stack[0] = values[0]
    headers: list[Header] = [first] * n

    def one(k: int) -> None:
        slot = stack[k : k + 1]
        h, values = _slice(root, uris, k, slot, frame)
        if values is not slot:  # another stored type or size: read elsewhere, convert if it fits
            if values.shape != slot.shape:
                raise ItemError(where=uris[k], reason=f"a {values.shape[1]}x{values.shape[2]} slice in a {slot.shape[1]}x{slot.shape[2]} series (slice {k + 1} of {n})")
            slot[...] = _fit(values, stack.dtype, uris[k], f"slice {k + 1} of {n}")
        headers[k] = h

    with ThreadPoolExecutor(max_workers=workers or available_cpus()) as pool:
        list(pool.map(one, range(1, n)))
    return headers, stack


def _slice(root: Path, uris: Sequence[str], k: int, out: np.ndarray | None, frame: tuple[int, int] | None) -> tuple[Header, np.ndarray]:
    try:
        return read_file(root, uris[k], out, frame=frame, max_values=None if frame is None else frame[0] * frame[1])
    except ItemError as e:
        raise ItemError(where=e.where, reason=f"{e.reason} (slice {k + 1} of {len(uris)})") from e


def _fit(values: np.ndarray, dtype: np.dtype, uri: str, which: str) -> np.ndarray:
    info = np.iinfo(dtype)
    if values.size and (values.min() < info.min or values.max() > info.max):
        raise ItemError(where=uri, reason=f"stored as {values.dtype}, its values do not fit the series' {dtype} ({which})")
    return values.astype(dtype)


def rescale(stack: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray) -> np.ndarray:
    """Apply RescaleSlope/Intercept per slice of (n, rows, columns), in place where possible.

    Integer in, integer out when lossless: int16 if every rescaled value fits (CT in HU does),
    else the stored type if there is nothing to add, else int32; a non-integer slope or
    intercept gives float32.

    >>> rescale(np.array([[[0, 1000]]], np.uint16), np.array([1.0]), np.array([-1024.0])).tolist()
    [[[-1024, -24]]]
    """
    slopes, intercepts = np.asarray(slopes, float), np.asarray(intercepts, float)
    integral = bool(np.all(slopes == 1) and np.all(intercepts == np.round(intercepts)))
    if not integral or stack.dtype.kind == "f":
        out = stack.astype(np.float32)
        out *= slopes.astype(np.float32)[:, None, None]
        out += intercepts.astype(np.float32)[:, None, None]
        return out
    low, high = int(stack.min()), int(stack.max())
    shifted = intercepts.astype(np.int64)
    if low + shifted.min() >= INT16.min and high + shifted.max() <= INT16.max:
        if stack.dtype == np.int16 or stack.dtype.itemsize == 1 or (stack.dtype == np.uint16 and high <= INT16.max):
            out = stack.view(np.int16) if stack.dtype == np.uint16 else stack.astype(np.int16, copy=False)
            _add_per_slice(out, shifted)
            return out
        out = stack.astype(np.int32)
        _add_per_slice(out, shifted)
        return out.astype(np.int16)
    if not shifted.any():
        return stack
    out = stack.astype(np.int64 if stack.dtype.itemsize >= 4 else np.int32)
    _add_per_slice(out, shifted)
    return out


def _add_per_slice(out: np.ndarray, intercepts: np.ndarray) -> None:
    """Add each slice's intercept in place (skipping zeros: most MR has none)."""
    if np.all(intercepts == intercepts[0]):
        if intercepts[0]:
            out += out.dtype.type(intercepts[0])
        return
    for k in np.flatnonzero(intercepts):
        out[k] += out.dtype.type(intercepts[k])
