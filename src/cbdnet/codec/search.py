"""The per-layer scale search: the smallest threshold ``a`` whose mask ``r > a`` has a small GF(2) rank.

The paper binary-searches ``a`` among the values of ``r`` so that the rank of the 0/1 matrix ``r > a``
equals ``bound = floor(bottleneck * min(h, w))``. A larger ``a`` gives a sparser mask and (almost always) a
lower rank, so the search keeps the invariant "``rank(mask(hi)) <= bound < rank(mask(lo))``" and halves the
interval. GF(2) rank is not strictly monotone in the threshold, so the result has rank *at most* the bound,
usually equal to it. Very dense masks have a low rank again (the all-ones matrix has rank 1), so the search
starts from the sparse end and never accepts the densest candidate without bisecting towards it.

Each probe only needs to know whether the rank exceeds ``bound``, so the elimination stops at ``bound + 1``
pivots (:func:`cbdnet.codec.gf2.threshold_rank` with ``limit``), works on the mask packed straight from ``r``
(no 0/1 matrix is built) with all-zero rows and columns dropped, and is skipped altogether when the mask has
at most ``bound`` non-zero rows or columns (then its rank cannot exceed ``bound``). Every probe gets the
same answer as a full rank computation would give, so the search visits the same thresholds and returns the
same scale as the plain binary search; only the probe that ends as the answer may need its exact rank
computed at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from numba import njit

from . import gf2

__all__ = ["ScaleResult", "rank_bound", "search_scale", "distinct_positive"]


@dataclass(frozen=True)
class ScaleResult:
    scale: float  # the threshold a (a value of r); r > a is the sparse mask
    mask_rank: int  # GF(2) rank of r > a (<= bound)
    bound: int
    rank_calls: int  # eliminations actually run
    probes: int = 0  # thresholds tested by the binary search (some answered by the line-count bound)


def rank_bound(h: int, w: int, bottleneck: float) -> int:
    """``floor(bottleneck * min(h, w))``, the largest rank the mask may have."""
    if not 0.0 <= bottleneck <= 1.0:
        raise ValueError(f"bottleneck must be in [0, 1], got {bottleneck}")
    return math.floor(bottleneck * min(h, w) + 1e-9)


RADIX_BITS = 11


@njit(cache=True, nogil=True)
def _radix_sort_keys(keys):  # pragma: no cover - compiled
    """LSD radix sort of unsigned integer keys (``uint64`` or ``uint32``), 11 bits per pass; passes where all
    keys share the digit are skipped (the exponent bits of values in (0, 1] mostly do)."""
    buckets = 1 << RADIX_BITS
    mask = np.uint64(buckets - 1)
    source = keys.copy()
    target = np.empty_like(source)
    counts = np.zeros(buckets, dtype=np.int64)
    for shift in range(0, keys.itemsize * 8, RADIX_BITS):
        counts[:] = 0
        for key in source:
            counts[(key >> np.uint64(shift)) & mask] += 1
        if counts.max() == source.size:
            continue
        total = 0
        for b in range(buckets):
            count = counts[b]
            counts[b] = total
            total += count
        for key in source:
            digit = (key >> np.uint64(shift)) & mask
            target[counts[digit]] = key
            counts[digit] += 1
        source, target = target, source
    return source


@njit(cache=True, nogil=True)
def _positive_keys(values):  # pragma: no cover - compiled
    flat = values.ravel()
    count = 0
    for v in flat:
        count += v > 0
    keys = np.empty(count, dtype=flat.dtype)
    k = 0
    for v in flat:
        if v > 0:
            keys[k] = v
            k += 1
    return keys


@njit(cache=True, nogil=True)
def _dedupe_sorted(sorted_values):  # pragma: no cover - compiled
    out = np.empty_like(sorted_values)
    n = 0
    for v in sorted_values:
        if n == 0 or v != out[n - 1]:
            out[n] = v
            n += 1
    return out[:n]


def distinct_positive(r2d: np.ndarray) -> np.ndarray:
    """``np.unique(r2d[r2d > 0])`` for a finite float64 (or float32) array, in its dtype, by radix sort:
    positive IEEE-754 numbers order like their bit patterns as unsigned integers, so sorting the bits sorts the
    values."""
    kind = np.float32 if np.asarray(r2d).dtype == np.float32 else np.float64
    keys = _positive_keys(np.ascontiguousarray(r2d, dtype=kind))
    bits = np.uint32 if kind == np.float32 else np.uint64
    return _dedupe_sorted(_radix_sort_keys(keys.view(bits)).view(kind))


def search_scale(r2d: np.ndarray, bound: int, values: np.ndarray | None = None) -> ScaleResult:
    """Binary search of ``a`` over the distinct positive values of ``r2d`` (a 2-D array in [0, 1]); ``values``:
    those values, sorted, where the caller has them (``distinct_positive(r2d)`` otherwise)."""
    values = distinct_positive(r2d) if values is None else values
    if values.size == 0:
        raise ValueError("cannot search a scale for an all-zero matrix")
    calls = probes = 0

    def probe(index: int) -> tuple[bool, int]:
        """Whether ``rank(r2d > values[index]) <= bound``, and that rank (-1 when not computed)."""
        nonlocal calls, probes
        probes += 1
        rank, _ = gf2.threshold_rank(r2d, values[index], limit=bound + 1, skip_below=bound + 1)
        if rank < 0:  # at most `bound` non-zero rows or columns: the rank cannot exceed the bound
            return True, -1
        calls += 1
        return rank <= bound, rank

    # The invariant treats the lowest value as failing without probing it: a nearly all-ones mask has a
    # tiny GF(2) rank (all ones is rank 1), but it is the sparse side of the curve that the method wants.
    lo, hi, hi_rank = -1, values.size - 1, 0  # mask(values[-1]) is empty: rank 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        passes, mid_rank = probe(mid)
        if passes:
            hi, hi_rank = mid, mid_rank
        else:
            lo = mid
    if hi_rank < 0:  # the answer was accepted on the line count alone: its exact rank, once
        hi_rank = gf2.threshold_rank(r2d, values[hi])[0]
        calls += 1
    return ScaleResult(float(values[hi]), hi_rank, bound, calls, probes)
