"""Composite bit-plane codes for normalised magnitudes ``r = |W| / max|W|`` in [0, 1].

Two codes live here, both plain numpy and both deterministic:

**Composite code** (CBDNet, Qiaoben et al. 2019, eq. 4–6). Given the scale ``a`` and ``J`` planes::

    a_s = floor(log2(max(r) / a))          # exponent of the highest plane
    a_i = a_s - J + 1                      # exponent of the lowest plane
    D   = 2^(a_i - 1) / (1 - 2^(a_i - 1)) * a
    c   = a + D                            # the step; D = c * 2^(a_i - 1) is half the finest step
    for i = a_s .. a_i:  P_i = r > c * 2^i - D ;  r -= P_i * c * 2^i
    r_hat = sum_i P_i * c * 2^i

i.e. a greedy binary expansion of ``r`` in units of ``c`` with rounding to nearest. The threshold of plane 0
is exactly ``a``, so every plane with ``i >= 0`` only holds entries whose magnitude exceeds ``a``: those planes
are sparse and low-rank over GF(2) and get factored.

**Uniform code**: ``q = round(r * (2^J - 1))`` stored as its ``J`` binary digits, ``r_hat = q / (2^J - 1)``.
It is the fallback for layers where factoring does not pay, and represents 0 and 1 exactly.

The 2-D arrangement of a weight follows Jaderberg et al.: a conv weight ``[out, in, kh, kw]`` becomes the
``(out*kh) x (in*kw)`` matrix of rows ``(out, kh)`` and columns ``(in, kw)``; a Linear weight is itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

__all__ = [
    "CompositeLayout",
    "composite_layout",
    "min_scale",
    "top_exponent",
    "composite_encode",
    "composite_decode",
    "uniform_encode",
    "uniform_decode",
    "composite_sq_error",
    "uniform_sq_error",
    "to_matrix",
    "from_matrix",
]


def to_matrix(weight: np.ndarray) -> np.ndarray:
    """The 2-D view of a weight: conv ``[o, i, kh, kw] -> [o*kh, i*kw]``; 2-D weights unchanged."""
    if weight.ndim == 2:
        return weight
    if weight.ndim != 4:
        raise ValueError(f"expected a 2-D or 4-D weight, got shape {weight.shape}")
    out_ch, in_ch, kh, kw = weight.shape
    return weight.transpose(0, 2, 1, 3).reshape(out_ch * kh, in_ch * kw)


def from_matrix(matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of :func:`to_matrix` for a weight of the given shape."""
    if len(shape) == 2:
        return matrix.reshape(shape)
    out_ch, in_ch, kh, kw = shape
    return matrix.reshape(out_ch, kh, in_ch, kw).transpose(0, 2, 1, 3)


@dataclass(frozen=True)
class CompositeLayout:
    """The exponents and step of a composite code: planes ``P_i`` for ``i`` in ``exponents`` (high first)."""

    scale: float  # a
    step: float  # c = a + D
    exponents: tuple[int, ...]  # a_s, a_s - 1, ..., a_i

    @property
    def shift(self) -> float:
        """``D``, half the finest step."""
        return self.step * 2.0 ** (self.exponents[-1] - 1)


def composite_layout(scale: float, planes: int, top: float = 1.0) -> CompositeLayout:
    """The paper's exponents and step for scale ``a`` and ``J`` planes, ``top`` being ``max(r)``."""
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if planes < 1:
        raise ValueError(f"need at least one plane, got {planes}")
    high = top_exponent(scale, top)
    low = high - planes + 1
    if low > 0:
        raise ValueError(f"scale {scale} is below top * 2^-J = {top * 2.0 ** -planes}: the J={planes} planes "
                         f"cannot reach down to plane 0 (use min_scale)")
    half = 2.0 ** (low - 1)
    shift = half / (1.0 - half) * scale
    return CompositeLayout(scale=scale, step=scale + shift, exponents=tuple(range(high, low - 1, -1)))


