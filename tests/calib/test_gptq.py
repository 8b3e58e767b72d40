"""The GPTQ solver: blocked float32 updates against the plain per-column float64 algorithm, and its factor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gptq_reference import gptq_reference

from cbdnet.calib import stats as calibrate
from cbdnet.codec.grid import rtn_steps


def _problem(out: int, d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((4 * d, d // 3)) @ rng.standard_normal((d // 3, d)) + rng.standard_normal((4 * d, d))
    hessian = torch.from_numpy(x.T @ x / x.shape[0])
    hessian[5, :] = hessian[:, 5] = 0.0  # a dead input
    return (rng.standard_normal((out, d)) * 0.05).astype(np.float32), hessian


def test_factor_is_the_upper_cholesky_factor_of_the_damped_inverse():
    _, hessian = _problem(4, 300)
    dead, order, upper = calibrate._gptq_factor(hessian, 0.01)
    h = hessian.clone()
    h[dead, dead] = 1.0
    h = h[order][:, order]
    h += 0.01 * torch.diag(h).mean() * torch.eye(300, dtype=h.dtype)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    assert torch.equal(upper, torch.triu(upper)) and upper.dtype == torch.float32
    torch.testing.assert_close(upper.double(), expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_lower_inverse_by_halves_is_the_inverse():
    rng = np.random.default_rng(2)
    lower = torch.from_numpy(np.tril(rng.standard_normal((301, 301))) + 30 * np.eye(301))
    torch.testing.assert_close(calibrate._lower_inverse(lower, leaf=32) @ lower, torch.eye(301, dtype=torch.float64))


@pytest.mark.parametrize("mag_bits", [1, 3])
def test_blocked_float32_gptq_matches_the_per_column_float64_algorithm(mag_bits):
    """Blocks of 128 columns over 400, float32: the same levels up to float32 ties (at most 0.5 % of entries
    differ; measured: none here, 0.05 % on a 48 x 1,400 layer), and the same output error within 0.5 %."""
    weight, hessian = _problem(24, 400)
    steps = rtn_steps(weight, mag_bits + 1, "channel")
    got = calibrate.gptq_levels(weight, steps, mag_bits, hessian)
    expected = gptq_reference(weight, steps, mag_bits, hessian)
    assert np.abs(got).max() <= (1 << mag_bits) - 1
    assert (got != expected).mean() <= 0.005

    def error(levels):
        delta = torch.from_numpy(levels * steps[:, None].astype(np.float64) - weight)
        return float(((delta @ hessian) * delta).sum())
    assert error(got) == pytest.approx(error(expected), rel=5e-3)


def test_factors_are_kept_between_calls(monkeypatch):
    weight, hessian = _problem(8, 64)
    grids = [(rtn_steps(weight, bits, "channel"), bits - 1) for bits in (2, 4)]
    calls = []
    factor = calibrate._gptq_factor
    monkeypatch.setattr(calibrate, "_gptq_factor", lambda h, damp: calls.append(1) or factor(h, damp))
    kept = {}
    first = calibrate.gptq_levels_stacked(weight, grids[:1], hessian, factors=kept)
    second = calibrate.gptq_levels_stacked(weight, grids, hessian, factors=kept)
    assert len(calls) == 1 and np.array_equal(first[0], second[0])
