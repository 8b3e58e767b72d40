"""``.npz`` data sets loaded with bounded memory (stdlib ``zipfile`` + numpy's public ``.npy`` header readers).

``np.load`` on an ``.npz`` trusts the archive: a ``np.savez_compressed`` file of a few MB can inflate to GBs
(deflate reaches ~1000:1), and a ``.npy`` header can declare any shape, for which numpy allocates before it
reads. :func:`read_npz` instead checks, before any array is inflated, every wanted member's declared
uncompressed size (zip directory) and its ``.npy`` header (shape x dtype), refuses a total over
``max_array_bytes``, and then inflates each array with a bounded reader into a buffer of exactly the declared
size: a member that holds more (or fewer) bytes than its header and zip entry declare is refused, so a lying
size cannot make it read past the limit. No pickle (object dtypes are refused).
"""

from __future__ import annotations

import io
import math
import zipfile

import numpy as np

from .inputs import InputError, escape_name

__all__ = ["NpzFormatError", "read_npz", "npz_members"]

_CHUNK = 1 << 20
_HEADER_LIMIT = 10_000  # numpy's own default cap on a .npy header (bytes)


class NpzFormatError(InputError):
    """The file is no readable ``.npz`` archive (the caller may add the layout it expected)."""


def _size(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 \
        else f"{n:,} bytes"


def npz_members(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Array name -> zip entry (``name.npy``; the last entry wins for a duplicated name, as in numpy)."""
    return {info.filename[:-4]: info for info in archive.infolist() if info.filename.endswith(".npy")}


def _header(stream, shown: str, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=_HEADER_LIMIT)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=_HEADER_LIMIT)
        else:
            raise ValueError(f".npy format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
    except (ValueError, EOFError, OSError, zipfile.BadZipFile) as exc:
        raise InputError(f"{shown}: array '{escape_name(key)}' has no valid .npy header ({exc})") from None
    if dtype.hasobject:
        raise InputError(f"{shown}: array '{escape_name(key)}' holds Python objects ({dtype}); only plain "
                         "numeric arrays are read (no pickle)")
    return tuple(shape), bool(fortran), dtype


def _plan(archive: zipfile.ZipFile, keys: list[str], shown: str, max_array_bytes: int) -> dict:
    """Every wanted member's (entry, header size, shape, fortran, dtype), checked against the limit before
    anything is inflated past its header."""
    members = npz_members(archive)
    declared = sum(members[key].file_size for key in keys)
    if declared > max_array_bytes:
        raise InputError(f"{shown}: its arrays {keys} inflate to {_size(declared)} (declared in the zip directory), "
                         f"over the limit of {_size(max_array_bytes)} for an .npz data set")
    plan, total = {}, 0
    for key in keys:
        info = members[key]
        with archive.open(info) as stream:
            shape, fortran, dtype = _header(stream, shown, key)
            offset = stream.tell()
        nbytes = math.prod(shape) * dtype.itemsize
        total += nbytes
        if total > max_array_bytes:
            raise InputError(f"{shown}: array '{escape_name(key)}' is {dtype} {list(shape)} = {_size(nbytes)}; the "
                             f"arrays {keys} exceed the limit of {_size(max_array_bytes)} for an .npz data set")
        if offset + nbytes != info.file_size:
            raise InputError(f"{shown}: array '{escape_name(key)}' declares {dtype} {list(shape)} ({nbytes:,} "
                             f"bytes) but its zip entry holds {info.file_size - offset:,}: a corrupt or forged file")
        plan[key] = (info, offset, shape, fortran, dtype, nbytes)
    return plan


def _inflate(archive: zipfile.ZipFile, key: str, plan: tuple, shown: str) -> np.ndarray:
    info, offset, shape, fortran, dtype, nbytes = plan
    buffer = np.empty(nbytes, dtype=np.uint8)
    view = buffer.data
    with archive.open(info) as stream:
        assert isinstance(stream, zipfile.ZipExtFile)  # what ZipFile.open returns: it has readinto
        stream.read(offset)  # the header, already parsed
        filled = 0
        while filled < nbytes:
            got = stream.readinto(view[filled:filled + _CHUNK])
            if not got:
                raise InputError(f"{shown}: array '{escape_name(key)}' ends after {filled:,} of its {nbytes:,} "
                                 "bytes: a truncated or forged file")
            filled += got
        if stream.read(1):
            raise InputError(f"{shown}: array '{escape_name(key)}' holds more than its declared {nbytes:,} bytes: "
                             "a forged file")
    array = buffer.view(dtype)
    return array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)


def read_npz(data: bytes | bytearray, keys: list[str], *, shown: str, max_array_bytes: int) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of the ``.npz`` archive ``data`` (the file's bytes), with at most ``max_array_bytes``
    inflated in all. A missing key is a KeyError (the caller names the expected layout); an archive that is no
    zip or a corrupt one is an :class:`NpzFormatError`; a bad header, an object array, a size over the limit
    or a size that lies an :class:`~cbdnet.fileio.InputError`; each names ``shown`` (the file)."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError) as exc:
        raise NpzFormatError(f"{shown} is not a readable .npz file (not a zip archive: {exc})") from None
    with archive:
        members = npz_members(archive)
        missing = [key for key in keys if key not in members]
        if missing:
            raise KeyError(missing)
        try:
            plan = _plan(archive, list(keys), shown, max_array_bytes)
            return {key: _inflate(archive, key, plan[key], shown) for key in keys}
        except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, OSError, EOFError, ValueError) as exc:
            raise NpzFormatError(f"{shown} is not a readable .npz file ({type(exc).__name__}: {exc})") from None