def top_exponent(scale: float, top: float) -> int:
    """``a_s = floor(log2(top / a))``, exactly: the largest ``s`` with ``a * 2^s <= top``. (``math.log2`` of a
    ratio just under a power of two can round up to it: ``a`` = min_scale(5) gave 5 instead of 4.)"""
    high = math.frexp(top / scale)[1] - 1
    while math.ldexp(scale, high) > top:
        high -= 1
    while math.ldexp(scale, high + 1) <= top:
        high += 1
    return high


def min_scale(planes: int, top: float = 1.0) -> float:
    """The smallest scale whose composite code still contains plane 0 (``a_s <= J - 1``): just above
    ``top * 2^-J``. Below it the paper's ``D`` is undefined (``a_i >= 1`` makes ``1 - 2^(a_i - 1) <= 0``)."""
    return float(np.nextafter(top * 2.0**-planes, np.inf))


def composite_encode(r: np.ndarray, layout: CompositeLayout) -> list[np.ndarray]:
    """The bool planes ``P_i`` of ``r`` (any shape), in the order of ``layout.exponents``."""
    residual = np.asarray(r, dtype=np.float64).copy()
    shift = layout.shift
    planes = []
    for exponent in layout.exponents:
        weight = layout.step * 2.0**exponent
        plane = residual > weight - shift
        residual -= plane * weight
        planes.append(plane)
    return planes


def composite_decode(planes: list[np.ndarray], step: float, exponents: tuple[int, ...]) -> np.ndarray:
    """``sum_i P_i * c * 2^i`` in float32, summed high plane first."""
    out = np.zeros(planes[0].shape, dtype=np.float32) if planes else np.zeros(0, dtype=np.float32)
    for plane, exponent in zip(planes, exponents, strict=True):
        out += plane.astype(np.float32) * np.float32(step * 2.0**exponent)
    return out


def uniform_encode(r: np.ndarray, planes: int) -> list[np.ndarray]:
    """The ``J`` binary digits (most significant first) of ``round(r * (2^J - 1))``."""
    levels = (1 << planes) - 1
    q = np.rint(np.asarray(r, dtype=np.float64) * levels).astype(np.int64)
    return [((q >> bit) & 1).astype(np.bool_) for bit in range(planes - 1, -1, -1)]


def uniform_decode(planes: list[np.ndarray]) -> np.ndarray:
    """Inverse of :func:`uniform_encode`: ``q / (2^J - 1)`` in float32."""
    levels = (1 << len(planes)) - 1
    q = np.zeros(planes[0].shape, dtype=np.int64)
    for plane in planes:
        q = (q << 1) | plane.astype(np.int64)
    return (q / levels).astype(np.float32)


@njit(cache=True, nogil=True)
def _composite_sq_error(flat, weights, shift):  # pragma: no cover - compiled
    total = 0.0
    for value in flat:
        residual = value
        for weight in weights:
            if residual > weight - shift:
                residual -= weight
        total += residual * residual
    return total


@njit(cache=True, nogil=True)
def _uniform_sq_error(flat, levels):  # pragma: no cover - compiled
    total = 0.0
    for value in flat:
        residual = value - np.rint(value * levels) / levels
        total += residual * residual
    return total


def composite_sq_error(r: np.ndarray, layout: CompositeLayout) -> float:
    """``sum((r - r_hat)^2)`` of the composite code, by the same float64 steps as :func:`composite_encode`
    but without building the planes (so it costs no memory on a 25088x4096 layer)."""
    weights = np.array([layout.step * 2.0**e for e in layout.exponents], dtype=np.float64)
    flat = np.ascontiguousarray(r, dtype=np.float64).reshape(-1)
    return float(_composite_sq_error(flat, weights, layout.shift))


def uniform_sq_error(r: np.ndarray, planes: int) -> float:
    """``sum((r - r_hat)^2)`` of the uniform ``J``-plane code, as :func:`uniform_encode` rounds."""
    flat = np.ascontiguousarray(r, dtype=np.float64).reshape(-1)
    return float(_uniform_sq_error(flat, float((1 << planes) - 1)))
