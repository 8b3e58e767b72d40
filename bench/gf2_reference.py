"""The plain reference for GF(2) rank: row-by-row Gaussian elimination on a ``uint8`` 0/1 array.

This is the straightforward method (as in the paper's public code style): for each column find a pivot row,
swap it up, and XOR it into every later row that has a 1 in that column, one row at a time. It is only
the baseline that ``bench/bench_gf2.py`` times the fast kernels against; nothing in ``cbdnet`` uses it.
"""

from __future__ import annotations

import numpy as np


def reference_rank(matrix: np.ndarray) -> int:
    """GF(2) rank of a 0/1 matrix by plain row-by-row elimination (the input is not modified)."""
    rows = np.array(matrix, dtype=np.uint8) & 1
    h, w = rows.shape
    rank = 0
    for col in range(w):
        if rank == h:
            break
        pivot = -1
        for i in range(rank, h):
            if rows[i, col]:
                pivot = i
                break
        if pivot < 0:
            continue
        if pivot != rank:
            rows[[rank, pivot]] = rows[[pivot, rank]]
        for i in range(rank + 1, h):
            if rows[i, col]:
                rows[i] ^= rows[rank]
        rank += 1
    return rank
