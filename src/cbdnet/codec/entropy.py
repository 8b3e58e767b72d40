"""Entropy coding of signed integer quantisation levels (numpy + constriction only).

Model: one static categorical table per array (the empirical histogram of the levels, frequencies quantised
to at most ``FREQ_BITS`` bits and stored in the blob), coded with constriction's ANS coder (24-bit
probabilities, 32-bit words). On ResNet-20 this beat every richer model measured (per-channel tables,
channel groups, parametric per-channel Laplace/Gaussian, sign+magnitude split; see measure.py) once the
cost of their side information is counted (forward-adaptive context tables chosen by stored per-row or
per-column scales did not pay either). If the ANS stream would be larger than fixed-length packing,
the levels are stored bit-packed instead (mode RAW), so the blob never exceeds fixed-length + a few bytes.

Convolution kernels have one richer model that pays for itself, because it needs no side information (mode
KERNEL, :func:`encode_levels` with ``kernel=(kh, kw)``; the levels are then in weight order, each kernel slice
``[o, i, :, :]`` contiguous). Each slice is decoded position by position, the centre first and then outwards
(:func:`kernel_order`); the first position with the static table, each later one with a table chosen by its
*context*: how large the slice's levels decoded so far are (6 classes of their mean magnitude) and which way
its already-decoded 4-neighbours point (5 classes of their sum against that magnitude). A context's table is
backward-adaptive: the counts of every level decoded in that context so far (earlier positions of every
slice), plus the static table as a prior worth ``KERNEL_PRIOR`` levels. One position of every slice is coded
at once (vectorised: ``kh * kw`` steps per layer, one constriction call per context and step). On the
ResNet-20 files of ``--target-bits`` this codes the levels 4-6 % smaller than the static table, and RTN
4-bit per channel of the same network 6 %; the classes' edges and the prior's weight are not tuned to one
file (changing any of them moves the size by under 0.5 %).

Blob layout (all multi-byte integers little-endian, varint = unsigned LEB128, zz = zigzag)::

    u8      version (1)
    u8      mode: 0 EMPTY, 1 CONST, 2 ANS, 3 RAW, 4 KERNEL (decoded only where the caller names the kernel)
    EMPTY:  nothing
    CONST:  zz-varint value
    ANS:    zz-varint lo, varint span (= hi - lo), table, u32 words...
            table: for each symbol lo..hi a varint frequency f; f == 0 is followed by a varint r and stands for
            r + 1 absent symbols in a row (so sparse alphabets stay small)
    KERNEL: zz-varint lo, varint kh, varint kw, then as ANS from span on (the table is the static one: the
            slices' first positions are coded with it, and it is every context's prior)
    RAW:    zz-varint lo, u8 width b, ceil(count*b/8) bytes: (level - lo) as b-bit little-endian bit fields
    u32     CRC-32 of u64 count (not stored) + all preceding bytes: a wrong count fails the check too

Decoding checks the CRC first, then every field against ``count``: a corrupt or truncated blob raises
``ValueError``; work and memory are O(count) plus O(present symbols) <= O(count).
"""

from __future__ import annotations

import struct
import zlib

import constriction
import numpy as np

__all__ = ["encode_levels", "encode_kernel_levels", "decode_levels", "uses_kernel", "narrowest_signed", "coded_size",
           "estimate_bits", "MAX_ABS_LEVEL", "FREQ_BITS", "kernel_order", "KERNEL_PRIOR", "MAX_KERNEL"]

VERSION = 1
EMPTY, CONST, ANS, RAW, KERNEL = 0, 1, 2, 3, 4
MAX_ABS_LEVEL = (1 << 31) - 1  # levels must fit int32 (constriction's symbol type)
FREQ_BITS = 10  # stored frequencies are scaled to a total of at most 2^10 (measured best of exact/16/12/10/8)
MAX_PRESENT = 1 << 20  # distinct symbols per blob (the table is parsed in Python)
_CRC = struct.Struct("<I")
KERNEL_PRIOR = 32  # the static table's weight in every context's table, in levels
MAX_KERNEL = 4096  # positions per kernel slice the KERNEL mode accepts
# context classes: mean |level| of the slice so far against these (times 4), and the neighbours' sum against
# the mean magnitude times these (times 20)
_MAGNITUDE_EDGES = (1, 3, 6, 12, 24)
_DIRECTION_EDGES = (-12, -3, 3, 12)
_DIRECTIONS = len(_DIRECTION_EDGES) + 1
_CONTEXTS = (len(_MAGNITUDE_EDGES) + 1) * _DIRECTIONS  # < 256: a context is a uint8


