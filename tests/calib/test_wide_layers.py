"""Layers wider than ``MAX_FULL_INPUTS`` inputs (VGG-16's fc6: 25,088) keep only the diagonal of their second
moment: their codes are rounded to nearest (GPTQ on a diagonal ``H``), refit leaves them alone, the report row
says so, and the statistics of a full-size one take megabytes, not the 5 GB of a float64 ``d x d``."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import torch
from torch import nn

import cbdnet
from cbdnet.calib import stats as calibrate
from cbdnet.calib.stats import collect_stats, output_error
from cbdnet.codec.grid import round_levels
from cbdnet.zoo.data import ClassificationData


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 8 * 8, 48),
                          nn.ReLU(), nn.Linear(48, 4)).eval()
    g = torch.Generator().manual_seed(1)
    data = ClassificationData(torch.randn(64, 3, 8, 8, generator=g), torch.randint(0, 4, (64,), generator=g), "toy")
    return model, data


def test_a_wide_layer_keeps_the_diagonal_of_the_full_moment(monkeypatch):
    model, data = _setup()
    layers = [("0", model[0]), ("3", model[3]), ("5", model[5])]
    full = collect_stats(model, layers, data)
    monkeypatch.setattr(calibrate, "MAX_FULL_INPUTS", 1000)  # the Linear of 1,024 inputs is now wide
    wide = collect_stats(model, layers, data)
    assert wide["3"].diagonal and not wide["0"].diagonal and not full["3"].diagonal
    assert wide["3"].hessian.shape == (1024,)
    torch.testing.assert_close(wide["3"].hessian, torch.diagonal(full["3"].hessian), rtol=1e-6, atol=0)
    torch.testing.assert_close(wide["3"].mean, full["3"].mean)
    torch.testing.assert_close(wide["3"].fisher, full["3"].fisher)
    delta = np.random.default_rng(0).standard_normal((48, 1024))
    expected = ((delta**2) * torch.diagonal(full["3"].hessian).numpy()).sum(1)
    np.testing.assert_allclose(output_error(delta, wide["3"]), expected, rtol=1e-6)  # float32 sums


def test_a_budget_rounds_a_wide_layer_to_nearest_and_says_so(monkeypatch):
    model, data = _setup()
    weight = model[3].weight.detach().numpy().copy()
    monkeypatch.setattr(calibrate, "MAX_FULL_INPUTS", 1000)
    model, report = cbdnet.compress(model, cbdnet.BudgetConfig(target_bits=3.5), calibration=data, progress=False)
    rows = {layer.name: layer for layer in report.layers}
    assert "diagonal H: no gptq" in rows["3"].reason and "gptq" in rows["0"].reason
    assert "diagonal" not in rows["0"].reason
    code = model[3].code
    levels, steps = code.levels()
    np.testing.assert_array_equal(levels, round_levels(weight, steps.astype(np.float32), code.num_planes))
    refit = report.extra["calibration"]["refit"]
    assert refit["layers"] == 2  # the conv and the last Linear: the wide layer is not refitted


SCRIPT = textwrap.dedent("""
    import json, resource, torch
    from torch import nn
    from cbdnet.calib.stats import collect_stats
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(512 * 7 * 7, 16), nn.ReLU(), nn.Linear(16, 10)).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 512, 7, 7, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    stats = collect_stats(model, [("1", model[1]), ("3", model[3])], data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth": (peak - before) * 1024, "diagonal": stats["1"].diagonal}))
""")


def test_the_statistics_of_vgg16_fc6_inputs_take_megabytes():
    """d = 25,088 (VGG-16's fc6): a float64 d x d second moment would be 5.0 GB; the diagonal is 200 KB."""
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["diagonal"] and got["growth"] < 256 << 20, got
