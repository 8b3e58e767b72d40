"""GF(2) rank and factorisation: against brute force, a slow reference, and rank identities."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from cbdnet.codec import gf2


def brute_force_rank(bits: np.ndarray) -> int:
    """log2 of the number of distinct XOR combinations of the rows (the size of the row space)."""
    rows = [int("".join("1" if b else "0" for b in row) or "0", 2) for row in bits]
    span = {0}
    for row in rows:
        span |= {value ^ row for value in span}
    return len(span).bit_length() - 1


def reference_rank(bits: np.ndarray) -> int:
    """Plain row-by-row Gaussian elimination on a uint8 copy."""
    m = np.array(bits, dtype=np.uint8) % 2
    rank = 0
    for col in range(m.shape[1]):
        pivot = next((i for i in range(rank, m.shape[0]) if m[i, col]), None)
        if pivot is None:
            continue
        m[[rank, pivot]] = m[[pivot, rank]]
        for i in range(m.shape[0]):
            if i != rank and m[i, col]:
                m[i] ^= m[rank]
        rank += 1
    return rank


small_matrices = st.integers(1, 9).flatmap(
    lambda h: st.integers(1, 9).flatmap(lambda w: arrays(np.bool_, (h, w))))


@settings(max_examples=300, deadline=None)
@given(small_matrices)
def test_rank_matches_brute_force(bits):
    assert gf2.rank(bits) == brute_force_rank(bits)


@settings(max_examples=200, deadline=None)
@given(small_matrices)
def test_factor_multiplies_back_with_true_rank(bits):
    left, right = gf2.factor(bits)
    assert left.shape == (bits.shape[0], gf2.rank(bits))
    assert right.shape == (gf2.rank(bits), bits.shape[1])
    assert np.array_equal((left.astype(int) @ right.astype(int)) % 2, bits.astype(int))


def test_every_3x3_matrix_exhaustively():
    for values in itertools.product((0, 1), repeat=9):
        bits = np.array(values, dtype=np.uint8).reshape(3, 3)
        assert gf2.rank(bits) == brute_force_rank(bits)


@pytest.mark.parametrize("shape,density", [((192, 192), 0.01), ((192, 192), 0.5), ((150, 70), 0.1),
                                           ((70, 300), 0.03), ((64, 64), 0.9), ((65, 129), 0.5)])
def test_rank_and_factor_on_sparse_and_dense_matrices(shape, density):
    rng = np.random.default_rng(hash(shape) % 2**32)
    bits = rng.random(shape) < density
    r = gf2.rank(bits)
    assert r == reference_rank(bits)
    assert gf2.rank(bits.T) == r
    left, right = gf2.factor(bits)
    assert left.shape[1] == r
    assert np.array_equal(gf2.matmul(left, right), bits)


@pytest.mark.parametrize("inner", [1, 5, 17, 64, 65])
def test_rank_of_product_is_bounded_by_inner_dimension(inner):
    rng = np.random.default_rng(inner)
    left = rng.random((100, inner)) < 0.5
    right = rng.random((inner, 130)) < 0.5
    product = gf2.matmul(left, right)
    assert np.array_equal(product, (left.astype(int) @ right.astype(int)) % 2 == 1)
    assert gf2.rank(product) <= min(inner, gf2.rank(left), gf2.rank(right))


def test_known_ranks():
    assert gf2.rank(np.ones((50, 40), dtype=bool)) == 1  # over the reals also 1, but…
    assert gf2.rank(np.eye(37, dtype=bool)) == 37
    assert gf2.rank(np.zeros((5, 7), dtype=bool)) == 0
    assert gf2.rank(np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]])) == 2  # rows sum to 0 mod 2; real rank is 3


@settings(max_examples=100, deadline=None)
@given(small_matrices, st.integers(0, 10))
def test_limit_caps_the_rank(bits, limit):
    assert gf2.rank(bits, limit=limit) == min(gf2.rank(bits), limit)


def test_pack_unpack_round_trip():
    rng = np.random.default_rng(1)
    for width in (1, 63, 64, 65, 200):
        bits = rng.random((17, width)) < 0.5
        assert np.array_equal(gf2.unpack_rows(gf2.pack_rows(bits), width), bits)


def test_rejects_non_binary_input():
    with pytest.raises(ValueError):
        gf2.rank(np.array([[0, 2]]))
    with pytest.raises(ValueError):
        gf2.rank(np.zeros(4, dtype=bool))
