"""Per-group uniform grids stored as bit planes: round-to-nearest (RTN) and the composite code per channel.

A *grid code* stores a weight as ``W_hat = sign * q * step[g]``: a sign plane, the ``B`` binary digits of the
integer magnitude ``q`` in ``[0, 2^B - 1]`` (most significant first), and one float32 step per group ``g`` of
output channels (``granularity='channel'``: one per output channel; ``'tensor'``: one for the whole layer).
Every plane lives in the 2-D arrangement of :func:`cbdnet.codec.planes.to_matrix` (rows ``(out, kh)``), so a group
of output channels is a block of consecutive rows. Each plane is stored packed, or as exact GF(2) factors
where that is smaller (only tried on the planes from ``factor_from`` up: the sparse high planes).

Two ways to choose ``step`` and ``q`` live here:

- :func:`rtn_steps` / :func:`rtn_levels`: symmetric round-to-nearest with ``K`` bits *including the sign*,
  i.e. ``B = K - 1`` magnitude bits, ``2^(K-1) - 1`` levels per side and ``step = max|W_g| / (2^(K-1) - 1)``.
  Stored cost: ``K`` bits per weight plus 32 bits per group (plus byte padding), nothing factored.
- :func:`composite_steps`: the paper's composite code applied to ``r = |W| / max|W_g|`` (per-group
  normalisation) with its scale search on the whole 2-D matrix. Its levels are the same uniform grid with
  step ``max|W_g| * c * 2^(a_i)``; the planes with exponent ``>= 0`` (the entries above ``a``) are sparse and
  get factored, exactly as in the per-tensor code.
"""

from __future__ import annotations

import numpy as np

from .bits import pack_bits, store_plane
from .code import GridCode, row_steps
from .floats import FLOAT16_MAX_REL_ERROR
from .planes import composite_layout, min_scale, to_matrix
from .search import rank_bound, search_scale

__all__ = ["with_levels", "GRANULARITIES", "group_count", "row_steps", "rtn_steps", "rtn_levels", "composite_steps",
           "grid_code", "encode_rtn", "encode_composite_grouped", "round_levels", "half_steps"]

GRANULARITIES = ("channel", "tensor")


def group_count(shape: tuple[int, ...], granularity: str) -> int:
    """How many steps a weight of ``shape`` stores: its output channels, or 1."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    return int(shape[0]) if granularity == "channel" else 1


def _group_max(weight: np.ndarray, groups: int) -> np.ndarray:
    per_channel = np.abs(weight.reshape(weight.shape[0], -1)).max(axis=1)
    return per_channel if groups == weight.shape[0] else np.full(1, per_channel.max())


def rtn_steps(weight: np.ndarray, bits: int, granularity: str = "channel") -> np.ndarray:
    """float32 steps of symmetric K-bit RTN: ``max|W_g| / (2^(K-1) - 1)`` (an all-zero group gets step 1)."""
    if not 2 <= bits <= 17:
        raise ValueError(f"RTN needs 2..17 bits (sign included), got {bits}")
    peak = _group_max(np.asarray(weight, np.float32), group_count(weight.shape, granularity))
    steps = peak / float((1 << (bits - 1)) - 1)
    return np.where(steps > 0, steps, 1.0).astype(np.float32)


def half_steps(steps: np.ndarray) -> np.ndarray:
    """float32 ``steps`` rounded to float16's values where each of them moves by at most 2^-11 of itself (no
    step becomes 0, subnormal or infinite), else unchanged: such steps cost the file 2 bytes each instead of 4."""
    steps = np.asarray(steps, np.float32)
    wide = steps.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        back = wide.astype(np.float16).astype(np.float64)
    if not np.isfinite(back).all() or np.any(np.abs(back - wide) > FLOAT16_MAX_REL_ERROR * np.abs(wide)):
        return steps.copy()
    return back.astype(np.float32)


def round_levels(weight: np.ndarray, steps: np.ndarray, mag_bits: int) -> np.ndarray:
    """Signed integer levels ``clip(round(W / step), -(2^B - 1), 2^B - 1)`` in the weight's shape."""
    per_out = row_steps(weight.shape, steps).astype(np.float64)
    scaled = np.asarray(weight, np.float64) / per_out.reshape((-1,) + (1,) * (weight.ndim - 1))
    top = (1 << mag_bits) - 1
    return np.clip(np.rint(scaled), -top, top).astype(np.int64)


def rtn_levels(weight: np.ndarray, bits: int, granularity: str = "channel") -> tuple[np.ndarray, np.ndarray]:
    """``(levels, steps)`` of symmetric K-bit RTN."""
    steps = rtn_steps(weight, bits, granularity)
    return round_levels(weight, steps, bits - 1), steps


def _group_rms(weight: np.ndarray, groups: int) -> np.ndarray:
    flat = weight.reshape(weight.shape[0], -1).astype(np.float64)
    per_channel = np.sqrt((flat**2).mean(axis=1))
    return per_channel if groups == weight.shape[0] else np.full(1, np.sqrt((flat**2).mean()))


