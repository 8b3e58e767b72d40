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

__all__ = ["rank", "threshold_rank", "mask_lines", "factor", "matmul", "pack_rows", "unpack_rows"]


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


_BYTE_GATHER = np.uint64(0x0102040810204080)  # (x * this) >> 56 packs the 0/1 bytes of x into 8 bits


@njit(cache=True, nogil=True)
def _pack_bytes(chunks, ncols):  # pragma: no cover - compiled
    """Pack a 0/1 ``uint8`` matrix seen as ``uint64`` chunks of 8 entries: one multiply per 8 entries."""
    h, nchunks = chunks.shape
    packed = np.zeros((h, (ncols + 63) // 64), dtype=np.uint64)
    for i in range(h):
        for c in range(nchunks):
            byte = (chunks[i, c] * _BYTE_GATHER) >> np.uint64(56)
            packed[i, c >> 3] |= byte << np.uint64((c & 7) * 8)
    return packed


def pack_rows(bits: np.ndarray) -> np.ndarray:
    """Pack a 2-D 0/1 matrix into ``uint64`` words per row (little-endian bit order)."""
    bits = _as_bits(bits)
    h, w = bits.shape
    if w == 0:
        return np.zeros((h, 1), dtype=np.uint64)
    if w % 8 == 0 and bits.flags.c_contiguous:
        return _pack_bytes(bits.view(np.uint8).view(np.uint64), w)
    return _pack_threshold(bits.view(np.uint8), np.uint8(0), np.arange(h), np.arange(w), True)


@njit(cache=True, nogil=True)
def _unpack(packed, width):  # pragma: no cover - compiled
    out = np.empty((packed.shape[0], width), dtype=np.bool_)
    for i in range(packed.shape[0]):
        for j in range(width):
            out[i, j] = (packed[i, j >> 6] >> np.uint64(j & 63)) & np.uint64(1)
    return out


@njit(cache=True, nogil=True)
def _gather_columns(bits, columns):  # pragma: no cover - compiled
    out = np.empty((bits.shape[0], columns.size), dtype=np.bool_)
    for i in range(bits.shape[0]):
        for k in range(columns.size):
            out[i, k] = bits[i, columns[k]]
    return out


def unpack_rows(packed: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`pack_rows`: a ``(rows, width)`` bool matrix."""
    return _unpack(np.ascontiguousarray(packed, dtype=np.uint64), int(width))


BLOCK_BITS = 8  # pivots per "four Russians" table: 2^8 precomputed XOR combinations


@njit(cache=True, nogil=True)
def _slab_pivots_in(rows, r, end, word, limit):  # pragma: no cover - compiled
    """Move rows of ``rows[r:end]`` whose bits in column word ``word`` are independent to ``rows[r:r+m]``;
    return ``m``. Elimination on that single word (one branch-free XOR per row and column) finds them;
    only their full rows are swapped into place, nothing else is modified."""
    nwords = rows.shape[1]
    slab = rows[r:end, word].copy()
    n = end - r
    m = 0
    for bit in range(64):
        if m >= n or r + m >= limit:
            break
        mask = np.uint64(1) << np.uint64(bit)
        found = -1
        for i in range(m, n):
            if slab[i] & mask:
                found = i
                break
        if found < 0:
            continue
        if found != m:
            tmp = slab[found]
            slab[found] = slab[m]
            slab[m] = tmp
            for k in range(word, nwords):
                t = rows[r + found, k]
                rows[r + found, k] = rows[r + m, k]
                rows[r + m, k] = t
        pivot_word = slab[m]
        shift = np.uint64(bit)
        for i in range(m + 1, n):
            slab[i] ^= pivot_word & (np.uint64(0) - ((slab[i] >> shift) & np.uint64(1)))
        m += 1
    return m


@njit(cache=True, nogil=True)
def _slab_pivots(rows, r, word, ncols, limit):  # pragma: no cover - compiled
    """Pivot rows of column word ``word`` among rows ``r..h-1`` (see :func:`_slab_pivots_in`).

    Dense matrices usually have a full set of pivots among the next few hundred rows, so those are tried
    first; only when they fall short of the most pivots the word can hold are all rows searched.
    """
    h = rows.shape[0]
    most = min(64, ncols - word * 64, limit - r, h - r)
    prefix = r + 4 * 64
    if prefix < h:
        m = _slab_pivots_in(rows, r, prefix, word, limit)
        if m >= most:
            return m
    return _slab_pivots_in(rows, r, h, word, limit)


@njit(cache=True, nogil=True)
def _reduce_pivot_rows(rows, r, m, word, pcols):  # pragma: no cover - compiled
    """Bring ``rows[r:r+m]`` (independent on column word ``word``) to reduced echelon form on that word:
    row ``r+k`` gets a 1 at bit ``pcols[k]`` and 0 at the other pivot bits."""
    nwords = rows.shape[1]
    k = 0
    for bit in range(64):
        if k >= m:
            break
        mask = np.uint64(1) << np.uint64(bit)
        found = -1
        for i in range(r + k, r + m):
            if rows[i, word] & mask:
                found = i
                break
        if found < 0:
            continue
        if found != r + k:
            for j in range(word, nwords):
                t = rows[found, j]
                rows[found, j] = rows[r + k, j]
                rows[r + k, j] = t
        for i in range(r, r + m):
            if i != r + k and rows[i, word] & mask:
                for j in range(word, nwords):
                    rows[i, j] ^= rows[r + k, j]
        pcols[k] = bit
        k += 1


@njit(cache=True, nogil=True)
def _build_tables(rows, r, m, word, start, tables):  # pragma: no cover - compiled
    """``tables[g, idx]`` = XOR of the pivot rows ``r + g*8 + b`` for the set bits ``b`` of ``idx``."""
    nwords = rows.shape[1]
    groups = (m + BLOCK_BITS - 1) // BLOCK_BITS
    for g in range(groups):
        size = min(BLOCK_BITS, m - g * BLOCK_BITS)
        for j in range(start, nwords):
            tables[g, 0, j] = 0
        for idx in range(1, 1 << size):
            low = 0
            while not (idx >> low) & 1:
                low += 1
            prev = idx ^ (1 << low)
            src = r + g * BLOCK_BITS + low
            for j in range(start, nwords):
                tables[g, idx, j] = tables[g, prev, j] ^ rows[src, j]
    return groups


@njit(cache=True, nogil=True)
def _apply_tables(rows, lo, hi, m, word, start, pcols, tables, groups, zero_word):  # pragma: no cover
    """Clear the pivot bits of rows ``lo..hi-1``: XOR one table row per group of 8 pivots."""
    nwords = rows.shape[1]
    one = np.uint64(1)
    shifts = pcols[:m].astype(np.uint64)
    index = np.zeros(BLOCK_BITS, dtype=np.uint64)
    for i in range(lo, hi):
        x = rows[i, word]
        if x == 0:
            continue
        for g in range(groups):
            base = g * BLOCK_BITS
            size = min(BLOCK_BITS, m - base)
            idx = np.uint64(0)
            for b in range(size):
                idx |= ((x >> shifts[base + b]) & one) << np.uint64(b)
            index[g] = idx
        if groups == 8:  # the common full word: one pass over the row, eight table rows XORed in
            t0, t1, t2, t3 = tables[0, index[0]], tables[1, index[1]], tables[2, index[2]], tables[3, index[3]]
            t4, t5, t6, t7 = tables[4, index[4]], tables[5, index[5]], tables[6, index[6]], tables[7, index[7]]
            for j in range(start, nwords):
                rows[i, j] ^= (t0[j] ^ t1[j]) ^ (t2[j] ^ t3[j]) ^ ((t4[j] ^ t5[j]) ^ (t6[j] ^ t7[j]))
        else:
            for g in range(groups):
                if index[g]:
                    for j in range(start, nwords):
                        rows[i, j] ^= tables[g, index[g], j]
        if zero_word:
            rows[i, word] = 0


@njit(cache=True, nogil=True)
def _eliminate(rows, ncols, limit, reduced, pivots):  # pragma: no cover - compiled
    """In-place GF(2) elimination of packed ``rows``; returns the rank (capped at ``limit``).

    Method of the four Russians, one 64-column word at a time: find the pivot rows of that word, reduce them
    among themselves, tabulate all XOR combinations of each group of 8 pivot rows (256 rows per table) and
    clear the word from every other row with one table lookup per group instead of one XOR per pivot.
    With ``reduced`` the rows above are cleared too (reduced row echelon form); ``pivots[k]`` receives the
    pivot column of row ``k``. Without it the elimination stops once ``limit`` pivots are found.
    """
    h, nwords = rows.shape
    tables = np.empty((64 // BLOCK_BITS, 1 << BLOCK_BITS, nwords), dtype=np.uint64)
    pcols = np.zeros(64, dtype=np.int64)
    r = 0
    for word in range((ncols + 63) // 64):
        if r >= h or r >= limit:
            break
        m = _slab_pivots(rows, r, word, ncols, limit)
        if m == 0:
            continue
        if not reduced and r + m >= limit:
            return limit
        _reduce_pivot_rows(rows, r, m, word, pcols)
        for k in range(m):
            pivots[r + k] = word * 64 + pcols[k]
        if reduced:
            groups = _build_tables(rows, r, m, word, word, tables)
            _apply_tables(rows, 0, r, m, word, word, pcols, tables, groups, False)
            _apply_tables(rows, r + m, h, m, word, word, pcols, tables, groups, False)
        elif word + 1 < nwords:
            groups = _build_tables(rows, r, m, word, word + 1, tables)
            _apply_tables(rows, r + m, h, m, word, word + 1, pcols, tables, groups, True)
        r += m
    return min(r, limit)


@njit(cache=True, nogil=True)
def _pack_threshold(values, threshold, row_index, col_index, all_columns):  # pragma: no cover - compiled
    """Pack ``values[row_index][:, col_index] > threshold`` into ``uint64`` rows (all columns when
    ``all_columns``): each row is compared into a 0/1 byte buffer, then 8 bytes become 8 bits with one
    multiply (:data:`_BYTE_GATHER`)."""
    n_cols = values.shape[1] if all_columns else col_index.size
    nwords = (n_cols + 63) // 64
    packed = np.zeros((row_index.size, nwords), dtype=np.uint64)
    buffer = np.zeros(nwords * 64, dtype=np.uint8)
    chunks = buffer.view(np.uint64)
    for a in range(row_index.size):
        i = row_index[a]
        if all_columns:
            for j in range(n_cols):
                buffer[j] = values[i, j] > threshold
        else:
            for j in range(n_cols):
                buffer[j] = values[i, col_index[j]] > threshold
        for word in range(nwords):
            acc = np.uint64(0)
            for c in range(8):
                acc |= ((chunks[word * 8 + c] * _BYTE_GATHER) >> np.uint64(56)) << np.uint64(c * 8)
            packed[a, word] = acc
    return packed


def _packed_mask(values: np.ndarray, threshold) -> np.ndarray:
    """``values > threshold`` packed into ``uint64`` rows, all rows and columns kept."""
    h, w = values.shape
    if values.dtype == np.uint8 and threshold == 0 and w % 8 == 0 and values.flags.c_contiguous:
        return _pack_bytes(values.view(np.uint64), w)  # a 0/1 matrix: 8 entries per multiply
    return _pack_threshold(values, threshold, np.arange(h), np.arange(0), True)


def _trimmed_mask(values: np.ndarray, threshold) -> tuple[np.ndarray, int, int]:
    """The packed mask ``values > threshold`` without its all-zero rows (and without its all-zero columns
    where that saves whole words per row); returns ``(rows, ncols, upper)`` with ``upper`` = min(#non-zero
    rows, #non-zero columns), a free upper bound of the rank."""
    rows = _packed_mask(values, threshold)
    nonzero_rows = rows.any(axis=1)
    column_bits = np.bitwise_or.reduce(rows, axis=0)
    n_rows, n_cols = int(nonzero_rows.sum()), int(np.bitwise_count(column_bits).sum())
    upper = min(n_rows, n_cols)
    width = values.shape[1]
    if (n_cols + 63) // 64 < rows.shape[1]:
        columns = np.flatnonzero(_unpack(column_bits[None, :], width)[0])
        return _pack_threshold(values, threshold, np.flatnonzero(nonzero_rows), columns, False), n_cols, upper
    return (rows[nonzero_rows] if n_rows < rows.shape[0] else rows), width, upper


def _threshold_rank(values: np.ndarray, threshold, limit: int | None, skip_below: int = 0) -> tuple[int, int]:
    """``(rank, upper)`` of the 0/1 matrix ``values > threshold`` (see :func:`_trimmed_mask` for ``upper``).
    When ``upper < skip_below`` the elimination is skipped and the rank returned is -1 (unknown)."""
    rows, ncols, upper = _trimmed_mask(values, threshold)
    if upper < skip_below:
        return -1, upper
    cap = upper if limit is None else min(int(limit), upper)
    if cap <= 0:
        return 0, upper
    return int(_eliminate(rows, ncols, cap, False, np.zeros(upper, dtype=np.int64))), upper


def rank(bits: np.ndarray, limit: int | None = None) -> int:
    """The GF(2) rank of a 0/1 matrix.

    With ``limit`` the elimination stops once the rank reaches ``limit`` and returns ``limit``: enough to
    answer "is the rank at most ``limit - 1``?" for a fraction of the cost.
    """
    bits = _as_bits(bits)
    if bits.size == 0:
        return 0
    if bits.shape[1] > bits.shape[0]:  # rows as the longer side: fewer words per row
        bits = np.ascontiguousarray(bits.T)
    return _threshold_rank(bits.view(np.uint8), np.uint8(0), limit)[0]


def threshold_rank(values: np.ndarray, threshold: float, limit: int | None = None,
                   skip_below: int = 0) -> tuple[int, int]:
    """``rank(values > threshold, limit)`` without building the 0/1 matrix, and a free upper bound.

    Returns ``(rank, upper)`` where ``upper`` = min(#non-zero rows, #non-zero columns) of the mask >= its
    rank. ``values`` is a real 2-D array (compared as is, so the mask is exactly ``values > threshold``).
    With ``skip_below``, a mask whose ``upper`` is below it is not eliminated at all: rank -1 (unknown,
    but at most ``upper``).
    """
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {values.shape}")
    if values.size == 0:
        return 0, 0
    return _threshold_rank(values, values.dtype.type(threshold), limit, skip_below)


def mask_lines(values: np.ndarray, threshold: float) -> int:
    """min(#non-zero rows, #non-zero columns) of ``values > threshold``: an upper bound of its rank."""
    values = np.asarray(values)
    return _trimmed_mask(values, values.dtype.type(threshold))[2]


def factor(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact factors ``B`` (h×r) and ``C`` (r×w), bool, with ``(B @ C) % 2 == bits`` and ``r = rank``."""
    bits = _as_bits(bits)
    h, w = bits.shape
    rows = pack_rows(bits)
    pivots = np.zeros(max(1, min(h, w)), dtype=np.int64)
    r = int(_eliminate(rows, w, min(h, w), True, pivots)) if bits.size else 0
    pivot_cols = pivots[:r]
    coeffs = _gather_columns(bits, pivot_cols)
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
