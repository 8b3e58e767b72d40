"""The paper's per-layer method: normalise, 2-D view, scale search, composite planes, exact factorisation of
the planes above the scale, and the fallback to the uniform code where the composite code does not pay."""

from __future__ import annotations

import numpy as np

from .bits import check_finite, pack_bits, packed_size, store_plane
from .code import MAX_PLANES, CompositeCode, LayerCode, UniformCode, ZeroCode
from .planes import (
    composite_encode,
    composite_layout,
    composite_sq_error,
    min_scale,
    to_matrix,
    uniform_encode,
    uniform_sq_error,
)
from .search import ScaleResult, distinct_positive, rank_bound, search_scale

__all__ = ["encode_weight", "encode_uniform", "rd_cost", "uniform_bits", "FALLBACK_RULES"]

FALLBACK_RULES = ("distortion", "size")


def _uniform_code(shape, r2d, negative, wmax, planes, reason, search: ScaleResult | None = None) -> UniformCode:
    stored = [store_plane(p, k, False) for k, p in zip(range(planes - 1, -1, -1), uniform_encode(r2d, planes),
                                                        strict=True)]
    code = UniformCode(shape, planes, tuple(range(planes - 1, -1, -1)), pack_bits(negative), stored, reason=reason,
                       wmax=wmax, step=float(np.float32(1.0 / ((1 << planes) - 1))))
    if search is not None:
        code.bound, code.mask_rank, code.rank_calls = search.bound, search.mask_rank, search.rank_calls
    return code


def uniform_bits(h: int, w: int, planes: int) -> int:
    """:meth:`LayerCode.bits` of the uniform J-plane code of an ``h x w`` matrix, without building it: a packed
    sign plane, ``planes`` packed magnitude planes and three float32 scales."""
    return 8 * ((planes + 1) * packed_size(h * w) + 3 * 4)


def rd_cost(sq_error: float, bits: int, numel: int) -> float:
    """``D * 4^R``: squared error times 4 to the power of the bits per weight. At high rate a scalar code's
    error falls 4x per extra bit per weight (6 dB/bit), so two codes of one layer compare fairly on this
    product: the lower one gives less error for its bits."""
    return sq_error * 4.0 ** (bits / numel)


def _choose(code: LayerCode, make_uniform, errors: tuple[float, float], fallback: str) -> LayerCode:
    """The composite code, or the uniform one (``make_uniform(reason)`` builds it, only when it is chosen) where
    the composite code does not pay (see ``encode_weight``). Sizes are the paper's fixed-length counts
    (:meth:`LayerCode.bits`), so the decision is the paper's whatever the file's entropy coder later makes of
    either code."""
    plain_bits = uniform_bits(*code.matrix_shape, code.num_planes)
    if fallback == "size":
        return code if code.bits() < plain_bits else make_uniform("factored planes do not pay")
    if rd_cost(errors[0], code.bits(), code.numel) <= rd_cost(errors[1], plain_bits, code.numel):
        return code
    return make_uniform(f"composite code's error ({errors[0] / max(errors[1], 1e-300):.2f}x the uniform code's) "
                        f"costs more than its {(plain_bits - code.bits()) / code.numel:+.3f} bits/weight buy")


def _check(planes: int, fallback: str) -> None:
    if not 1 <= planes <= MAX_PLANES:
        raise ValueError(f"planes must be in 1..{MAX_PLANES}, got {planes}")
    if fallback not in FALLBACK_RULES:
        raise ValueError(f"fallback must be one of {', '.join(FALLBACK_RULES)}, got {fallback!r}")


def _normalised(weight: np.ndarray, name: str):
    weight = np.asarray(weight, dtype=np.float32)
    check_finite(weight, name)
    shape = tuple(int(s) for s in weight.shape)
    wmax = float(np.abs(weight).max()) if weight.size else 0.0
    if wmax == 0.0:
        return shape, wmax, None, None
    matrix = to_matrix(weight)
    return shape, wmax, matrix < 0, np.abs(matrix).astype(np.float64) / np.float64(np.float32(wmax))


def _distinct_normalised(weight: np.ndarray, wmax: float) -> np.ndarray:
    """``distinct_positive(r2d)`` of ``_normalised``'s ``r2d = |w| / wmax``, from the float32 ``|w|``: dividing by
    ``wmax`` in float64 is correctly rounded, so it keeps the order of the float32 values and, since they differ
    by at least 2^-24 of themselves against a rounding of 2^-53, keeps them distinct. The same values, sorted
    on 32-bit keys instead of 64-bit ones (about 2.5x faster on a 100M-weight layer)."""
    magnitudes = distinct_positive(np.abs(np.asarray(weight, np.float32)))
    return magnitudes.astype(np.float64) / np.float64(np.float32(wmax))


def _zero(shape, planes: int) -> ZeroCode:
    return ZeroCode(shape, planes, (), np.zeros(0, np.uint8), [], reason="all weights are zero")


def encode_uniform(weight: np.ndarray, planes: int = 5, name: str = "") -> LayerCode:
    """The plain uniform J-plane code (the paper's fallback) on every entry."""
    _check(planes, "size")
    shape, wmax, negative, r2d = _normalised(weight, name)
    if r2d is None:
        return _zero(shape, planes)
    return _uniform_code(shape, r2d, negative, wmax, planes, "uniform code requested")


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
    _check(planes, fallback)
    if mode == "uniform":
        return encode_uniform(weight, planes, name)
    shape, wmax, negative, r2d = _normalised(weight, name)
    if r2d is None:
        return _zero(shape, planes)
    h, w = r2d.shape
    search = search_scale(r2d, rank_bound(h, w, bottleneck), values=_distinct_normalised(weight, wmax))
    if not search.scale < r2d.max():
        return _uniform_code(shape, r2d, negative, wmax, planes, "no entries above the scale", search)
    # a scale so small that J planes cannot span [a, max] is raised to the smallest one that can
    scale = max(search.scale, min_scale(planes, top=1.0))
    layout = composite_layout(scale, planes, top=1.0)
    stored = [store_plane(p, e, e >= 0) for p, e in zip(composite_encode(r2d, layout), layout.exponents,
                                                         strict=True)]
    code = CompositeCode(shape, planes, layout.exponents, pack_bits(negative), stored,
                         scale=float(np.float32(scale)), bound=search.bound, mask_rank=search.mask_rank,
                         rank_calls=search.rank_calls, wmax=wmax, step=float(np.float32(layout.step)))
    errors = (0.0, 0.0) if fallback == "size" else \
        (composite_sq_error(r2d, layout), uniform_sq_error(r2d, planes))
    return _choose(code, lambda reason: _uniform_code(shape, r2d, negative, wmax, planes, reason, search),
                   errors, fallback)
