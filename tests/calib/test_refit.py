"""Sequential output-matching GPTQ after the codes are chosen (``CalibrationConfig(refit=...)``, ``--refit``)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from small_nets import resnet8, toy_data

import cbdnet
from cbdnet.calib import refit as refit_module
from cbdnet.calib.refit import calibration_kl, refit_levels
from cbdnet.calib.stats import input_patches
from cbdnet.cli import main
from cbdnet.format import encode_file
from cbdnet.zoo.models import CifarResNet


def _codes(model) -> dict:
    return {name: m.code for name, m in model.named_modules() if getattr(m, "code", None) is not None}


@pytest.fixture(scope="module")
def compressed():
    """ResNet-8, 3-bit RTN per channel with GPTQ, no refit and no bias correction (so refit alone changes it)."""
    float_model = resnet8()
    settings = cbdnet.CalibrationConfig(bias_correction=False, refit=False)
    model, _ = cbdnet.compress(copy.deepcopy(float_model), cbdnet.RTNConfig(bits=3, calibration=settings), toy_data(),
                               progress=False, fold_bn=False)
    return float_model, model


def _layer_error(model, float_model, name: str, data) -> float:
    """E|W x - W_hat x~|^2 of one layer: the float layer on the float input against the compressed layer on
    the compressed model's input."""
    inputs = {}
    for key, net in (("float", float_model), ("compressed", model)):
        handle = net.get_submodule(name).register_forward_pre_hook(lambda m, a, k=key: inputs.__setitem__(k, a[0]))
        with torch.no_grad():
            net(data.images)
        handle.remove()
    layer = model.get_submodule(name)
    exact = input_patches(layer, inputs["float"]) @ float_model.get_submodule(name).weight.reshape(
        layer.weight.shape[0], -1).T
    approx = input_patches(layer, inputs["compressed"]) @ layer.weight.reshape(layer.weight.shape[0], -1).T
    return float(((exact - approx) ** 2).sum().detach())


@pytest.mark.slow
def test_refit_keeps_the_grids_and_lowers_each_changed_layers_output_error(compressed):
    float_model, plain = compressed
    model = copy.deepcopy(plain)
    data = toy_data()
    names = list(_codes(model))
    result = refit_levels(model, float_model, names, data)
    assert result.layers == len(names) and not result.undone
    assert result.layers_changed and result.levels_changed > 0
    assert result.kl[1] < result.kl[0] == pytest.approx(calibration_kl(plain, float_model, data))
    before, after = _codes(plain), _codes(model)
    for name, code in after.items():
        np.testing.assert_array_equal(code.scales(), before[name].scales())  # the same grid: steps and planes
        assert code.num_planes == before[name].num_planes
        levels, steps = code.levels()
        np.testing.assert_array_equal(code.decode(), (levels * steps.reshape(-1, 1, 1, 1)
                                                      if levels.ndim == 4 else levels * steps.reshape(-1, 1)))
        if name not in result.layers_changed:
            np.testing.assert_array_equal(code.decode(), before[name].decode())
    # in module order, each refitted layer's error against the float layer is below plain GPTQ's (the model
    # up to that layer being the refitted one)
    for index, name in enumerate(names):
        if name in result.layers_changed:
            mixed = copy.deepcopy(model)
            for later in names[index:]:
                mixed.get_submodule(later).set_code(before[later])
            assert _layer_error(model, float_model, name, data) < _layer_error(mixed, float_model, name, data)


def test_refit_is_undone_unless_the_kl_falls(compressed, monkeypatch):
    float_model, plain = compressed
    model = copy.deepcopy(plain)
    had = _codes(model)
    values = iter([0.1, 0.2])  # before, after: worse
    monkeypatch.setattr(refit_module, "calibration_kl", lambda *args: next(values))
    result = refit_levels(model, float_model, list(had), toy_data())
    assert result.undone and result.layers_changed and result.kl == (0.1, 0.2)
    for name, code in _codes(model).items():
        assert code is had[name]  # the very codes it had


def test_refit_spends_no_more_bits_than_the_budget_left(compressed):
    float_model, plain = compressed
    free, tight = copy.deepcopy(plain), copy.deepcopy(plain)
    unbounded = refit_levels(free, float_model, list(_codes(free)), toy_data())
    bounded = refit_levels(tight, float_model, list(_codes(tight)), toy_data(), spare_bits=0)
    assert bounded.extra_bits <= 0 <= bounded.spare_bits
    grown = sum(_codes(tight)[n].coded_bits() - _codes(plain)[n].coded_bits() for n in bounded.layers_changed)
    assert grown == bounded.extra_bits and unbounded.extra_bits > 0  # unbounded, this model's refit grows


@pytest.mark.slow
def test_compress_reports_refit_and_the_file_round_trips(tmp_path):
    data = toy_data()
    model, report = cbdnet.compress(resnet8(), cbdnet.BudgetConfig(target_bits=3.0), calibration=data,
                                    progress=False)
    summary = report.extra["calibration"]["refit"]
    assert summary["layers"] == len(report.layers) == 8 and summary["kl_after"] <= summary["kl_before"]
    changed = [layer for layer in report.layers if layer.reason.endswith(", refit")]
    assert len(changed) == (0 if summary["undone"] else summary["layers_changed"])
    path = tmp_path / "m.cbd"
    path.write_bytes(encode_file(model))
    loaded = cbdnet.load(str(path), model=CifarResNet(1, num_classes=4))
    with torch.no_grad():
        torch.testing.assert_close(loaded(data.images), model(data.images), rtol=0, atol=0)
    config_off = cbdnet.BudgetConfig(target_bits=3.0, calibration=cbdnet.CalibrationConfig(refit=False))
    off, report_off = cbdnet.compress(resnet8(), config_off, data, progress=False)
    assert "refit" not in report_off.extra["calibration"]


def test_cli_refit_flags(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["compress", "--quiet", "--arch", "digits-cnn", "--weights", "random", "--method", "rtn", "--bits",
                 "4", "--calib", "digits:train", "--calib-images", "64", "--no-refit", "--json", str(out)]) == 0
    assert "refit" not in json.loads(out.read_text())["calibration"]
    assert main(["compress", "--quiet", "--arch", "digits-cnn", "--weights", "random", "--refit"]) == 2
    assert "need --calib" in capsys.readouterr().err
    assert main(["compress", "--quiet", "--arch", "digits-cnn", "--weights", "random", "--method", "cbd",
                 "--calib", "digits:train", "--refit"]) == 2
    assert "--refit/--no-refit apply to" in capsys.readouterr().err
    with pytest.raises(cbdnet.CBDError, match="refit must be True or False"):
        cbdnet.CalibrationConfig(refit=1)


def test_the_float_models_outputs_are_kept_between_the_two_kl_passes(compressed, monkeypatch):
    float_model, plain = compressed
    data = toy_data(n=160)  # two batches
    alone = calibration_kl(plain, float_model, data)
    calls = []
    handle = float_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        kept: list = []
        assert calibration_kl(plain, float_model, data, kept) == alone
        assert calibration_kl(plain, float_model, data, kept) == alone and len(calls) == 2 == len(kept)
        monkeypatch.setattr(refit_module, "MAX_KEPT_REFERENCE_BYTES", kept[0].numel() * 4)  # room for one batch
        calls.clear()
        kept = []
        assert calibration_kl(plain, float_model, data, kept) == alone
        assert calibration_kl(plain, float_model, data, kept) == alone and len(calls) == 3 and len(kept) == 1
    finally:
        handle.remove()
