"""--target-bits: the budget holds exactly as the file stores it, and the choice is the least-loss one."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from cbdnet.calib.budget import Candidate, choose
from cbdnet.cli import main
from cbdnet.codec.grid import encode_rtn
from cbdnet.format import cbdfile as io


def _candidates(seed: int) -> dict[str, list[Candidate]]:
    rng = np.random.default_rng(seed)
    out = {}
    for layer in range(4):
        weight = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
        options = []
        for bits in (2, 3, 4, 6):
            code = encode_rtn(weight, bits)
            options.append(Candidate(f"rtn{bits}", code, code.bits(), float(rng.uniform(0.5, 2.0)) / 4**bits))
        out[f"l{layer}"] = options
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [3.0, 3.5, 4.5])
def test_choice_fits_the_budget_and_is_near_the_exhaustive_optimum(seed, target):
    candidates = _candidates(seed)
    params = sum(c[0].code.numel for c in candidates.values())
    budget = target * params
    chosen = choose(candidates, budget)
    assert sum(c.bits for c in chosen.values()) <= budget
    best = min(sum(c.loss for c in combo) for combo in itertools.product(*candidates.values())
                if sum(c.bits for c in combo) <= budget)
    assert sum(c.loss for c in chosen.values()) <= 1.5 * best


def test_budget_below_the_cheapest_setting_is_an_error():
    candidates = _candidates(0)
    with pytest.raises(ValueError, match="cheapest"):
        choose(candidates, 1.0 * sum(c[0].code.numel for c in candidates.values()))


@pytest.mark.parametrize("target", ["3.0", "4.5"])
def test_cli_target_bits_counts_bits_as_the_file_stores_them(tmp_path, target):
    out, report = tmp_path / "m.cbd", tmp_path / "r.json"
    code = main(["compress", "--quiet", "--arch", "digits-cnn", "--weights", "random", "--target-bits", target,
                 "--calib", "digits:train", "--calib-images", "200", "-o", str(out), "--json", str(report)])
    assert code == 0
    result = json.loads(report.read_text())
    size = out.stat().st_size
    assert result["file_bits_per_weight"] == 8 * size / result["params"]
    assert result["file_bits_per_weight"] <= float(target)  # the whole file: header and float tensors included
    assert result["file_bits_per_weight"] > float(target) - 0.5  # the budget is used, not wasted
    parsed = io.read(out)
    stored_bits = sum(c.coded_bits() for c in parsed.codes.values())
    assert stored_bits == result["coded_weight_bits"]
    assert stored_bits / result["params"] == result["coded_bits_per_weight"]
    assert result["weight_bits"] == sum(layer["bits"] for layer in result["layers"])  # the fixed-length count
    header = size - stored_bits / 8 - result["float_params_bits"] / 8
    assert 0 < header <= 2048 + 8 * (len(parsed.codes) + len(parsed.floats)) + 60  # container, zlib header
    assert result["calibration"]["loss_after"] > 0


def test_cli_refuses_test_images_for_calibration(tmp_path, capsys):
    code = main(["compress", "--quiet", "--arch", "digits-cnn", "--weights", "random", "--target-bits", "3",
                 "--calib", "cifar10-npz:/nowhere/cifar10_test.npz"])
    assert code == 2
    assert "test images" in capsys.readouterr().err


def test_all_zero_layer_gets_candidates_that_decode_to_zero():
    from cbdnet.calib.budget import layer_candidates

    weight = np.zeros((4, 3, 3, 3), np.float32)
    options = layer_candidates(weight, None)
    assert options and all(not option.code.decode().any() for option in options)
