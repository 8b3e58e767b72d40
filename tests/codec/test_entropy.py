"""The levels entropy coder (cbdnet.codec.entropy): exact round trips, sizes, and refusal of corrupt blobs."""

import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cbdnet.codec.entropy import (
    MAX_ABS_LEVEL,
    coded_size,
    decode_levels,
    encode_levels,
    estimate_bits,
    narrowest_signed,
)

EXT = (1 << 16) - 1


def roundtrip(x):
    x = np.asarray(x)
    blob = encode_levels(x)
    y = decode_levels(blob, x.size)
    assert y.dtype == np.int64 and y.shape == (x.size,)
    assert np.array_equal(y, x.reshape(-1).astype(np.int64))
    assert coded_size(x) == len(blob)
    narrow = decode_levels(blob, x.size, narrow=True)  # the same values in the smallest type that negates them
    assert np.array_equal(narrow, y) and narrow.dtype.kind == "i"
    if y.size:
        assert np.array_equal(np.abs(narrow), np.abs(y))
        assert narrow.dtype == np.dtype(narrowest_signed(int(y.min()), int(y.max())))
        assert narrow.dtype.itemsize == 1 or np.abs(y).max() > np.iinfo(np.dtype(f"i{narrow.dtype.itemsize // 2}")).max
    return blob


def test_narrowest_signed_holds_the_range_and_its_negation():
    assert narrowest_signed(-127, 127) == np.int8 and narrowest_signed(-128, 0) == np.int16
    assert narrowest_signed(0, 32767) == np.int16 and narrowest_signed(-32768, 0) == np.int32
    assert narrowest_signed(0, 1 << 31) == np.int64


@pytest.mark.parametrize("x", [
    np.zeros(0, np.int64), np.zeros(1, np.int64), np.zeros(1000, np.int8), np.full(17, -5), np.full(3, EXT),
    np.array([EXT, -EXT]), np.array([-EXT, 0, EXT, 0, 0, 0]), np.array([MAX_ABS_LEVEL, -MAX_ABS_LEVEL, 0]),
    np.arange(-300, 300), np.zeros((4, 3, 3, 3), np.int32), np.array([[1, -1], [0, 2]], np.int16),
    np.array([True, False, True]),
])
def test_fixed_cases(x):
    roundtrip(x)


@pytest.mark.parametrize("seed", range(8))
def test_seeded_random(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 5000))
    kind = seed % 4
    if kind == 0:
        x = np.rint(rng.laplace(0, rng.uniform(0.2, 20), n)).astype(np.int64)
    elif kind == 1:
        x = rng.integers(-EXT, EXT + 1, n)
    elif kind == 2:
        x = rng.choice([-EXT, -1, 0, 1, EXT], n, p=[0.01, 0.2, 0.58, 0.2, 0.01])
    else:
        x = rng.integers(-7, 8, (n // 9 + 1, 3, 3))
    roundtrip(x)


@settings(max_examples=150, deadline=None)
@given(hnp.arrays(np.int64, hnp.array_shapes(min_dims=1, max_dims=3, min_side=0, max_side=12),
                  elements=st.integers(-EXT, EXT) | st.integers(-3, 3)))
def test_hypothesis_roundtrip(x):
    roundtrip(x)


def _blobs():
    rng = np.random.default_rng(5)
    return [encode_levels(np.rint(rng.laplace(0, 2, 3000)).astype(np.int64)),  # ANS
            encode_levels(rng.integers(-EXT, EXT + 1, 50)),  # RAW
            encode_levels(np.full(10, 3)), encode_levels(np.zeros(0, np.int64))]


def test_corrupt_and_truncated_raise():
    rng = np.random.default_rng(9)
    counts = [3000, 50, 10, 0]
    for blob, n in zip(_blobs(), counts, strict=True):
        for cut in range(len(blob)):  # every truncation
            with pytest.raises(ValueError):
                decode_levels(blob[:cut], n)
        for _ in range(200):  # random bit flips and byte overwrites
            bad = bytearray(blob)
            i = int(rng.integers(len(bad)))
            bad[i] ^= 1 << int(rng.integers(8)) if rng.random() < 0.5 else int(rng.integers(1, 256))
            with pytest.raises(ValueError):
                decode_levels(bytes(bad), n)
        with pytest.raises(ValueError):
            decode_levels(blob + b"\0", n)


def _recrc(body: bytes, count: int) -> bytes:
    return body + zlib.crc32(body, zlib.crc32(count.to_bytes(8, "little"))).to_bytes(4, "little")


def test_corrupt_with_valid_crc_raises():
    """Attacker-style blobs whose CRC is right: structure checks must still catch them."""
    rng = np.random.default_rng(3)
    blob, n = _blobs()[0], 3000
    body = blob[:-4]
    for _ in range(300):
        bad = bytearray(body)
        i = int(rng.integers(len(bad)))
        bad[i] = int(rng.integers(256))
        if bytes(bad) == body:
            continue
        try:
            y = decode_levels(_recrc(bytes(bad), n), n)
        except ValueError:
            continue
        assert y.shape == (n,)  # a stream word changed into another valid stream: allowed, but bounded
    for body2 in (b"\x01\x02\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x01\x02\x00\xff\xff\xff\xff\x0f",
                  b"\x01\x03\x00\x40", b"\x01\x09", b"\x02\x00", b"\x01\x00\x00"):
        with pytest.raises(ValueError):
            decode_levels(_recrc(body2, 5), 5)


def test_wrong_count_with_valid_crc_raises():
    """A forger who recomputes the CRC for another count gets ValueError (too few symbols: the ANS end state
    is not empty) or exactly ``m`` bounded garbage levels (ANS decodes past its end): never a hang."""
    blob, n = _blobs()[0], 3000
    for m in (1, n - 1):
        with pytest.raises(ValueError):
            decode_levels(_recrc(blob[:-4], m), m)
    y = decode_levels(_recrc(blob[:-4], 2 * n), 2 * n)
    assert y.shape == (2 * n,) and np.abs(y).max() < 100


def test_wrong_count_raises():
    blob, n = _blobs()[0], 3000
    for m in (0, 1, n - 1, n + 1, 2 * n):
        with pytest.raises(ValueError):
            decode_levels(blob, m)
    with pytest.raises(ValueError):
        decode_levels(blob, -1)
    with pytest.raises(ValueError):
        decode_levels(encode_levels(np.zeros(0, np.int64)), 1)


def test_bad_input_raises():
    with pytest.raises(ValueError):
        encode_levels(np.array([0.5, 1.0]))
    with pytest.raises(ValueError):
        encode_levels(np.array([MAX_ABS_LEVEL + 1]))


def test_skewed_smaller_than_fixed_length():
    rng = np.random.default_rng(0)
    x = np.rint(rng.laplace(0, 1.0, 20000)).clip(-7, 7).astype(np.int64)  # 4-bit levels, H ~ 2.1 bits
    blob = roundtrip(x)
    assert len(blob) * 8 < 0.65 * 4 * x.size  # H0 ~ 2.45 bits
    assert abs(estimate_bits(x) / 8 - len(blob)) < 16


def test_never_much_above_fixed_length():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 16, 10000)  # uniform 4-bit: no gain possible
    assert len(roundtrip(x)) <= 10000 * 4 / 8 + 12