# ------------------------------------------------------------------ varints

def _put_varint(out: bytearray, value: int) -> None:
    if value < 0:
        raise ValueError("varint must be non-negative")
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


def _zz(value: int) -> int:
    return (value << 1) if value >= 0 else ((-value) << 1) - 1


def _unzz(value: int) -> int:
    return (value >> 1) if not value & 1 else -((value + 1) >> 1)


class _Reader:
    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes, end: int):
        self.data, self.pos, self.end = data, 0, end

    def u8(self) -> int:
        if self.pos >= self.end:
            raise ValueError("truncated levels blob")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self, max_bits: int = 64) -> int:
        value = shift = 0
        while True:
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift >= max_bits:
                raise ValueError("varint too long in levels blob")
        if value >> max_bits:
            raise ValueError("varint out of range in levels blob")
        return value


# ------------------------------------------------------------------ model

def _as_levels(levels) -> np.ndarray:
    arr = np.asarray(levels)
    if arr.dtype.kind not in "iub":
        raise ValueError(f"levels must be an integer array, got dtype {arr.dtype}")
    # int32 where it holds every value (no copy for int32 input; a quarter of int64's memory traffic on the
    # ~100M levels of a big layer), else int64
    narrow = arr.dtype == np.bool_ or (arr.dtype.kind in "iu" and arr.dtype.itemsize < 4) or arr.dtype == np.int32
    flat = arr.reshape(-1).astype(np.int32 if narrow else np.int64, copy=False)
    if flat.size and (flat.min() < -MAX_ABS_LEVEL or flat.max() > MAX_ABS_LEVEL):
        raise ValueError(f"levels must lie in [-{MAX_ABS_LEVEL}, {MAX_ABS_LEVEL}]")
    return flat


def _quantised_freqs(counts: np.ndarray, freq_bits: int | None) -> np.ndarray:
    """Present-symbol counts -> stored frequencies (all >= 1). ``None`` keeps the exact counts."""
    total = int(counts.sum())
    if freq_bits is None or total <= (1 << freq_bits):
        return counts.astype(np.int64)
    scaled = np.rint(counts.astype(np.float64) * ((1 << freq_bits) / total)).astype(np.int64)
    return np.maximum(scaled, 1)


def _model(freqs: np.ndarray):
    return constriction.stream.model.Categorical(freqs.astype(np.float64), perfect=False)


def _alphabet(flat: np.ndarray, freq_bits: int | None):
    """``(lo, span, present, freqs, index)`` of non-empty, non-constant ``flat``: the present symbols (offsets
    from ``lo``), their stored frequencies, and each level's index among them (int32); None if there are more
    than ``MAX_PRESENT`` distinct levels."""
    lo, hi = int(flat.min()), int(flat.max())
    span = hi - lo
    hist = np.bincount(flat - lo, minlength=span + 1) if span < (1 << 24) else None
    if hist is None:  # very wide alphabet: histogram of the distinct values only
        values, counts = np.unique(flat, return_counts=True)
        present = values - lo
    else:
        present = np.flatnonzero(hist)
        counts = hist[present]
    if present.size > MAX_PRESENT:
        return None
    if hist is not None:  # a lookup table: one gather, ~7x faster than a binary search on 100M levels
        table = np.zeros(span + 1, dtype=np.int32)
        table[present] = np.arange(present.size, dtype=np.int32)
        index = table[flat - lo]
    else:
        index = np.searchsorted(present, flat - lo).astype(np.int32)
    return lo, span, present, _quantised_freqs(counts, freq_bits), index


