"""One layer's code: exact factors, honest bit counts, decoding, special layers."""

from __future__ import annotations

import numpy as np
import pytest

from cbdnet import gf2
from cbdnet.codec import encode_weight, unpack_bits
from cbdnet.errors import WeightError
from cbdnet.planes import composite_decode, composite_encode, composite_layout, from_matrix, to_matrix
from cbdnet.search import rank_bound, search_scale


def conv_weight(shape=(32, 16, 3, 3), seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.05).astype(np.float32)


def test_cbd_layer_decodes_to_the_composite_reconstruction():
    weight = conv_weight()
    code = encode_weight(weight, planes=5, bottleneck=0.3)
    assert code.mode == "cbd"
    matrix = to_matrix(weight)
    r = np.abs(matrix) / np.float32(np.abs(weight).max())
    scale = search_scale(r.astype(np.float64), rank_bound(*matrix.shape, 0.3)).scale
    expected_planes = composite_encode(r, composite_layout(scale, 5))
    for stored, expected in zip(code.decode_planes(), expected_planes, strict=True):
        assert np.array_equal(stored, expected)
    magnitude = composite_decode(expected_planes, code.step, code.exponents)
    expected = from_matrix(np.float32(code.wmax) * np.where(matrix < 0, -1, 1) * magnitude, weight.shape)
    assert np.array_equal(code.decode(), expected.astype(np.float32))


def test_factored_planes_multiply_back_and_respect_the_rank_bound():
    code = encode_weight(conv_weight((64, 32, 3, 3), 1), planes=5, bottleneck=0.3)
    h, w = code.matrix_shape
    assert code.mask_rank <= code.bound == rank_bound(h, w, 0.3)
    assert code.factored_planes >= 1
    for plane in code.planes:
        if plane.storage == "factored":
            left = unpack_bits(plane.tensors["B"], (h, plane.rank))
            right = unpack_bits(plane.tensors["C"], (plane.rank, w))
            product = gf2.matmul(left, right)
            assert gf2.rank(product) == plane.rank
            assert plane.rank * (h + w) < h * w  # factoring paid


def test_bits_count_every_stored_byte():
    code = encode_weight(conv_weight(), planes=5, bottleneck=0.3)
    assert code.bits() == 8 * sum(array.nbytes for array in code.tensors().values())
    h, w = code.matrix_shape
    plain = 8 * ((h * w + 7) // 8)
    factored = sum(8 * ((h * p.rank + 7) // 8 + (p.rank * w + 7) // 8) for p in code.planes
                   if p.storage == "factored")
    packed = sum(plain for p in code.planes if p.storage == "packed")
    assert code.bits() == plain + factored + packed + 96  # sign + planes + three float32 scales


def test_search_result_sits_on_the_rank_boundary():
    matrix = np.abs(to_matrix(conv_weight((64, 64, 3, 3), 2))).astype(np.float64)
    r = matrix / matrix.max()
    bound = rank_bound(*r.shape, 0.3)
    result = search_scale(r, bound)
    assert gf2.rank(r > result.scale) == result.mask_rank <= bound
    below = np.unique(r)[np.unique(r) < result.scale].max()
    assert gf2.rank(r > below) > bound  # one value lower and the mask is too rich


def test_uniform_fallback_when_no_entry_lies_above_the_scale():
    weight = conv_weight((4, 1, 3, 3))  # h=12, w=3: bound 0 -> empty mask
    code = encode_weight(weight, planes=4, bottleneck=0.3)
    assert code.mode == "uniform" and code.factored_planes == 0
    r = np.abs(weight) / np.abs(weight).max()
    assert np.abs(np.abs(code.decode()) / code.wmax - r).max() <= 0.5 / 15 + 1e-6


def test_zero_layer_is_stored_exactly_in_few_bits():
    code = encode_weight(np.zeros((8, 4, 3, 3), np.float32))
    assert code.mode == "zero" and np.array_equal(code.decode(), np.zeros((8, 4, 3, 3), np.float32))
    assert code.bits() == 96


def test_nan_and_inf_weights_are_refused_naming_the_layer():
    weight = conv_weight()
    weight[0, 0, 0, 0] = np.nan
    with pytest.raises(WeightError, match="features.3"):
        encode_weight(weight, name="features.3")
    weight[0, 0, 0, 0] = np.inf
    with pytest.raises(WeightError, match="NaN/Inf"):
        encode_weight(weight, name="x")


def test_linear_and_grouped_shapes():
    for shape in [(10, 64), (32, 1, 3, 3), (16, 8, 1, 1), (1, 16, 3, 3)]:
        weight = conv_weight(shape, 3)
        code = encode_weight(weight, planes=6, bottleneck=0.5)
        decoded = code.decode()
        assert decoded.shape == weight.shape and decoded.dtype == np.float32
        assert np.array_equal(np.sign(decoded[decoded != 0]), np.sign(weight[decoded != 0]))
        assert np.linalg.norm(decoded - weight) / np.linalg.norm(weight) < 0.1
