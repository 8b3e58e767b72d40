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
def _slab_transform(rows, r, m, word, pcols, transform):  # pragma: no cover - compiled
    """Gauss-Jordan on the single column word ``word`` of the pivot rows ``rows[r:r+m]``, with the row
    operations tracked instead of applied: reduced row ``k`` (a 1 at bit ``pcols[k]``, 0 at the other pivot
    bits) is the XOR of the original pivot rows ``r + j`` for the set bits ``j`` of ``transform[k]``."""
    slab = rows[r:r + m, word].copy()
    for j in range(m):
        transform[j] = np.uint64(1) << np.uint64(j)
    k = 0
    for bit in range(64):
        if k >= m:
            break
        mask = np.uint64(1) << np.uint64(bit)
        found = -1
        for i in range(k, m):
            if slab[i] & mask:
                found = i
                break
        if found < 0:
            continue
        slab[found], slab[k] = slab[k], slab[found]
        transform[found], transform[k] = transform[k], transform[found]
        for i in range(m):
            if i != k and slab[i] & mask:
                slab[i] ^= slab[k]
                transform[i] ^= transform[k]
        pcols[k] = bit
        k += 1


@njit(cache=True, nogil=True)
def _coefficient_tables(transform, pcols, m, coef):  # pragma: no cover - compiled
    """``coef[g, byte]``: which original pivot rows to XOR into a row whose slab word has ``byte`` as its
    byte ``g``. Bit ``p`` of the slab word calls for reduced pivot row ``k`` when ``p == pcols[k]``, that is
    for the original rows ``transform[k]``; non-pivot bits call for nothing."""
    by_bit = np.zeros(64, dtype=np.uint64)
    for k in range(m):
        by_bit[pcols[k]] = transform[k]
    for g in range(8):
        coef[g, 0] = 0
        for byte in range(1, 256):
            low = 0
            while not (byte >> low) & 1:
                low += 1
            coef[g, byte] = coef[g, byte ^ (1 << low)] ^ by_bit[g * 8 + low]


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
def _xor_combination(rows, i, combo, start, tables, groups):  # pragma: no cover - compiled
    """``rows[i, start:] ^=`` the XOR of the original pivot rows selected by the bits of ``combo``:
    one table row per group of 8 pivots."""
    nwords = rows.shape[1]
    if groups == 8:  # the common full word: one pass over the row, eight table rows XORed in
        byte = np.uint64(255)
        t0, t1 = tables[0, combo & byte], tables[1, (combo >> np.uint64(8)) & byte]
        t2, t3 = tables[2, (combo >> np.uint64(16)) & byte], tables[3, (combo >> np.uint64(24)) & byte]
        t4, t5 = tables[4, (combo >> np.uint64(32)) & byte], tables[5, (combo >> np.uint64(40)) & byte]
        t6, t7 = tables[6, (combo >> np.uint64(48)) & byte], tables[7, combo >> np.uint64(56)]
        for j in range(start, nwords):
            rows[i, j] ^= (t0[j] ^ t1[j]) ^ (t2[j] ^ t3[j]) ^ ((t4[j] ^ t5[j]) ^ (t6[j] ^ t7[j]))
    else:
        for g in range(groups):
            index = (combo >> np.uint64(8 * g)) & np.uint64(255)
            if index:
                for j in range(start, nwords):
                    rows[i, j] ^= tables[g, index, j]


@njit(cache=True, nogil=True)
def _apply_tables(rows, lo, hi, word, start, coef, tables, groups, zero_word):  # pragma: no cover
    """Clear the pivot bits of rows ``lo..hi-1``: 8 byte lookups give the pivot rows to add, 8 table rows
    add them (method of the four Russians)."""
    for i in range(lo, hi):
        x = rows[i, word]
        if x == 0:
            continue
        combo = np.uint64(0)
        for g in range(8):
            combo ^= coef[g, (x >> np.uint64(8 * g)) & np.uint64(255)]
        if combo:
            _xor_combination(rows, i, combo, start, tables, groups)
        if zero_word:
            rows[i, word] = 0


@njit(cache=True, nogil=True)
def _eliminate(rows, ncols, limit, reduced, pivots):  # pragma: no cover - compiled
    """In-place GF(2) elimination of packed ``rows``; returns the rank (capped at ``limit``).

    Method of the four Russians, one 64-column word at a time: find the pivot rows of that word (a
    single-word elimination), work out on that word alone which combination of them clears each pivot bit,
    tabulate all XOR combinations of each group of 8 pivot rows (256 rows per table) and clear the word from
    every other row with 8 table rows instead of one XOR per pivot. With ``reduced`` the rows above are
    cleared too and the pivot rows replaced by their reduced forms (reduced row echelon form); ``pivots[k]``
    receives the pivot column of row ``k``. Without it the elimination stops once ``limit`` pivots are found.
    """
    h, nwords = rows.shape
    tables = np.empty((8, 256, nwords), dtype=np.uint64)
    coef = np.empty((8, 256), dtype=np.uint64)
    transform = np.zeros(64, dtype=np.uint64)
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
        _slab_transform(rows, r, m, word, pcols, transform)
        _coefficient_tables(transform, pcols, m, coef)
        for k in range(m):
            pivots[r + k] = word * 64 + pcols[k]
        start = word if reduced else word + 1
        if start >= nwords:
            r += m
            continue
        groups = _build_tables(rows, r, m, word, start, tables)
        if reduced:
            for k in range(m):  # the pivot rows become their reduced forms (built from the saved tables)
                for j in range(start, nwords):
                    rows[r + k, j] = 0
                _xor_combination(rows, r + k, transform[k], start, tables, groups)
            _apply_tables(rows, 0, r, word, start, coef, tables, groups, False)
        _apply_tables(rows, r + m, h, word, start, coef, tables, groups, not reduced)
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
    rank. ``values`` is a real 2-D array; each entry is compared with ``threshold`` as float64 (exact for
    float32/float64 and small integer entries).
    With ``skip_below``, a mask whose ``upper`` is below it is not eliminated at all: rank -1 (unknown,
    but at most ``upper``).
    """
    values = np.asarray(values)
    if values.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {values.shape}")
    if values.size == 0:
        return 0, 0
    return _threshold_rank(values, np.float64(threshold), limit, skip_below)


def mask_lines(values: np.ndarray, threshold: float) -> int:
    """min(#non-zero rows, #non-zero columns) of ``values > threshold``: an upper bound of its rank."""
    values = np.asarray(values)
    return _trimmed_mask(values, np.float64(threshold))[2]


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