def _table_head(mode: int, lo: int, span: int, present: np.ndarray, freqs: np.ndarray,
                prefix: tuple[int, ...] = ()) -> bytearray:
    """Version, mode, lo, the varints of ``prefix``, span and the frequency table (with zero runs: it works from
    the present list, so a wide sparse alphabet costs O(present))."""
    head = bytearray([VERSION, mode])
    _put_varint(head, _zz(lo))
    for value in prefix:
        _put_varint(head, value)
    _put_varint(head, span)
    prev = -1
    for v, f in zip(present.tolist(), freqs.tolist(), strict=True):
        gap = v - prev - 1
        if gap:
            head.append(0)
            _put_varint(head, gap - 1)
        _put_varint(head, f)
        prev = v
    return head


def _encode_parts(flat: np.ndarray, freq_bits: int | None):
    """(header bytes, ANS coder) for non-empty, non-constant ``flat``, or None."""
    alphabet = _alphabet(flat, freq_bits)
    if alphabet is None:
        return None
    lo, span, present, freqs, index = alphabet
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(index, _model(freqs))
    return bytes(_table_head(ANS, lo, span, present, freqs)), coder


# ------------------------------------------------------------------ kernel contexts (mode KERNEL)

def kernel_order(kh: int, kw: int) -> list[int]:
    """The positions of a ``kh x kw`` kernel slice (row-major indices) in decoding order: the centre first, then
    outwards by distance from it (ties in index order)."""
    return sorted(range(kh * kw), key=lambda p: ((2 * (p // kw) - kh + 1) ** 2 + (2 * (p % kw) - kw + 1) ** 2, p))


def _kernel_plan(kh: int, kw: int) -> list[tuple[int, tuple[int, ...]]]:
    """Per decoding step: the position, and its 4-neighbours decoded before it."""
    plan, seen = [], set()
    for p in kernel_order(kh, kw):
        y, x = divmod(p, kw)
        near = [(y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)]
        plan.append((p, tuple(a * kw + b for a, b in near if 0 <= a < kh and 0 <= b < kw and a * kw + b in seen)))
        seen.add(p)
    return plan


class _KernelSchedule:
    """The groups of levels one step decodes, each with its table, in the order encoder and decoder share.

    Step ``t`` codes position ``plan[t]`` of every slice. Its context (integers only, so both sides compute it
    alike) combines the class of the slice's mean magnitude so far, ``total / t``, and the class of its decoded
    neighbours' sum against ``neighbours * total / t``; its table is ``F * counts[context] + KERNEL_PRIOR *
    static`` (``F``: the static table's total), from the levels decoded in that context at earlier steps."""

    def __init__(self, slices: int, kh: int, kw: int, static: np.ndarray, dtype=np.int64) -> None:
        self.plan = _kernel_plan(kh, kw)
        self.static = static.astype(np.int64)
        self.prior = KERNEL_PRIOR * self.static
        self.scale = int(self.static.sum())
        self.symbols = static.size
        self.total = np.zeros(slices, dtype)
        self.counts = np.zeros((_CONTEXTS, self.symbols), np.int64)
        self.context = np.zeros(slices, np.uint8)

    def _contexts(self, t: int, values: np.ndarray) -> np.ndarray:
        total = self.total
        scaled = 4 * total
        magnitude = np.zeros(total.size, np.uint8)
        for edge in _MAGNITUDE_EDGES:
            magnitude += scaled >= edge * t
        context = magnitude * np.uint8(_DIRECTIONS)
        _, near = self.plan[t]
        if not near:
            return context + _DIRECTIONS // 2
        lean = values[near[0]].astype(total.dtype)  # the decoder's values may be narrower than the sums
        for q in near[1:]:
            lean += values[q]
        lean *= 20 * t
        spread = len(near) * total
        direction = np.zeros(total.size, np.uint8)
        for edge in _DIRECTION_EDGES:
            direction += lean >= edge * spread
        direction[total == 0] = _DIRECTIONS // 2
        return context + direction

    def groups(self, t: int, values: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(slices, table)`` per group of step ``t``; ``values``: the levels position-major (one row per kernel
        position, one column per slice), valid in earlier steps' rows."""
        if t == 0:
            return [(np.arange(self.total.size), self.static)]
        self.context = self._contexts(t, values)
        perm = np.argsort(self.context, kind="stable")  # a radix sort on uint8
        sizes = np.bincount(self.context, minlength=_CONTEXTS)
        used = np.flatnonzero(sizes)
        ends = np.cumsum(sizes[used]).tolist()
        starts = [0, *ends[:-1]]
        return [(perm[a:b], self.scale * self.counts[c] + self.prior)
                for c, a, b in zip(used.tolist(), starts, ends, strict=True)]

    def update(self, t: int, values: np.ndarray, index: np.ndarray) -> None:
        """Count step ``t``'s levels (their symbol ``index``) in their contexts; add their magnitudes."""
        if t:
            flat = self.context.astype(np.int32) * np.int32(self.symbols) + index
            self.counts += np.bincount(flat, minlength=self.counts.size).reshape(self.counts.shape)
        self.total += np.abs(values[self.plan[t][0]])


def _context_dtype(lo: int, hi: int, n: int):
    """int32 where no context sum can overflow it (a quarter of the memory traffic of int64), else int64: the
    largest is ``20 * n * 4 * max|level|`` (a slice's neighbour sum scaled), bounded here with room to spare."""
    return np.int32 if max(abs(lo), abs(hi)) * 80 * n * n < 2**31 else np.int64


MAX_KERNEL_SYMBOLS = 1 << 12  # distinct levels the KERNEL mode codes (its tables are contexts x symbols)


def _encode_kernel(flat: np.ndarray, kh: int, kw: int, freq_bits: int | None):
    """(header bytes, ANS coder) of ``flat`` (non-empty, non-constant, in weight order) in mode KERNEL, or None
    where the mode does not apply."""
    n = kh * kw
    if not 2 <= n <= MAX_KERNEL or flat.size % n:
        return None
    alphabet = _alphabet(flat, freq_bits)
    if alphabet is None or alphabet[2].size > MAX_KERNEL_SYMBOLS:
        return None
    lo, span, present, freqs, index = alphabet
    dtype = _context_dtype(lo, lo + span, n)
    values = np.ascontiguousarray(flat.reshape(-1, n).T, dtype)  # position-major: one row per kernel position
    index = np.ascontiguousarray(index.reshape(-1, n).T, np.int32)
    schedule = _KernelSchedule(values.shape[1], kh, kw, freqs, dtype)
    pending = []
    for t, (p, _) in enumerate(schedule.plan):
        pending += [(index[p][rows], table) for rows, table in schedule.groups(t, values)]
        schedule.update(t, values, index[p])
    coder = constriction.stream.stack.AnsCoder()
    for symbols, table in reversed(pending):  # a stack: the last group decoded goes in first
        coder.encode_reverse(np.ascontiguousarray(symbols, np.int32), _model(table))
    return bytes(_table_head(KERNEL, lo, span, present, freqs, (kh, kw))), coder


def _decode_kernel(coder, slices: int, kh: int, kw: int, present: np.ndarray, freqs: np.ndarray,
                   lo: int, out_dtype) -> np.ndarray:
    """The levels (weight order, ``out_dtype``: a signed type that holds every level and its negation) of a
    KERNEL stream; a malformed stream raises ValueError. The contexts are summed in a wider type."""
    values = np.zeros((kh * kw, slices), out_dtype)  # position-major: one row per kernel position
    schedule = _KernelSchedule(slices, kh, kw, freqs, _context_dtype(lo, lo + int(present[-1]), kh * kw))
    levels = (present + lo).astype(out_dtype)
    index = np.empty(slices, np.int32)
    for t, (p, _) in enumerate(schedule.plan):
        for rows, table in schedule.groups(t, values):
            index[rows] = coder.decode(_model(table), rows.size)
        if index.min() < 0 or index.max() >= present.size:
            raise ValueError("corrupt levels stream")
        np.take(levels, index, out=values[p])
        schedule.update(t, values, index)
    return values.T.reshape(-1)


def _raw_width(span: int) -> int:
    return max(1, span.bit_length())


def _raw_bytes(flat: np.ndarray, lo: int, width: int) -> bytes:
    vals = (flat - lo).astype(np.uint64)
    bits = ((vals[:, None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)).astype(np.uint8)
    return np.packbits(bits.reshape(-1), bitorder="little").tobytes()


def _crc(body, count: int) -> int:
    """CRC-32 of the count (u64, not stored: the caller knows it) followed by the body."""
    return zlib.crc32(body, zlib.crc32(struct.pack("<Q", count)))


def _finish(body: bytes | bytearray, count: int) -> bytes:
    return bytes(body) + _CRC.pack(_crc(body, count))


def _candidates(flat: np.ndarray, freq_bits: int | None, kernel: tuple[int, int] | None):
    """(header bytes, ANS coder) of each entropy coding that applies: the static table, and with ``kernel`` the
    kernel contexts."""
    parts = [_encode_parts(flat, freq_bits)]
    if kernel is not None:
        kh, kw = (int(k) for k in kernel)
        parts.append(_encode_kernel(flat, kh, kw, freq_bits))
    return [part for part in parts if part is not None]


def encode_kernel_levels(levels, kernel: tuple[int, int], *, freq_bits: int | None = FREQ_BITS) -> bytes | None:
    """The mode-KERNEL blob of ``levels`` (a convolution weight in weight order, see :func:`encode_levels`), or
    None where that mode does not apply (fewer than two distinct levels, a kernel of one position, a size that
    is not whole slices, too many distinct levels). Only that coding is run: a caller that already has the
    static table's blob compares the two itself."""
    flat = _as_levels(levels)
    if flat.size == 0 or flat.min() == flat.max():
        return None
    parts = _encode_kernel(flat, int(kernel[0]), int(kernel[1]), freq_bits)
    if parts is None:
        return None
    head, coder = parts
    return _finish(head + coder.get_compressed().astype("<u4").tobytes(), flat.size)


def encode_levels(levels, *, freq_bits: int | None = FREQ_BITS, kernel: tuple[int, int] | None = None) -> bytes:
    """Entropy-code a signed integer array (any shape, flattened C-order); the smallest of the modes that apply.
    ``kernel=(kh, kw)``: the levels are a convolution weight in weight order (``[out, in, kh, kw]``, or any
    layout whose consecutive ``kh * kw`` levels are one kernel slice), so mode KERNEL is tried too.
    ``freq_bits`` is for experiments."""
    flat = _as_levels(levels)
    if flat.size == 0:
        return _finish(bytes([VERSION, EMPTY]), 0)
    lo, hi = int(flat.min()), int(flat.max())
    if lo == hi:
        body = bytearray([VERSION, CONST])
        _put_varint(body, _zz(lo))
        return _finish(body, flat.size)
    raw_body = bytearray([VERSION, RAW])
    _put_varint(raw_body, _zz(lo))
    width = _raw_width(hi - lo)
    raw_body.append(width)
    raw_len = len(raw_body) + (flat.size * width + 7) // 8
    coded = [(len(head) + 4 * coder.num_words(), head, coder) for head, coder in _candidates(flat, freq_bits, kernel)]
    if coded:
        size, head, coder = min(coded, key=lambda c: c[0])
        if size < raw_len:
            words = coder.get_compressed().astype("<u4")
            return _finish(head + words.tobytes(), flat.size)
    return _finish(raw_body + _raw_bytes(flat, lo, width), flat.size)


def coded_size(levels, *, freq_bits: int | None = FREQ_BITS, kernel: tuple[int, int] | None = None) -> int:
    """``len(encode_levels(levels, kernel=kernel))`` without copying the stream out (still runs the coders)."""
    flat = _as_levels(levels)
    if flat.size == 0:
        return 6
    lo, hi = int(flat.min()), int(flat.max())
    if lo == hi:
        return 2 + len(_varint_bytes(_zz(lo))) + 4
    raw_len = 2 + len(_varint_bytes(_zz(lo))) + 1 + (flat.size * _raw_width(hi - lo) + 7) // 8
    sizes = [len(head) + 4 * coder.num_words() for head, coder in _candidates(flat, freq_bits, kernel)]
    return min([*sizes, raw_len]) + 4


def estimate_bits(levels, *, freq_bits: int | None = FREQ_BITS) -> float:
    """Cheap model of the coded size in bits (numpy only): table bytes + the ideal code length of the levels
    under the stored frequencies + 32 bits of ANS flush + 32 bits CRC. Within ~8 bytes of coded_size."""
    flat = _as_levels(levels)
    if flat.size == 0:
        return 48.0
    values, counts = np.unique(flat, return_counts=True)
    if values.size == 1:
        return 8.0 * (2 + len(_varint_bytes(_zz(int(values[0])))) + 4)
    freqs = _quantised_freqs(counts, freq_bits)
    p = freqs / freqs.sum()
    table = sum(len(_varint_bytes(int(f))) for f in freqs) + 2 * int(np.count_nonzero(np.diff(values) > 1))
    return float(-(counts * np.log2(p)).sum()) + 8.0 * (table + 2 + 4 + 4) + 32.0


def _varint_bytes(value: int) -> bytearray:
    out = bytearray()
    _put_varint(out, value)
    return out


# ------------------------------------------------------------------ decoding

def narrowest_signed(low: int, high: int) -> np.dtype:
    """The smallest signed integer type that holds every value in ``[low, high]`` and their negations (so
    ``np.abs`` of such an array cannot overflow)."""
    bound = max(abs(int(low)), abs(int(high)))
    for kind in (np.int8, np.int16, np.int32):
        if bound <= np.iinfo(kind).max:
            return np.dtype(kind)
    return np.dtype(np.int64)


def uses_kernel(blob: bytes | memoryview) -> bool:
    """Whether an :func:`encode_levels` blob is in mode KERNEL (its levels in weight order, kernel contexts)."""
    return len(blob) >= 2 and blob[1] == KERNEL


def decode_levels(data: bytes | memoryview, count: int, *, narrow: bool = False,
                  kernel: tuple[int, int] | None = None) -> np.ndarray:
    """Inverse of :func:`encode_levels`: ``count`` int64 levels (``narrow``: in the smallest signed type that
    holds the blob's range and its negation, which on a large layer is a quarter to an eighth of the memory
    traffic). ``kernel``: the ``(kh, kw)`` a mode-KERNEL blob must name; without it that mode is refused.
    Corrupt or truncated ``data`` -> ValueError. ``count`` must be bounded by the caller (it sets the output
    size)."""
    if not isinstance(count, (int, np.integer)) or count < 0:
        raise ValueError(f"count must be a non-negative int, got {count!r}")
    count = int(count)
    data = bytes(data)
    if len(data) < 6:
        raise ValueError("truncated levels blob")
    body_end = len(data) - 4
    if _CRC.unpack_from(data, body_end)[0] != _crc(memoryview(data)[:body_end], count):
        raise ValueError("levels blob checksum mismatch (corrupt, truncated, or wrong count)")
    r = _Reader(data, body_end)
    if r.u8() != VERSION:
        raise ValueError("unsupported levels blob version")
    mode = r.u8()
    if mode == EMPTY:
        if count != 0 or r.pos != body_end:
            raise ValueError("levels blob is empty but count > 0")
        return np.zeros(0, dtype=np.int8 if narrow else np.int64)
    if count == 0:
        raise ValueError("levels blob holds levels but count == 0")
    lo = _unzz(r.varint(33))
    if abs(lo) > MAX_ABS_LEVEL:
        raise ValueError("level out of range in levels blob")
    if mode == CONST:
        if r.pos != body_end:
            raise ValueError("trailing bytes in levels blob")
        return np.full(count, lo, dtype=narrowest_signed(lo, lo) if narrow else np.int64)
    if mode == RAW:
        width = r.u8()
        if not 1 <= width <= 32:
            raise ValueError("bad bit width in levels blob")
        need = (count * width + 7) // 8
        if body_end - r.pos != need:
            raise ValueError("levels blob payload has the wrong length for count")
        return _decode_raw(data, r.pos, count, width, lo, narrow)
    if mode not in (ANS, KERNEL):
        raise ValueError(f"unknown levels blob mode {mode} (written by a newer cbdnet?)")
    if mode == KERNEL:
        kh, kw = r.varint(13), r.varint(13)
        if not 2 <= kh * kw <= MAX_KERNEL or count % (kh * kw):
            raise ValueError(f"bad kernel {kh}x{kw} for {count} levels in levels blob")
        if kernel is None or (kh, kw) != tuple(kernel):
            raise ValueError(f"levels blob coded with {kh}x{kw} kernel contexts where "
                             f"{'none are' if kernel is None else 'a {}x{} kernel is'.format(*kernel)} expected")
    span = r.varint(33)
    if lo + span > MAX_ABS_LEVEL:
        raise ValueError("level out of range in levels blob")
    present, freqs = _read_table(r, span, min(count, MAX_PRESENT if mode == ANS else MAX_KERNEL_SYMBOLS))
    if (body_end - r.pos) % 4 or body_end == r.pos:
        raise ValueError("levels blob stream is not a whole number of words")
    words = np.frombuffer(data, dtype="<u4", count=(body_end - r.pos) // 4, offset=r.pos).astype(np.uint32)
    dtype = narrowest_signed(lo, lo + span) if narrow else np.int64
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        if mode == KERNEL:
            out = _decode_kernel(coder, count // (kh * kw), kh, kw, present, freqs, lo, dtype)
        else:
            index = np.asarray(coder.decode(_model(freqs), count))
        ok = coder.is_empty()
    except ValueError:
        raise
    except Exception as exc:  # constriction raises its own errors on malformed streams
        raise ValueError(f"corrupt levels stream: {exc}") from None
    if not ok:
        raise ValueError("levels stream has trailing data (corrupt, or count does not match)")
    if mode == KERNEL:
        return out
    if index.size != count or (index.size and (index.min() < 0 or index.max() >= present.size)):
        raise ValueError("corrupt levels stream")
    return (present + lo).astype(dtype)[index]


RAW_CHUNK = 1 << 18  # levels unpacked at once (a multiple of 8: each chunk starts on a byte)


def _decode_raw(data: bytes, start: int, count: int, width: int, lo: int, narrow: bool) -> np.ndarray:
    """The RAW mode's ``count`` levels of ``width`` bits from byte ``start``, unpacked a chunk at a time into the
    output (the bits of a whole large layer at once would take 8 * width bytes per level)."""
    top = lo + (1 << width) - 1
    out = np.empty(count, dtype=narrowest_signed(lo, min(top, MAX_ABS_LEVEL + 1)) if narrow else np.int64)
    shifts = np.arange(width, dtype=np.int64)
    high = lo
    for first in range(0, count, RAW_CHUNK):
        n = min(RAW_CHUNK, count - first)
        raw = np.frombuffer(data, np.uint8, (n * width + 7) // 8, start + first * width // 8)
        bits = np.unpackbits(raw, count=n * width, bitorder="little").reshape(n, width)
        values = (bits.astype(np.int64) << shifts).sum(axis=1) + lo
        high = max(high, int(values.max()))
        if high > MAX_ABS_LEVEL:
            raise ValueError("level out of range in levels blob")
        out[first:first + n] = values
    return out.astype(narrowest_signed(lo, high), copy=False) if narrow else out  # the type of the levels' range


def _read_table(r: _Reader, span: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The present symbols (offsets from lo, int64) and their stored frequencies, at most ``limit`` of them."""
    present: list[int] = []
    freqs: list[int] = []
    pos = 0
    while pos <= span:
        f = r.varint(32)
        if f == 0:
            pos += r.varint(33) + 1
            continue
        if len(present) >= limit:
            raise ValueError("too many symbols in levels blob table")
        present.append(pos)
        freqs.append(f)
        pos += 1
    if pos != span + 1 or len(present) < 2 or present[0] != 0 or present[-1] != span:
        raise ValueError("bad symbol table in levels blob")
    return np.asarray(present, dtype=np.int64), np.asarray(freqs, dtype=np.int64)
