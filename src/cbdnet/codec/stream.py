"""One layer's integer levels as format v2 stores them: entropy-coded, optionally with GF(2)-factored high planes.

A layer's code is signed integer magnitudes ``q = sign * m`` on an ``h x w`` matrix, ``m = sum_i P_i << s_i``
(plane ``i`` at shift ``s_i = e_i - min(e)``). Two codings are tried and the smaller kept:

- ``ans``: the signed levels ``q`` in one :mod:`.entropy` blob;
- ``ans-kernel`` (convolutions with kernels of 2 or more positions): the signed levels in weight order
  (``[out, in, kh, kw]``) in one blob coded with the kernel contexts of :mod:`.entropy` (mode KERNEL, naming
  the layer's kernel; the other codings refuse that mode);
- ``gf2+ans``: the planes the encoder stored as exact GF(2) factors ``B @ C`` (``rank * (h + w)`` bits, packed)
  plus two blobs: the remainder magnitudes ``m - sum_factored P_i << s_i`` and the signs of the non-zero ``m``.
  Each factored plane carries the CRC-32 of its packed bits, checked against ``B @ C`` on decoding.

A sign where ``m == 0`` carries no information and is not kept (the decoded weight is ``+0.0`` there).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from . import gf2
from .bits import PlaneCode, pack_bits, packed_size, unpack_bits
from .entropy import decode_levels, encode_kernel_levels, encode_levels, uses_kernel
from .planes import from_matrix, to_matrix

__all__ = ["Stream", "FactoredPlane", "encode_stream", "decode_stream", "StreamError", "factor_sizes", "kernel_of",
           "CODINGS", "KERNEL_MIN_SAVING"]

CODINGS = {"none": 0, "ans": 1, "ans-kernel": 1, "gf2+ans": 2}  # each coding's number of blobs


class StreamError(ValueError):
    """Stored stream parts that do not decode to a valid code (reported as a corrupt file)."""


@dataclass
class FactoredPlane:
    index: int  # plane index in the code (0 = first stored plane)
    rank: int
    crc: int  # CRC-32 of the packed plane bits
    left: np.ndarray  # packed bits of B (h x rank)
    right: np.ndarray  # packed bits of C (rank x w)

    @property
    def nbytes(self) -> int:
        return int(self.left.nbytes + self.right.nbytes)


@dataclass
class Stream:
    """What v2 stores for one layer's levels (the steps/scales are stored beside it)."""

    coding: str  # "ans", "ans-kernel", "gf2+ans" or "none" (an all-zero code: nothing stored)
    blobs: list[bytes | memoryview] = field(default_factory=list)  # a file's reader keeps views of its bytes
    factored: list[FactoredPlane] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.blobs) + sum(f.nbytes for f in self.factored)

    def parts(self) -> list[bytes | memoryview]:
        """The stored byte strings in file order: the blobs, then each factored plane's B and C."""
        out = list(self.blobs)
        for plane in self.factored:
            out += [plane.left.tobytes(), plane.right.tobytes()]
        return out


def _shifts(exponents: tuple[int, ...]) -> list[int]:
    low = min(exponents) if exponents else 0
    return [e - low for e in exponents]


def _as_int(q: np.ndarray) -> np.ndarray:
    """``q`` flattened as int32 where that holds every value (a quarter of int64's memory traffic on a big
    layer's levels), else int64."""
    flat = np.asarray(q).reshape(-1)
    kind, size = flat.dtype.kind, flat.dtype.itemsize
    small = (kind == "i" and size <= 4) or (kind in "ub" and size < 4)
    if not small and flat.size:
        small = int(flat.min()) > -(2**31) and int(flat.max()) < 2**31
    return flat.astype(np.int32 if small else np.int64, copy=False)


# kernel contexts decode about 2x slower than one table: kept only where they save at least this share of the
# layer's levels (4-8 % on trained kernels; about 0.1 % on random ones, where they are not worth the time)
KERNEL_MIN_SAVING = 0.01


def kernel_of(shape: tuple[int, ...] | None) -> tuple[int, int] | None:
    """``(kh, kw)`` of a convolution weight's ``shape`` whose kernel slices have 2 or more positions, else None."""
    if shape is None or len(shape) != 4 or shape[2] * shape[3] < 2:
        return None
    return int(shape[2]), int(shape[3])


def _plain(q: np.ndarray, flat: np.ndarray, shape: tuple[int, ...] | None) -> Stream:
    """``ans``, or ``ans-kernel`` where the weight has kernels and their contexts code it at least
    ``KERNEL_MIN_SAVING`` smaller."""
    plain = Stream("ans", [encode_levels(flat)])
    kernel = kernel_of(shape)
    blob = None if kernel is None or shape is None else encode_kernel_levels(_as_int(from_matrix(q, shape)), kernel)
    if blob is not None and len(blob) <= (1.0 - KERNEL_MIN_SAVING) * len(plain.blobs[0]):
        return Stream("ans-kernel", [blob])
    return plain


