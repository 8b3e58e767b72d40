"""One layer's code: exact factors, honest bit counts, decoding, special layers."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from cbdnet.codec import encode_weight, gf2, rd_cost, unpack_bits
from cbdnet.codec.composite import encode_uniform, uniform_bits
from cbdnet.codec.planes import (
    composite_decode,
    composite_encode,
    composite_layout,
    composite_sq_error,
    from_matrix,
    to_matrix,
    uniform_decode,
    uniform_encode,
    uniform_sq_error,
)
from cbdnet.codec.search import rank_bound, search_scale
from cbdnet.errors import WeightError


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


@pytest.mark.parametrize("shape,planes", [((32, 16, 3, 3), 5), ((32, 16, 3, 3), 8), ((4, 1, 3, 3), 4), ((24, 40), 16)])
def test_decoding_through_the_level_table_gives_the_plane_sums_bit_for_bit(shape, planes):
    """A composite or uniform code decodes by one gather from a table of its 2^(J+1) - 1 signed values: the
    same float32 bits as summing the planes of the whole weight, except that a zero level is +0 where the sign
    plane would make it -0."""
    code = encode_weight(conv_weight(shape, planes), planes=planes, bottleneck=0.3)
    h, w = code.matrix_shape
    summed = (composite_decode(code.decode_planes(), code.step, code.exponents) if code.mode == "cbd"
              else uniform_decode(code.decode_planes()))
    signs = np.where(unpack_bits(code.sign, (h, w)), np.float32(-1.0), np.float32(1.0))
    expected = from_matrix(np.float32(code.wmax) * signs * summed, code.shape)
    for decoded in (code.decode(), _with_remembered_levels(code).decode()):
        assert decoded.dtype == np.float32 and decoded.shape == tuple(shape)
        nonzero = expected != 0
        assert np.array_equal(decoded.view(np.uint32)[nonzero], expected.view(np.uint32)[nonzero])
        assert np.all(decoded[~nonzero] == 0)


def _with_remembered_levels(code):
    """The code as a file decoder leaves it: the narrow signed levels remembered beside the planes."""
    twin = copy.copy(code)
    levels = code.signed_magnitudes()
    twin.remember_levels(levels.astype(np.int8 if np.abs(levels).max() < 128 else np.int32))
    return twin


@pytest.mark.parametrize("shape,planes", [((32, 16, 3, 3), 5), ((3, 5, 1, 1), 3), ((7, 13), 16), ((1, 1), 1)])
def test_uniform_size_is_known_before_the_uniform_code_is_built(shape, planes):
    """encode_weight builds the uniform fallback only when it is chosen: its size comes from the formula."""
    code = encode_uniform(conv_weight(shape, 4), planes)
    assert code.bits() == uniform_bits(*code.matrix_shape, planes)


def test_factored_planes_multiply_back_and_respect_the_rank_bound():
    code = encode_weight(conv_weight((64, 32, 3, 3), 1), planes=5, bottleneck=0.3, fallback="size")
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


def test_squared_errors_match_the_decoded_codes():
    r = np.abs(to_matrix(conv_weight((16, 8, 3, 3), 3))).astype(np.float64)
    r /= r.max()
    layout = composite_layout(0.3, 5)
    composite = composite_decode(composite_encode(r, layout), layout.step, layout.exponents)
    assert composite_sq_error(r, layout) == pytest.approx(float(((r - composite) ** 2).sum()), rel=1e-5)
    assert uniform_sq_error(r, 5) == pytest.approx(float(((r - uniform_decode(uniform_encode(r, 5))) ** 2).sum()),
                                                   rel=1e-5)


def first_conv_like(seed=2):
    """A 3->64 3x3 conv (192x9, rank bound 2): the scale search lands at 0.98 (0.90 on the trained
    SegNet-Basic's first layer), so the composite code spans almost twice the weights' range."""
    return conv_weight((64, 3, 3, 3), seed)


def test_distortion_rule_stores_uniform_where_the_composite_range_is_wasted():
    weight = first_conv_like()
    paper = encode_weight(weight, planes=5, bottleneck=0.3, fallback="size")
    ours = encode_weight(weight, planes=5, bottleneck=0.3)
    assert paper.mode == "cbd" and paper.scale > 0.7 and paper.exponents[0] == 0
    assert ours.mode == "uniform" and "error" in ours.reason
    errors = [float(((code.decode() - weight) ** 2).sum()) for code in (paper, ours)]
    assert errors[1] < errors[0] / 2  # the uniform code's step is about half the composite one's
    assert rd_cost(errors[1], ours.bits(), ours.numel) < rd_cost(errors[0], paper.bits(), paper.numel)


@pytest.mark.parametrize("seed", range(6))
def test_distortion_rule_picks_the_code_with_the_lower_cost(seed):
    rng = np.random.default_rng(seed)
    shape = [(64, 3, 3, 3), (32, 16, 3, 3), (48, 48, 1, 1), (10, 64)][seed % 4]
    weight = (rng.laplace(size=shape) if seed % 2 else rng.standard_normal(shape)).astype(np.float32)
    candidates = [encode_weight(weight, 5, 0.3, fallback="size"), encode_weight(weight, 5, 0.3, mode="uniform")]
    costs = [rd_cost(float(((c.decode() - weight) ** 2).sum()), c.bits(), c.numel) for c in candidates]
    chosen = encode_weight(weight, 5, 0.3)
    if candidates[0].mode == "cbd" and not np.isclose(*costs, rtol=1e-3):
        assert chosen.mode == candidates[int(np.argmin(costs))].mode
    assert np.array_equal(chosen.decode(), candidates[0 if chosen.mode == "cbd" else 1].decode())


def test_unknown_fallback_rule_is_refused():
    with pytest.raises(ValueError, match="fallback"):
        encode_weight(conv_weight(), fallback="smallest")
