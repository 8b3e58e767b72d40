"""The four-Russians GF(2) kernels: exact ranks (vs a brute-force reference), limits, thresholds, factors."""

from __future__ import annotations

import numpy as np
import pytest

from cbdnet.codec import gf2


def brute_rank(bits: np.ndarray) -> int:
    """GF(2) rank via Python integers as rows: an independent, obviously correct reference."""
    basis: dict[int, int] = {}  # leading bit -> row
    for row in bits.astype(np.uint8):
        value = int("".join(map(str, row[::-1])) or "0", 2)
        while value:
            lead = value.bit_length() - 1
            if lead not in basis:
                basis[lead] = value
                break
            value ^= basis[lead]
    return len(basis)


def random_matrices(seed: int, count: int):
    rng = np.random.default_rng(seed)
    for index in range(count):
        h, w = (int(x) for x in rng.integers(1, 200, size=2))
        if index % 4 == 0:  # low rank by construction, spanning several 64-bit words
            k = int(rng.integers(1, 40))
            left = rng.random((h, k)) < 0.5
            right = rng.random((k, w)) < 0.5
            yield (left.astype(np.int64) @ right.astype(np.int64)) % 2 == 1
        else:
            yield rng.random((h, w)) < rng.choice([0.005, 0.05, 0.3, 0.5, 0.95])


@pytest.mark.parametrize("seed", range(4))
def test_rank_matches_brute_force(seed):
    for bits in random_matrices(seed, 40):
        assert gf2.rank(bits) == brute_rank(bits)


def test_rank_limit_caps_exactly():
    for bits in random_matrices(10, 30):
        true = brute_rank(bits)
        for limit in {1, max(1, true // 2), true, true + 1, true + 70}:
            assert gf2.rank(bits, limit=limit) == min(limit, true)


def test_rank_identities():
    rng = np.random.default_rng(3)
    for _ in range(10):
        a = rng.random((150, 97)) < 0.2
        b = rng.random((97, 130)) < 0.2
        ra = gf2.rank(a)
        assert gf2.rank(a.T) == ra
        assert gf2.rank(np.vstack([a, a])) == ra  # repeated rows add nothing
        assert gf2.rank(np.vstack([a, a ^ a[[0]]])) <= ra + 1
        assert gf2.rank(gf2.matmul(a, b)) <= min(ra, gf2.rank(b))
        assert gf2.rank(np.hstack([a, np.zeros((150, 70), bool)])) == ra  # zero columns are trimmed
    assert gf2.rank(np.eye(300, dtype=bool)) == 300
    assert gf2.rank(np.ones((200, 300), dtype=bool)) == 1
    assert gf2.rank(np.zeros((5, 7), dtype=bool)) == 0


def test_threshold_rank_equals_rank_of_mask():
    rng = np.random.default_rng(5)
    values = rng.random((130, 210))
    for threshold in (0.0, 0.5, 0.9, 0.99, 0.999, 1.0):
        mask = values > threshold
        rank, upper = gf2.threshold_rank(values, threshold)
        assert rank == brute_rank(mask)
        assert upper == min(mask.any(axis=1).sum(), mask.any(axis=0).sum()) >= rank
        assert gf2.threshold_rank(values, threshold, limit=3)[0] == min(3, rank)
        assert gf2.mask_lines(values, threshold) == upper


@pytest.mark.parametrize("shape", [(1, 1), (3, 200), (200, 3), (64, 64), (130, 257), (300, 150)])
def test_factor_multiplies_back(shape):
    rng = np.random.default_rng(sum(shape))
    for density in (0.02, 0.3, 0.7):
        bits = rng.random(shape) < density
        left, right = gf2.factor(bits)
        assert left.shape == (shape[0], brute_rank(bits))
        assert right.shape == (left.shape[1], shape[1])
        assert np.array_equal(gf2.matmul(left, right), bits)


def test_threshold_rank_compares_float32_values_exactly():
    values = np.array([[0.3, 0.1], [0.1, 0.7]], dtype=np.float32)
    threshold = float(np.float32(0.3))  # exactly the float32 entry: not above itself
    assert gf2.threshold_rank(values, threshold)[0] == gf2.rank(values.astype(np.float64) > threshold) == 1
    assert gf2.threshold_rank(values, np.nextafter(threshold, 0.0))[0] == 2
