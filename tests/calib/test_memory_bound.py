"""Peak memory of a calibrated budget: bounded by the model, its statistics and one batch (measured in a
subprocess, at reduced size).

The bound (BENCHMARKS.md, "Scaling of the calibrated budget"): the growth of peak RSS over a budgeted
``compress`` is at most ``3 S + 6 H + 16 P + 4 A + C + 256 MiB``, with ``S`` the statistics' bytes (a float64
``d x d`` second moment per layer of ``d <= MAX_FULL_INPUTS`` inputs, its diagonal, ``8 d`` bytes, above), ``H``
the largest layer's, ``P`` the weights' float32 bytes, ``A`` one calibration batch's activations (every module
output, float32) and ``C`` the calibration images, decoded once and held as float32 (at most
``MAX_CALIBRATION_BYTES``). Candidate levels are not in it: a layer's grids
are made exact a few at a time and only a layer's at once (``int16``), never every grid of every layer.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    from torch import nn
    import cbdnet
    torch.manual_seed(0)
    widths = json.loads(sys.argv[1])
    layers = []
    for a, b in zip(widths, widths[1:]):
        layers += [nn.Conv2d(a, b, 3, padding=1), nn.BatchNorm2d(b), nn.ReLU()]
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(widths[-1], 10)).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)) for _ in range(2)]
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.numel())) for m in model.modules()]
    with torch.no_grad():
        model(torch.cat([images for images, _ in data]))
    for hook in hooks:
        hook.remove()
    coded = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    from cbdnet.calib.stats import keeps_full
    second = [8 * m.weight[0].numel() ** (2 if keeps_full(m.weight[0].numel()) else 1) for m in coded]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model, report = cbdnet.compress(model, cbdnet.BudgetConfig(target_bits=3.0), calibration=data, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"growth": (peak - before) * 1024, "S": sum(second), "H": max(second),
                      "P": 4 * report.params, "A": 4 * sum(outputs),
                      "C": 4 * sum(images.numel() for images, _ in data), "bits": report.bits_per_weight}))
""")


def _measured(widths: list[int]) -> tuple[dict, int]:
    """Runs ``SCRIPT`` on a conv stack of these widths; returns its figures and the bound formula's value."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(widths)], capture_output=True, text=True,
                          timeout=600, check=True)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    return got, 3 * got["S"] + 6 * got["H"] + 16 * got["P"] + 4 * got["A"] + got["C"] + (256 << 20)


@pytest.mark.slow
def test_peak_rss_of_a_budget_is_bounded_by_model_statistics_and_one_batch():
    got, bound = _measured([3, 48, 96, 96, 192, 192])
    assert got["growth"] <= bound, got
    # and the bound is not vacuous here: the statistics and factor terms are most of it
    assert 3 * got["S"] + 6 * got["H"] > 0.3 * bound


def test_peak_rss_of_a_budget_is_bounded_at_a_small_width():
    """The fast twin: the same bound on a narrower stack (there the 256 MiB constant is most of the bound)."""
    got, bound = _measured([3, 16, 32, 32, 64])
    assert got["growth"] <= bound, got
    assert got["S"] > 0 and got["A"] > 0 and got["bits"] > 0, got  # the budget ran and was measured
