"""The composite and uniform bit-plane codes and the 2-D arrangement."""

from __future__ import annotations

import numpy as np
import pytest

from cbdnet.codec.planes import (
    composite_decode,
    composite_encode,
    composite_layout,
    from_matrix,
    min_scale,
    to_matrix,
    uniform_decode,
    uniform_encode,
)


def test_conv_arrangement_rows_are_out_kh_and_columns_in_kw():
    weight = np.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    matrix = to_matrix(weight)
    assert matrix.shape == (2 * 4, 3 * 5)
    for o, i, y, x in np.ndindex(weight.shape):
        assert matrix[o * 4 + y, i * 5 + x] == weight[o, i, y, x]
    assert np.array_equal(from_matrix(matrix, weight.shape), weight)


def test_layout_matches_the_paper_formulas():
    layout = composite_layout(0.3, planes=5)
    assert layout.exponents == (1, 0, -1, -2, -3)  # a_s = floor(log2(1/0.3)) = 1, a_i = a_s - J + 1
    d = 2.0 ** (-3 - 1) / (1 - 2.0 ** (-3 - 1)) * 0.3
    assert layout.step == pytest.approx(0.3 + d)
    assert layout.shift == pytest.approx(d)


@pytest.mark.parametrize("scale,planes", [(0.3, 5), (0.07, 4), (0.7, 6), (0.5, 3), (0.12, 8), (0.0626, 4)])
def test_composite_code_rounds_to_nearest_and_keeps_high_planes_above_the_scale(scale, planes):
    rng = np.random.default_rng(planes)
    r = rng.random(5000)
    r[0] = 1.0
    layout = composite_layout(scale, planes)
    coded = composite_encode(r, layout)
    above = r > scale
    for plane, exponent in zip(coded, layout.exponents, strict=True):
        if exponent >= 0:
            assert not (plane & ~above).any(), "a high plane holds an entry at or below the scale"
    approx = composite_decode(coded, layout.step, layout.exponents)
    finest = layout.step * 2.0 ** layout.exponents[-1]
    top = layout.step * (2.0 ** (layout.exponents[0] + 1) - 2.0 ** layout.exponents[-1])
    inside = r <= top
    assert np.abs(approx[inside] - r[inside]).max() <= finest / 2 + 1e-6
    assert top >= 1.0 - finest / 2  # the largest weight is representable to within half a step


def test_scale_below_the_reach_of_j_planes_is_refused_and_min_scale_is_the_limit():
    with pytest.raises(ValueError):
        composite_layout(0.05, planes=4)  # a_s = 4, a_i = 1: the paper's D divides by zero
    assert composite_layout(min_scale(4), planes=4).exponents == (3, 2, 1, 0)


def test_uniform_code_is_exact_on_its_levels():
    planes = 4
    levels = np.arange(16) / 15
    decoded = uniform_decode(uniform_encode(levels, planes))
    assert np.allclose(decoded, levels, atol=1e-7)
    r = np.random.default_rng(0).random(1000)
    assert np.abs(uniform_decode(uniform_encode(r, planes)) - r).max() <= 0.5 / 15 + 1e-7