def composite_steps(weight: np.ndarray, planes: int, bottleneck: float,
                    granularity: str = "channel", norm: str = "rms") -> tuple[np.ndarray, int, dict]:
    """Steps of the composite code on per-group normalised magnitudes, and the first plane to factor.

    Returns ``(steps, factor_from, info)``: ``factor_from`` is the grid bit whose plane has exponent 0 (the
    planes at or above it hold only entries above the scale ``a``), ``info`` the search result.
    """
    weight = np.asarray(weight, np.float32)
    groups = group_count(weight.shape, granularity)
    peak = (_group_max(weight, groups) if norm == "max" else _group_rms(weight, groups)).astype(np.float64)
    peak = np.where(peak > 0, peak, 1.0)
    per_out = row_steps(weight.shape, peak.astype(np.float32)).astype(np.float64)
    normalised = np.abs(weight) / per_out.reshape((-1,) + (1,) * (weight.ndim - 1))
    top = normalised.max()
    normalised, peak = normalised / top, peak * top  # r in [0, 1]; a group's unit is its scale
    r2d = to_matrix(normalised)
    h, w = r2d.shape
    search = search_scale(r2d, rank_bound(h, w, bottleneck))
    if not search.scale < r2d.max():  # nothing above the scale: a plain uniform grid over [0, 1]
        return (peak / ((1 << planes) - 1)).astype(np.float32), planes, {"scale": 0.0, "bound": search.bound,
                                                                          "mask_rank": 0}
    r_top = float(r2d.max())  # a scale so small that J planes cannot span [a, top] is raised to the smallest that can
    layout = composite_layout(max(search.scale, min_scale(planes, r_top)), planes, top=r_top)
    low = layout.exponents[-1]
    steps = (peak * layout.step * 2.0**low).astype(np.float32)
    info = {"scale": float(search.scale), "bound": search.bound, "mask_rank": search.mask_rank,
            "rank_calls": search.rank_calls}
    return steps, max(0, min(planes, -low)), info


def with_levels(code: GridCode, levels: np.ndarray, step: str) -> GridCode:
    """``code`` with new signed ``levels`` on its own grid (steps, magnitude planes, the planes tried for
    factoring), its reason extended by ``", " + step`` and its report extras kept: how a re-rounding step
    (refit, learned rounding) replaces a chosen code."""
    tried = [plane.exponent for plane in code.planes if plane.rank >= 0]
    out = grid_code(levels, code.scales(), code.num_planes, factor_from=min(tried) if tried else None,
                    reason=f"{code.reason}, {step}")
    out.extra.update(code.extra)
    return out


def grid_code(levels: np.ndarray, steps: np.ndarray, mag_bits: int, *, factor_from: int | None = None,
              reason: str = "") -> GridCode:
    """The stored code of signed integer ``levels`` (weight shape) on the grid ``steps``.

    ``factor_from``: planes of bit ``>= factor_from`` are stored as GF(2) factors where that is smaller;
    ``None`` stores every plane packed.
    """
    levels = np.asarray(levels, dtype=np.int64)
    shape = tuple(int(s) for s in levels.shape)
    steps = np.ascontiguousarray(np.asarray(steps, dtype=np.float32).reshape(-1))
    if steps.size not in (1, shape[0]):
        raise ValueError(f"{steps.size} steps for {shape[0]} output channels")
    if not 1 <= mag_bits <= 16:
        raise ValueError(f"magnitude bits must be in 1..16, got {mag_bits}")
    top = (1 << mag_bits) - 1
    if np.abs(levels).max(initial=0) > top:
        raise ValueError(f"levels exceed +-{top}")
    matrix = to_matrix(levels)
    magnitude = np.abs(matrix)
    stored = []
    for bit in range(mag_bits - 1, -1, -1):
        plane = ((magnitude >> bit) & 1).astype(np.bool_)
        stored.append(store_plane(plane, bit, factor_from is not None and bit >= factor_from))
    peak = float(np.abs(levels).max(initial=0) * row_steps(shape, steps).max(initial=0))
    return GridCode(shape, mag_bits, tuple(range(mag_bits - 1, -1, -1)), pack_bits(matrix < 0), stored,
                    reason=reason, steps=steps, wmax=peak)


def encode_rtn(weight: np.ndarray, bits: int, granularity: str = "channel") -> GridCode:
    """Honest K-bit RTN baseline (sign included), every plane packed."""
    levels, steps = rtn_levels(weight, bits, granularity)
    code = grid_code(levels, steps, bits - 1, reason=f"rtn {bits} bits per {granularity}")
    code.extra["label"] = f"rtn{bits}/{'ch' if granularity == 'channel' else 'tensor'}"
    return code


def encode_composite_grouped(weight: np.ndarray, planes: int = 5, bottleneck: float = 0.3,
                             granularity: str = "channel", norm: str = "rms") -> GridCode:
    """The composite code with per-channel (or per-tensor) scales: sign + J planes, high planes factored."""
    steps, factor_from, info = composite_steps(weight, planes, bottleneck, granularity, norm)
    levels = round_levels(weight, steps, planes)
    code = grid_code(levels, steps, planes, factor_from=factor_from,
                     reason=f"composite J={planes} per {granularity}")
    code.scale, code.bound, code.mask_rank = info["scale"], info["bound"], info["mask_rank"]
    code.extra["label"] = f"cbd J={planes}/{'ch' if granularity == 'channel' else 'tensor'}"
    return code