def encode_stream(q: np.ndarray, exponents: tuple[int, ...], planes: list[PlaneCode],
                  shape: tuple[int, ...] | None = None) -> Stream:
    """The smallest of the ``ans``, (for a convolution weight of ``shape``) ``ans-kernel`` and (where the code has
    factored planes) ``gf2+ans`` codings of ``q``."""
    if not planes:
        return Stream("none")
    flat = _as_int(q)
    plain = _plain(q, flat, shape)
    factored = [i for i, p in enumerate(planes) if p.storage == "factored"]
    if not factored:
        return plain
    h, w = q.shape
    shifts = _shifts(exponents)
    magnitude = np.abs(flat)
    remainder = magnitude.copy()
    kept = []
    for index in factored:
        bit = (magnitude >> shifts[index]) & 1
        remainder -= bit << shifts[index]
        code = planes[index]
        crc = zlib.crc32(pack_bits(bit.reshape(h, w).astype(bool)).tobytes())
        kept.append(FactoredPlane(index, code.rank, crc, code.tensors["B"], code.tensors["C"]))
    signs = (flat[magnitude != 0] < 0).astype(np.int8)
    split = Stream("gf2+ans", [encode_levels(remainder), encode_levels(signs)], kept)
    return split if split.nbytes < plain.nbytes else plain


def decode_stream(coding: str, parts: Sequence[bytes | memoryview], factored: list[tuple[int, int, int]], h: int,
                  w: int, exponents: tuple[int, ...], shape: tuple[int, ...] | None = None
                  ) -> tuple[np.ndarray, list[PlaneCode | None]]:
    """``(q, planes)``: the signed ``h x w`` levels (a signed integer type wide enough for them) and, per plane,
    the factored :class:`PlaneCode` or None. ``factored`` lists ``(index, rank, crc)``; ``parts`` are the blobs
    then B, C per factored plane; ``shape``: the weight's (``ans-kernel`` needs it). Checks that the levels fit
    the planes and every factored product against its CRC-32 (:class:`StreamError`)."""
    count = h * w
    limit = 1 << len(exponents)
    shifts = _shifts(exponents)
    out: list[PlaneCode | None] = [None] * len(exponents)
    try:
        if coding == "ans":
            q = decode_levels(parts[0], count, narrow=True)
            largest = max(-int(q.min()), int(q.max())) if q.size else 0
        elif coding == "ans-kernel":
            kernel = kernel_of(shape)
            if kernel is None or shape is None or shape[0] * shape[2] != h or shape[1] * shape[3] != w:
                raise StreamError(f"coding ans-kernel needs a convolution with kernels, not shape {shape}")
            if not uses_kernel(parts[0]):
                raise StreamError("coding ans-kernel without kernel contexts in its blob")
            q = to_matrix(decode_levels(parts[0], count, narrow=True, kernel=kernel).reshape(shape))
            largest = max(-int(q.min()), int(q.max())) if q.size else 0
        elif coding == "gf2+ans":
            magnitude = decode_levels(parts[0], count)
            if magnitude.size and magnitude.min() < 0:
                raise StreamError("negative remainder")
            for k, (index, rank, crc) in enumerate(factored):
                left, right = parts[2 + 2 * k], parts[3 + 2 * k]
                bits = gf2.matmul(unpack_bits(np.frombuffer(left, np.uint8), (h, rank)),
                                  unpack_bits(np.frombuffer(right, np.uint8), (rank, w)))
                if zlib.crc32(pack_bits(bits).tobytes()) != crc:
                    raise StreamError(f"factored plane {index}: B @ C does not match its CRC-32")
                step = np.int64(1) << shifts[index]
                if np.any(magnitude & step):
                    raise StreamError(f"factored plane {index} overlaps the remainder")
                magnitude = magnitude + bits.reshape(-1).astype(np.int64) * step
                out[index] = PlaneCode(exponents[index], "factored", rank,
                                       {"B": np.frombuffer(left, np.uint8).copy(),
                                        "C": np.frombuffer(right, np.uint8).copy()}, "")
            nonzero = magnitude != 0
            signs = decode_levels(parts[1], int(nonzero.sum()))
            if signs.size and (signs.min() < 0 or signs.max() > 1):
                raise StreamError("sign blob holds values other than 0 and 1")
            q = magnitude.copy()
            q[nonzero] = np.where(signs == 1, -magnitude[nonzero], magnitude[nonzero])
            largest = int(magnitude.max()) if magnitude.size else 0
        else:
            raise StreamError(f"unknown coding {coding!r}")
    except ValueError as exc:
        raise StreamError(str(exc)) from None
    if largest >= limit:
        raise StreamError(f"levels exceed the {len(exponents)} planes of the code")
    return q.reshape(h, w), out


def factor_sizes(h: int, w: int, rank: int) -> tuple[int, int]:
    """Packed bytes of ``B`` (``h x rank``) and ``C`` (``rank x w``)."""
    return packed_size(h * rank), packed_size(rank * w)
