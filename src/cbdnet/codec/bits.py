"""Bit planes as stored: packed bits, plain or as exact GF(2) factors ``B @ C``.

:class:`PlaneCode` is one stored plane; :func:`store_plane` factors a plane where that is smaller and checks
the factors bit for bit before accepting them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from ..errors import WeightError
from . import gf2

__all__ = ["pack_bits", "unpack_bits", "packed_size", "plane_digest", "packed_digest", "PlaneCode", "store_plane",
           "check_finite"]


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Flatten and pack a bool array into bytes (little-endian bit order)."""
    return np.packbits(np.asarray(bits, dtype=np.bool_).reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`pack_bits` for a bool array of ``shape``."""
    count = int(np.prod(shape)) if shape else 1
    return np.unpackbits(packed, count=count, bitorder="little").astype(np.bool_).reshape(shape)


def packed_size(count: int) -> int:
    """Bytes that :func:`pack_bits` takes for ``count`` bits."""
    return (count + 7) // 8


def plane_digest(plane: np.ndarray) -> str:
    """SHA-256 of a plane's packed bits."""
    return packed_digest(pack_bits(plane))


def packed_digest(packed: np.ndarray) -> str:
    """:func:`plane_digest` of a plane already packed by :func:`pack_bits`."""
    return hashlib.sha256(np.ascontiguousarray(packed, dtype=np.uint8).tobytes()).hexdigest()


@dataclass
class PlaneCode:
    """One bit plane of an ``h x w`` matrix, stored plain (``bits``) or as exact factors (``B``, ``C``)."""

    exponent: int
    storage: str  # "factored" or "packed"
    rank: int  # GF(2) rank for factored planes, -1 where it was not computed
    tensors: dict[str, np.ndarray]
    digest: str

    def bits(self) -> int:
        return sum(t.nbytes for t in self.tensors.values()) * 8

    def decode(self, h: int, w: int) -> np.ndarray:
        if self.storage == "packed":
            return unpack_bits(self.tensors["bits"], (h, w))
        left = unpack_bits(self.tensors["B"], (h, self.rank))
        right = unpack_bits(self.tensors["C"], (self.rank, w))
        return gf2.matmul(left, right)


def store_plane(plane: np.ndarray, exponent: int, try_factor: bool) -> PlaneCode:
    """The smaller of the packed plane and (with ``try_factor``) its exact GF(2) factors."""
    packed = pack_bits(plane)
    digest = packed_digest(packed)
    plain = PlaneCode(exponent, "packed", -1, {"bits": packed}, digest)
    if not try_factor:
        return plain
    left, right = gf2.factor(plane)
    if not np.array_equal(gf2.matmul(left, right), plane):  # the promise: exact, checked bit for bit
        raise RuntimeError("GF(2) factorisation did not reproduce the plane")
    factored = PlaneCode(exponent, "factored", left.shape[1], {"B": pack_bits(left), "C": pack_bits(right)}, digest)
    return factored if factored.bits() < plain.bits() else PlaneCode(exponent, "packed", left.shape[1],
                                                                      plain.tensors, digest)


def check_finite(weight: np.ndarray, name: str) -> None:
    """Refuse a weight with NaN or Inf entries (:class:`cbdnet.WeightError`)."""
    if not np.isfinite(weight).all():
        bad = int((~np.isfinite(weight)).sum())
        raise WeightError(f"layer {name or '?'}: {bad} NaN/Inf weight value(s); refusing to compress")
