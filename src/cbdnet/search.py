"""The per-layer scale search: the smallest threshold ``a`` whose mask ``r > a`` has a small GF(2) rank.

The paper binary-searches ``a`` among the values of ``r`` so that the rank of the 0/1 matrix ``r > a``
equals ``bound = floor(bottleneck * min(h, w))``. A larger ``a`` gives a sparser mask and (almost always) a
lower rank, so the search keeps the invariant "``rank(mask(hi)) <= bound < rank(mask(lo))``" and halves the
interval. GF(2) rank is not strictly monotone in the threshold, so the result has rank *at most* the bound,
usually equal to it. Very dense masks have a low rank again (the all-ones matrix has rank 1), so the search
starts from the sparse end and never accepts the densest candidate without bisecting towards it.

Each probe only needs to know whether the rank exceeds ``bound``, so the elimination stops at ``bound + 1``
pivots (:func:`cbdnet.gf2.rank` with ``limit``), and all-zero rows and columns are dropped before it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import gf2

__all__ = ["ScaleResult", "rank_bound", "search_scale"]


@dataclass(frozen=True)
class ScaleResult:
    scale: float  # the threshold a (a value of r); r > a is the sparse mask
    mask_rank: int  # GF(2) rank of r > a (<= bound)
    bound: int
    rank_calls: int


def rank_bound(h: int, w: int, bottleneck: float) -> int:
    """``floor(bottleneck * min(h, w))``, the largest rank the mask may have."""
    if not 0.0 <= bottleneck <= 1.0:
        raise ValueError(f"bottleneck must be in [0, 1], got {bottleneck}")
    return math.floor(bottleneck * min(h, w) + 1e-9)


def search_scale(r2d: np.ndarray, bound: int) -> ScaleResult:
    """Binary search of ``a`` over the distinct positive values of ``r2d`` (a 2-D array in [0, 1])."""
    values = np.unique(r2d[r2d > 0])
    if values.size == 0:
        raise ValueError("cannot search a scale for an all-zero matrix")
    calls = 0

    def probe(index: int) -> int:
        nonlocal calls
        calls += 1
        return gf2.rank(r2d > values[index], limit=bound + 1)

    # The invariant treats the lowest value as failing without probing it: a nearly all-ones mask has a
    # tiny GF(2) rank (all ones is rank 1), but it is the sparse side of the curve that the method wants.
    lo, hi, hi_rank = -1, values.size - 1, 0  # mask(values[-1]) is empty: rank 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        mid_rank = probe(mid)
        if mid_rank <= bound:
            hi, hi_rank = mid, mid_rank
        else:
            lo = mid
    return ScaleResult(float(values[hi]), hi_rank, bound, calls)
