"""Entropy coding of signed integer quantisation levels (numpy + constriction only).

Model: one static categorical table per array (the empirical histogram of the levels, frequencies quantised
to at most ``FREQ_BITS`` bits and stored in the blob), coded with constriction's ANS coder (24-bit
probabilities, 32-bit words). On ResNet-20 this beat every richer model measured (per-channel tables,
channel groups, parametric per-channel Laplace/Gaussian, sign+magnitude split; see measure.py) once the
cost of their side information is counted. If the ANS stream would be larger than fixed-length packing,
the levels are stored bit-packed instead (mode RAW), so the blob never exceeds fixed-length + a few bytes.

Blob layout (all multi-byte integers little-endian, varint = unsigned LEB128, zz = zigzag)::

    u8      version (1)
    u8      mode: 0 EMPTY, 1 CONST, 2 ANS, 3 RAW
    EMPTY:  nothing
    CONST:  zz-varint value
    ANS:    zz-varint lo, varint span (= hi - lo), table, u32 words...
            table: for each symbol lo..hi a varint frequency f; f == 0 is followed by a varint r and stands for
            r + 1 absent symbols in a row (so sparse alphabets stay small)
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

__all__ = ["encode_levels", "decode_levels", "narrowest_signed", "coded_size", "estimate_bits", "MAX_ABS_LEVEL",
           "FREQ_BITS"]

VERSION = 1
EMPTY, CONST, ANS, RAW = 0, 1, 2, 3
MAX_ABS_LEVEL = (1 << 31) - 1  # levels must fit int32 (constriction's symbol type)
FREQ_BITS = 10  # stored frequencies are scaled to a total of at most 2^10 (measured best of exact/16/12/10/8)
MAX_PRESENT = 1 << 20  # distinct symbols per blob (the table is parsed in Python)
_CRC = struct.Struct("<I")


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


def _write_table(out: bytearray, hist: np.ndarray, present: np.ndarray, freqs: np.ndarray) -> None:
    full = np.zeros(hist.size, dtype=np.int64)
    full[present] = freqs
    i, n = 0, full.size
    nz = np.flatnonzero(full)
    k = 0  # index into nz: next present symbol
    while i < n:
        if full[i]:
            _put_varint(out, int(full[i]))
            i += 1
            k += 1
        else:
            nxt = int(nz[k]) if k < nz.size else n
            out.append(0)
            _put_varint(out, nxt - i - 1)
            i = nxt


def _encode_parts(flat: np.ndarray, freq_bits: int | None):
    """(header bytes, ANS coder or None, raw payload or None) for non-empty, non-constant ``flat``."""
    lo, hi = int(flat.min()), int(flat.max())
    span = hi - lo
    hist = np.bincount(flat - lo, minlength=span + 1) if span < (1 << 24) else None
    if hist is None:  # very wide alphabet: histogram of the distinct values only
        values, counts = np.unique(flat, return_counts=True)
        present_vals = values - lo
    else:
        present_vals = np.flatnonzero(hist)
        counts = hist[present_vals]
    if present_vals.size > MAX_PRESENT:
        return None
    freqs = _quantised_freqs(counts, freq_bits)
    head = bytearray([VERSION, ANS])
    _put_varint(head, _zz(lo))
    _put_varint(head, span)
    # table with zero runs (works from the present list, so a wide sparse alphabet costs O(present))
    prev = -1
    for v, f in zip(present_vals.tolist(), freqs.tolist(), strict=True):
        gap = v - prev - 1
        if gap:
            head.append(0)
            _put_varint(head, gap - 1)
        _put_varint(head, f)
        prev = v
    if hist is not None:  # a lookup table: one gather, ~7x faster than a binary search on 100M levels
        table = np.zeros(span + 1, dtype=np.int32)
        table[present_vals] = np.arange(present_vals.size, dtype=np.int32)
        index = table[flat - lo]
    else:
        index = np.searchsorted(present_vals, flat - lo).astype(np.int32)
    coder = constriction.stream.stack.AnsCoder()
    if present_vals.size > 1:
        coder.encode_reverse(index, _model(freqs))
    return bytes(head), coder


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


def encode_levels(levels, *, freq_bits: int | None = FREQ_BITS) -> bytes:
    """Entropy-code a signed integer array (any shape, flattened C-order). ``freq_bits`` is for experiments."""
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
    parts = _encode_parts(flat, freq_bits)
    if parts is not None:
        head, coder = parts
        if len(head) + 4 * coder.num_words() < raw_len:
            words = coder.get_compressed().astype("<u4")
            return _finish(head + words.tobytes(), flat.size)
    return _finish(raw_body + _raw_bytes(flat, lo, width), flat.size)


def coded_size(levels, *, freq_bits: int | None = FREQ_BITS) -> int:
    """``len(encode_levels(levels))`` without copying the stream out (still runs the ANS encoder)."""
    flat = _as_levels(levels)
    if flat.size == 0:
        return 6
    lo, hi = int(flat.min()), int(flat.max())
    if lo == hi:
        return 2 + len(_varint_bytes(_zz(lo))) + 4
    raw_len = 2 + len(_varint_bytes(_zz(lo))) + 1 + (flat.size * _raw_width(hi - lo) + 7) // 8
    parts = _encode_parts(flat, freq_bits)
    if parts is None:
        return raw_len + 4
    head, coder = parts
    return min(len(head) + 4 * coder.num_words(), raw_len) + 4


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


def decode_levels(data: bytes, count: int, *, narrow: bool = False) -> np.ndarray:
    """Inverse of :func:`encode_levels`: ``count`` int64 levels (``narrow``: in the smallest signed type that
    holds the blob's range and its negation, which on a large layer is a quarter to an eighth of the memory
    traffic). Corrupt or truncated ``data`` -> ValueError. ``count`` must be bounded by the caller (it sets the
    output size)."""
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
        bits = np.unpackbits(np.frombuffer(data, np.uint8, need, r.pos), count=count * width, bitorder="little")
        vals = (bits.reshape(count, width).astype(np.int64) << np.arange(width, dtype=np.int64)).sum(axis=1)
        out = vals + lo
        high = int(out.max())
        if high > MAX_ABS_LEVEL:
            raise ValueError("level out of range in levels blob")
        return out.astype(narrowest_signed(lo, high)) if narrow else out
    if mode != ANS:
        raise ValueError(f"unknown levels blob mode {mode}")
    span = r.varint(33)
    if lo + span > MAX_ABS_LEVEL:
        raise ValueError("level out of range in levels blob")
    limit = min(count, MAX_PRESENT)
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
    if (body_end - r.pos) % 4 or body_end == r.pos:
        raise ValueError("levels blob stream is not a whole number of words")
    words = np.frombuffer(data, dtype="<u4", count=(body_end - r.pos) // 4, offset=r.pos).astype(np.uint32)
    try:
        coder = constriction.stream.stack.AnsCoder(words)
        index = coder.decode(_model(np.asarray(freqs, dtype=np.int64)), count)
        ok = coder.is_empty()
    except Exception as exc:  # constriction raises its own errors on malformed streams
        raise ValueError(f"corrupt levels stream: {exc}") from None
    if not ok:
        raise ValueError("levels stream has trailing data (corrupt, or count does not match)")
    index = np.asarray(index)
    if index.size != count or (index.size and (index.min() < 0 or index.max() >= len(present))):
        raise ValueError("corrupt levels stream")
    values = np.asarray(present, dtype=np.int64) + lo
    return values.astype(narrowest_signed(lo, lo + span) if narrow else np.int64)[index]
