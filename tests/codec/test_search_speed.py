"""The faster scale search returns exactly what the plain binary search returns, with fewer eliminations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cbdnet.codec import gf2
from cbdnet.codec.planes import to_matrix
from cbdnet.codec.search import rank_bound, search_scale


def plain_search(r2d: np.ndarray, bound: int) -> tuple[float, int, int]:
    """The plain binary search: one full-matrix rank per probe, no bounds, no shortcuts."""
    values = np.unique(r2d[r2d > 0])
    lo, hi, hi_rank, probes = -1, values.size - 1, 0, 0
    while hi - lo > 1:
        mid = (lo + hi) // 2
        probes += 1
        rank = gf2.rank(r2d > values[mid])
        if rank <= bound:
            hi, hi_rank = mid, rank
        else:
            lo = mid
    return float(values[hi]), hi_rank, probes


def normalised(weight: np.ndarray) -> np.ndarray:
    matrix = to_matrix(weight)
    return np.abs(matrix).astype(np.float64) / np.float64(np.float32(np.abs(weight).max()))


def check_same(weight: np.ndarray, bottleneck: float) -> None:
    r2d = normalised(weight)
    bound = rank_bound(*r2d.shape, bottleneck)
    scale, mask_rank, probes = plain_search(r2d, bound)
    result = search_scale(r2d, bound)
    assert (result.scale, result.mask_rank, result.probes) == (scale, mask_rank, probes)
    assert result.rank_calls <= probes + 1
    assert mask_rank == gf2.rank(r2d > result.scale) <= bound


def random_weights():
    rng = np.random.default_rng(0)
    yield rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    yield rng.standard_normal((70, 130)).astype(np.float32)
    yield (rng.standard_cauchy((40, 40)) * 0.01).astype(np.float32)  # heavy tails: a few huge entries
    yield np.round(rng.standard_normal((64, 32, 1, 1)), 1).astype(np.float32)  # many repeated values
    sparse = rng.standard_normal((90, 60)).astype(np.float32)
    sparse[rng.random(sparse.shape) < 0.9] = 0.0  # mostly zero: the line-count bound answers probes
    yield sparse


@pytest.mark.parametrize("bottleneck", [0.05, 0.3, 0.6])
def test_same_scale_as_plain_search_on_random_layers(bottleneck):
    for weight in random_weights():
        check_same(weight, bottleneck)


def test_same_scale_as_plain_search_on_resnet20(resnet20_weights):
    state = torch.load(resnet20_weights, map_location="cpu", weights_only=True)["state_dict"]
    weights = [v.numpy() for k, v in state.items() if k.endswith("weight") and v.ndim in (2, 4)]
    assert len(weights) == 20
    for weight in weights[::3]:  # every third layer keeps the test short; all shapes are covered
        check_same(weight, 0.3)


def test_line_count_bound_saves_eliminations():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((200, 100)).astype(np.float32)
    weight[rng.random(weight.shape) < 0.97] = 0.0  # few non-zero lines per threshold
    r2d = normalised(weight)
    result = search_scale(r2d, rank_bound(*r2d.shape, 0.3))
    assert result.rank_calls < result.probes


def test_distinct_positive_equals_numpy_unique():
    from cbdnet.codec.search import distinct_positive

    rng = np.random.default_rng(2)
    cases = [np.abs(rng.standard_normal((300, 200))), np.round(rng.random((50, 40)), 2),
             np.array([[0.0, 1e-300, 5e-324, 1.0, 1.0, 0.5]]), np.zeros((3, 3))]
    for values in cases:
        assert np.array_equal(distinct_positive(values), np.unique(values[values > 0]))


def test_distinct_values_from_float32_keys_equal_those_of_the_float64_matrix():
    """encode_weight sorts the float32 |w| (32-bit keys) and divides by wmax, instead of sorting the float64
    r = |w| / wmax: the division keeps float32 values ordered and distinct, so the search sees the same values,
    and the code is the same one the float64 search finds."""
    from cbdnet.codec import encode_weight
    from cbdnet.codec.search import distinct_positive

    rng = np.random.default_rng(5)
    weights = [(rng.standard_normal((64, 32, 3, 3)) * 0.05).astype(np.float32),
               np.round(rng.standard_normal((40, 30)), 1).astype(np.float32),  # many ties
               (rng.standard_normal((20, 10)) * 1e-38).astype(np.float32),  # float32 subnormals
               np.nextafter(np.float32(0.5), np.float32(1), dtype=np.float32) * np.ones((8, 8), np.float32)]
    weights[1][0, 0] = 0.0
    for weight in weights:
        wmax = np.float32(np.abs(weight).max())
        r2d = normalised(weight)
        assert np.array_equal(r2d, np.abs(to_matrix(weight)).astype(np.float64) / np.float64(wmax))
        from32 = distinct_positive(np.abs(weight)).astype(np.float64) / np.float64(wmax)
        assert distinct_positive(np.abs(weight)).dtype == np.float32
        assert np.array_equal(from32, np.unique(r2d[r2d > 0]))
        code = encode_weight(weight, planes=5, bottleneck=0.3)
        search = search_scale(r2d, rank_bound(*r2d.shape, 0.3))
        assert (code.mask_rank, code.rank_calls) == (search.mask_rank, search.rank_calls)
