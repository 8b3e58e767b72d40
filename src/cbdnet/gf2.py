"""Exact linear algebra over GF(2) on bit-packed matrices: the hot kernel of the scale search.

A 0/1 matrix is packed row-wise into ``uint64`` words (bit ``j`` of word ``k`` is column ``64k + j``),
so one XOR combines 64 entries. Gaussian elimination over GF(2) then costs ``O(rank * rows * cols / 64)``
word operations. The kernels are compiled with numba.

Public API (numpy in, numpy out):

- :func:`rank` – the true GF(2) rank, optionally stopping as soon as it exceeds a limit;
- :func:`factor` – an exact factorisation ``P = B @ C (mod 2)`` with ``B`` of shape ``(h, r)``,
  ``C`` of shape ``(r, w)`` and ``r = rank(P)``;
- :func:`matmul` – ``B @ C (mod 2)``, used to verify factors bit for bit.

The factorisation comes from the reduced row echelon form ``R`` of ``P``: its ``r`` non-zero rows span the
row space, and because ``R`` has an identity at its pivot columns, row ``i`` of ``P`` equals the sum of the
rows ``k`` of ``R`` for which ``P[i, pivot_k] = 1``. Hence ``C = R[:r]`` and ``B = P[:, pivots]``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["rank", "factor", "matmul", "pack_rows", "unpack_rows"]


def _as_bits(bits: np.ndarray) -> np.ndarray:
    array = np.asarray(bits)
    if array.ndim != 2:
        raise ValueError(f"expected a 2-D 0/1 matrix, got shape {array.shape}")
    if array.dtype == np.bool_:
        return array
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"expected a bool or integer 0/1 matrix, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 1):
        raise ValueError("matrix entries must be 0 or 1")
    return array.astype(np.bool_)


def pack_rows(bits: np.ndarray) -> np.ndarray:
    """Pack a 2-D 0/1 matrix into ``uint64`` words per row (little-endian bit order)."""
    bits = _as_bits(bits)
    h, w = bits.shape
    words = max(1, (w + 63) // 64)
    packed = np.zeros((h, words * 8), dtype=np.uint8)
    if w:
        packed[:, : (w + 7) // 8] = np.packbits(bits, axis=1, bitorder="little")
    return packed.view("<u8").astype(np.uint64, copy=False)


def unpack_rows(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`: a ``(rows, width)`` bool matrix."""
    as_bytes = np.ascontiguousarray(packed.astype("<u8", copy=False)).view(np.uint8)
    return np.unpackbits(as_bytes, axis=1, count=width, bitorder="little").astype(np.bool_)


@njit(cache=True, nogil=True)
def _eliminate(rows, ncols, limit, reduced, pivots):  # pragma: no cover - compiled
    """In-place GF(2) elimination of packed ``rows``; returns the rank (capped at ``limit``).

    With ``reduced`` the pivot column is cleared in every other row (reduced row echelon form),
    otherwise only below the pivot (enough for the rank). ``pivots[k]`` receives the k-th pivot column.
    """
    h, nwords = rows.shape
    r = 0
    one = np.uint64(1)
    for col in range(ncols):
        if r >= h or r >= limit:
            break
        word = col >> 6
        bit = one << np.uint64(col & 63)
        pivot = -1
        for i in range(r, h):
            if rows[i, word] & bit:
                pivot = i
                break
        if pivot < 0:
            continue
        if pivot != r:
            for k in range(word, nwords):
                tmp = rows[pivot, k]
                rows[pivot, k] = rows[r, k]
                rows[r, k] = tmp
        start = 0 if reduced else r + 1
        for i in range(start, h):
            if i != r and rows[i, word] & bit:
                for k in range(word, nwords):
                    rows[i, k] ^= rows[r, k]
        pivots[r] = col
        r += 1
    return r


def _trim(bits: np.ndarray) -> np.ndarray:
    """Drop all-zero rows and columns (rank-preserving) and put the longer side first."""
    bits = bits[bits.any(axis=1)]
    bits = bits[:, bits.any(axis=0)]
    if bits.shape[1] > bits.shape[0]:
        bits = bits.T
    return bits


def rank(bits: np.ndarray, limit: int | None = None) -> int:
    """The GF(2) rank of a 0/1 matrix.

    With ``limit`` the elimination stops once the rank reaches ``limit`` and returns ``limit``: enough to
    answer "is the rank at most ``limit - 1``?" for a fraction of the cost.
    """
    trimmed = _trim(_as_bits(bits))
    if trimmed.size == 0:
        return 0
    cap = min(trimmed.shape) if limit is None else min(int(limit), min(trimmed.shape))
    if cap <= 0:
        return 0
    rows = pack_rows(trimmed)
    pivots = np.zeros(min(trimmed.shape), dtype=np.int64)
    return int(_eliminate(rows, trimmed.shape[1], cap, False, pivots))


def factor(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact factors ``B`` (h×r) and ``C`` (r×w), bool, with ``(B @ C) % 2 == bits`` and ``r = rank``."""
    bits = _as_bits(bits)
    h, w = bits.shape
    rows = pack_rows(bits)
    pivots = np.zeros(max(1, min(h, w)), dtype=np.int64)
    r = int(_eliminate(rows, w, min(h, w), True, pivots)) if bits.size else 0
    pivot_cols = pivots[:r]
    coeffs = np.ascontiguousarray(bits[:, pivot_cols])
    basis = unpack_rows(rows[:r], w) if r else np.zeros((0, w), dtype=np.bool_)
    return coeffs, basis


@njit(cache=True, nogil=True)
def _matmul_packed(left, right_rows, out):  # pragma: no cover - compiled
    h, r = left.shape
    nwords = out.shape[1]
    for i in range(h):
        for k in range(r):
            if left[i, k]:
                for j in range(nwords):
                    out[i, j] ^= right_rows[k, j]


def matmul(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """``left @ right`` over GF(2), as a bool matrix (word-parallel XOR of packed rows)."""
    left = _as_bits(left)
    right = _as_bits(right)
    if left.shape[1] != right.shape[0]:
        raise ValueError(f"shapes {left.shape} and {right.shape} do not multiply")
    width = right.shape[1]
    packed_right = pack_rows(right)
    out = np.zeros((left.shape[0], packed_right.shape[1]), dtype=np.uint64)
    _matmul_packed(np.ascontiguousarray(left), packed_right, out)
    return unpack_rows(out, width)
