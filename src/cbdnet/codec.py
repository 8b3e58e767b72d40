"""One layer's weight <-> its stored code: sign bits, bit planes, exact GF(2) factors and three floats.

:func:`encode_weight` runs the whole per-layer method (normalise, 2-D view, scale search, composite
planes, exact factorisation of the planes above the scale, fallback to a uniform code when factoring
does not pay). :class:`LayerCode` holds exactly what the file stores, knows its own size in bits
(:meth:`LayerCode.bits` counts every stored byte) and decodes back to a float32 weight.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from . import gf2
from .errors import WeightError
from .planes import (
    composite_decode,
    composite_encode,
    composite_layout,
    composite_sq_error,
    from_matrix,
    min_scale,
    to_matrix,
    uniform_decode,
    uniform_encode,
    uniform_sq_error,
)
from .search import rank_bound, search_scale

__all__ = ["PlaneCode", "LayerCode", "encode_weight", "pack_bits", "unpack_bits", "plane_digest", "FALLBACK_RULES",
           "rd_cost"]

MAX_PLANES = 16
SCALE_BITS = 3 * 32  # wmax, a, c stored as float32
FALLBACK_RULES = ("distortion", "size")


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Flatten and pack a bool array into bytes (little-endian bit order)."""
    return np.packbits(np.asarray(bits, dtype=np.bool_).reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    count = int(np.prod(shape)) if shape else 1
    return np.unpackbits(packed, count=count, bitorder="little").astype(np.bool_).reshape(shape)


def plane_digest(plane: np.ndarray) -> str:
    """SHA-256 of a plane's packed bits: what ``info --verify`` compares ``B @ C`` against."""
    return hashlib.sha256(pack_bits(plane).tobytes()).hexdigest()


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


def _store_plane(plane: np.ndarray, exponent: int, try_factor: bool) -> PlaneCode:
    digest = plane_digest(plane)
    plain = PlaneCode(exponent, "packed", -1, {"bits": pack_bits(plane)}, digest)
    if not try_factor:
        return plain
    left, right = gf2.factor(plane)
    if not np.array_equal(gf2.matmul(left, right), plane):  # the promise: exact, checked bit for bit
        raise RuntimeError("GF(2) factorisation did not reproduce the plane")
    factored = PlaneCode(exponent, "factored", left.shape[1], {"B": pack_bits(left), "C": pack_bits(right)}, digest)
    return factored if factored.bits() < plain.bits() else PlaneCode(exponent, "packed", left.shape[1],
                                                                      plain.tensors, digest)


@dataclass
class LayerCode:
    """Everything stored for one layer. ``mode`` is ``cbd`` (composite code), ``uniform``, ``zero`` or ``grid``
    (per-group steps, see :mod:`cbdnet.grid`; its ``scales`` tensor holds the float32 ``steps``)."""

    shape: tuple[int, ...]
    mode: str
    num_planes: int
    wmax: float
    scale: float  # a (cbd); 0 otherwise
    step: float  # c (cbd); 1 / (2^J - 1) (uniform)
    exponents: tuple[int, ...]
    sign: np.ndarray  # packed bits of W < 0 in the 2-D arrangement
    planes: list[PlaneCode]
    bound: int = 0
    mask_rank: int = 0
    rank_calls: int = 0
    reason: str = ""
    extra: dict = field(default_factory=dict)
    steps: np.ndarray | None = None  # grid mode: one float32 step per group of output channels

    @property
    def matrix_shape(self) -> tuple[int, int]:
        if len(self.shape) == 2:
            return int(self.shape[0]), int(self.shape[1])
        out_ch, in_ch, kh, kw = self.shape
        return int(out_ch * kh), int(in_ch * kw)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    def scales(self) -> np.ndarray:
        if self.mode == "grid":
            return np.asarray(self.steps, dtype=np.float32).reshape(-1)
        return np.array([self.wmax, self.scale, self.step], dtype=np.float32)

    def tensors(self) -> dict[str, np.ndarray]:
        """The arrays the file stores for this layer, by short name."""
        out: dict[str, np.ndarray] = {"scales": self.scales()}
        if self.mode != "zero":
            out["sign"] = self.sign
        for index, plane in enumerate(self.planes):
            for key, value in plane.tensors.items():
                out[f"p{index}.{key}"] = value
        return out

    def bits(self) -> int:
        """Every stored bit: sign, planes (plain or factors, byte-padded) and the three float32 scales."""
        return sum(t.nbytes for t in self.tensors().values()) * 8

    def decode_planes(self) -> list[np.ndarray]:
        h, w = self.matrix_shape
        return [plane.decode(h, w) for plane in self.planes]

    def decode(self) -> np.ndarray:
        """The reconstructed float32 weight, in the layer's original shape."""
        if self.mode == "zero":
            return np.zeros(self.shape, dtype=np.float32)
        if self.mode == "grid":
            from .grid import grid_decode  # the grid code builds on this module

            return grid_decode(self)
        h, w = self.matrix_shape
        planes = self.decode_planes()
        magnitude = composite_decode(planes, self.step, self.exponents) if self.mode == "cbd" \
            else uniform_decode(planes)
        signs = np.where(unpack_bits(self.sign, (h, w)), np.float32(-1.0), np.float32(1.0))
        matrix = np.float32(self.wmax) * signs * magnitude
        return np.ascontiguousarray(from_matrix(matrix, self.shape))

    @property
    def factored_planes(self) -> int:
        return sum(plane.storage == "factored" for plane in self.planes)


def _check_finite(weight: np.ndarray, name: str) -> None:
    if not np.isfinite(weight).all():
        bad = int((~np.isfinite(weight)).sum())
        raise WeightError(f"layer {name or '?'}: {bad} NaN/Inf weight value(s); refusing to compress")


def _uniform_code(shape, r2d, negative, wmax, planes, reason, search=None) -> LayerCode:
    stored = [_store_plane(p, k, False) for k, p in zip(range(planes - 1, -1, -1), uniform_encode(r2d, planes),
                                                         strict=True)]
    code = LayerCode(shape, "uniform", planes, wmax, 0.0, float(np.float32(1.0 / ((1 << planes) - 1))),
                     tuple(range(planes - 1, -1, -1)), pack_bits(negative), stored, reason=reason)
    if search is not None:
        code.bound, code.mask_rank, code.rank_calls = search.bound, search.mask_rank, search.rank_calls
    return code


def rd_cost(sq_error: float, bits: int, numel: int) -> float:
    """``D * 4^R``: squared error times 4 to the power of the bits per weight. At high rate a scalar code's
    error falls 4x per extra bit per weight (6 dB/bit), so two codes of one layer compare fairly on this
    product: the lower one gives less error for its bits."""
    return sq_error * 4.0 ** (bits / numel)


def _choose(code: LayerCode, uniform: LayerCode, errors: tuple[float, float], fallback: str) -> LayerCode:
    """The composite code, or the uniform one where the composite code does not pay (see ``encode_weight``)."""
    if fallback == "size":
        return code if code.bits() < uniform.bits() else uniform
    cbd_cost, uniform_cost = (rd_cost(e, c.bits(), c.numel) for e, c in zip(errors, (code, uniform), strict=True))
    if cbd_cost <= uniform_cost:
        return code
    uniform.reason = (f"composite code's error ({errors[0] / max(errors[1], 1e-300):.2f}x the uniform code's) "
                      f"costs more than its {(uniform.bits() - code.bits()) / code.numel:+.3f} bits/weight buy")
    return uniform


def encode_weight(weight: np.ndarray, planes: int = 5, bottleneck: float = 0.3, name: str = "",
                  mode: str = "auto", fallback: str = "distortion") -> LayerCode:
    """Encode one Conv2d/Linear weight with ``planes`` (J) bit planes and the given rank bottleneck.

    ``mode``: ``auto`` (composite code, falling back to uniform where it does not pay) or ``uniform``.
    ``fallback`` says when the composite code does not pay. ``size`` is the paper's rule: when it takes no
    fewer bits than the uniform J-plane code. ``distortion`` (the default) also weighs the error: the
    composite code's top planes span ``[0, c * (2^(a_s+1) - 2^a_i)]``, up to twice the weights' range when
    ``a`` lies just under a power of two (a 192x9 first conv with rank bound 2 gets ``a = 0.90`` and a
    step 1.8x the uniform code's), so it is kept only where its squared error times ``4^(bits/weight)`` is no
    larger than the uniform code's (:func:`rd_cost`).
    """
    if not 1 <= planes <= MAX_PLANES:
        raise ValueError(f"planes must be in 1..{MAX_PLANES}, got {planes}")
    if fallback not in FALLBACK_RULES:
        raise ValueError(f"fallback must be one of {', '.join(FALLBACK_RULES)}, got {fallback!r}")
    weight = np.asarray(weight, dtype=np.float32)
    _check_finite(weight, name)
    shape = tuple(int(s) for s in weight.shape)
    wmax = float(np.abs(weight).max()) if weight.size else 0.0
    if wmax == 0.0:
        return LayerCode(shape, "zero", planes, 0.0, 0.0, 0.0, (), np.zeros(0, np.uint8), [],
                         reason="all weights are zero")
    matrix = to_matrix(weight)
    negative = matrix < 0
    r2d = np.abs(matrix).astype(np.float64) / np.float64(np.float32(wmax))
    if mode == "uniform":
        return _uniform_code(shape, r2d, negative, wmax, planes, "uniform code requested")
    h, w = matrix.shape
    search = search_scale(r2d, rank_bound(h, w, bottleneck))
    if not search.scale < r2d.max():
        return _uniform_code(shape, r2d, negative, wmax, planes, "no entries above the scale", search)
    # a scale so small that J planes cannot span [a, max] is raised to the smallest one that can
    scale = max(search.scale, min_scale(planes, top=1.0))
    layout = composite_layout(scale, planes, top=1.0)
    step = float(np.float32(layout.step))
    stored = [_store_plane(p, e, e >= 0) for p, e in zip(composite_encode(r2d, layout), layout.exponents,
                                                          strict=True)]
    code = LayerCode(shape, "cbd", planes, wmax, float(np.float32(scale)), step, layout.exponents,
                     pack_bits(negative), stored, search.bound, search.mask_rank, search.rank_calls)
    uniform = _uniform_code(shape, r2d, negative, wmax, planes, "factored planes do not pay", search)
    errors = (0.0, 0.0) if fallback == "size" else \
        (composite_sq_error(r2d, layout), uniform_sq_error(r2d, planes))
    return _choose(code, uniform, errors, fallback)
