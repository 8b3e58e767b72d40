"""Grid codes (RTN baseline, per-channel composite code): exact round trips, bit accounting, file format."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cbdnet.codec.grid import encode_composite_grouped, encode_rtn, grid_code, rtn_levels
from cbdnet.format import cbdfile as io
from cbdnet.nn import compress_layers


def _weight(seed: int = 0, shape=(8, 4, 3, 3)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_rtn_matches_round_to_nearest(bits, granularity):
    weight = _weight(bits)
    code = encode_rtn(weight, bits, granularity)
    axes = (1, 2, 3) if granularity == "channel" else None
    peak = np.abs(weight).max(axis=axes, keepdims=True)
    top = 2 ** (bits - 1) - 1
    step = (peak / top).astype(np.float32)
    expected = np.clip(np.rint(weight / step), -top, top) * step
    np.testing.assert_allclose(code.decode(), expected, rtol=1e-6, atol=1e-7)
    groups = weight.shape[0] if granularity == "channel" else 1
    assert code.bits() == 8 * ((weight.size + 7) // 8) * bits + 32 * groups  # K bits per weight + float32 steps
    for channel in code.decode():
        assert len(np.unique(channel)) <= 2 * top + 1


def test_grid_levels_round_trip_exactly():
    rng = np.random.default_rng(3)
    levels = rng.integers(-7, 8, size=(6, 5, 3, 3))
    steps = rng.uniform(0.1, 1.0, size=6).astype(np.float32)
    code = grid_code(levels, steps, 3, factor_from=2)
    np.testing.assert_array_equal(code.decode(), levels.astype(np.float32) * steps[:, None, None, None])


def test_composite_grouped_factors_high_planes_and_round_trips():
    weight = _weight(5, (32, 16, 3, 3))
    code = encode_composite_grouped(weight, planes=4, bottleneck=0.3)
    assert code.mode == "grid" and code.steps.size == 32
    error = np.linalg.norm(code.decode() - weight) / np.linalg.norm(weight)
    assert error < 0.2
    h, w = code.matrix_shape
    for plane, decoded in zip(code.planes, code.decode_planes(), strict=True):
        assert decoded.shape == (h, w)
        if plane.storage == "factored":
            assert plane.bits() < 8 * ((h * w + 7) // 8)


def test_rtn_levels_per_channel_peak_is_exact():
    weight = _weight(1)
    levels, steps = rtn_levels(weight, 4, "channel")
    assert np.all(np.abs(levels).reshape(8, -1).max(axis=1) == 7)
    assert steps.dtype == np.float32


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 16, 5)).eval()


@pytest.mark.parametrize("encoder", [lambda n, w: encode_rtn(w, 4, "channel"),
                                     lambda n, w: encode_rtn(w, 3, "tensor"),
                                     lambda n, w: encode_composite_grouped(w, 3, 0.3)])
def test_grid_file_round_trip_and_bits_equal_bytes(tmp_path, encoder):
    model, report = compress_layers(_tiny(), encoder, progress=False)
    path = tmp_path / "m.cbd"
    size = io.save(model, path)
    loaded = io.load(path, _tiny())
    x = torch.randn(2, 3, 4, 4)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert io.verify(path) == []
    parsed = io.read(path)
    payload_bits = sum(a.nbytes for a in parsed.floats.values()) * 8 + report.weight_bits
    assert payload_bits == report.total_bits
    assert 0 < size - report.total_bits // 8 < 16384  # the rest is the header, JSON metadata and checksum


def test_grid_file_rejects_wrong_step_count(tmp_path):
    model, _ = compress_layers(_tiny(), lambda n, w: encode_rtn(w, 4, "channel"), progress=False)
    code = model[0].code
    code.steps = code.steps[:3]
    path = tmp_path / "bad.cbd"
    io.save(model, path)
    with pytest.raises(io.FormatError, match="steps"):
        io.read(path)


def test_cli_rtn_bits_per_weight_is_k_plus_the_stored_steps(tmp_path):
    import json

    from cbdnet.cli import main
    from cbdnet.zoo.models import build

    out, report = tmp_path / "r.cbd", tmp_path / "r.json"
    assert main(["compress", "--quiet", "--arch", "digits-cnn", "--weights", "random", "--method", "rtn",
                 "--bits", "3", "--granularity", "channel", "-o", str(out), "--json", str(report)]) == 0
    result = json.loads(report.read_text())
    layers = [m for m in build("digits-cnn").modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    expected = sum(8 * ((m.weight.numel() + 7) // 8) * 3 + 32 * m.weight.shape[0] for m in layers)
    assert result["weight_bits"] == expected
    assert all(layer["mode"] == "grid" for layer in result["layers"])
    assert io.verify(out) == []


def test_cli_rejects_channel_granularity_for_the_uniform_code(capsys):
    from cbdnet.cli import main

    assert main(["compress", "--quiet", "--arch", "digits-cnn", "--weights", "random", "--method", "uniform",
                 "--granularity", "channel"]) == 2
    assert "granularity" in capsys.readouterr().err


def test_cli_rtn_with_calibration_keeps_the_bits_and_corrects_every_layer(tmp_path):
    import json

    from cbdnet.cli import main

    reports = {}
    calib = ["--calib", "digits:train", "--calib-images", "150"]
    for tag, extra in (("plain", []), ("calib", [*calib, "--bias-correction"]), ("auto", calib)):
        path = tmp_path / f"{tag}.json"
        assert main(["compress", "--quiet", "--arch", "digits-cnn", "--weights", "random", "--method", "rtn",
                     "--bits", "3", "--json", str(path), *extra]) == 0
        reports[tag] = json.loads(path.read_text())
    assert reports["calib"]["weight_bits"] == reports["plain"]["weight_bits"]
    assert all("gptq" in layer["reason"] for layer in reports["calib"]["layers"])
    assert reports["calib"]["calibration"]["bias_corrected_layers"] == len(reports["calib"]["layers"])
    auto = reports["auto"]["calibration"]  # by default the correction is kept only where it lowers the loss
    assert auto["loss_after"] <= auto["loss_compressed"]
    assert auto["bias_corrected_layers"] in (0, len(reports["auto"]["layers"]))


def test_half_steps_round_only_where_each_step_keeps_its_precision():
    from cbdnet.codec.grid import half_steps

    steps = np.array([0.0123, 1.5, 3e-3], np.float32)
    rounded = half_steps(steps)
    assert np.array_equal(rounded.astype(np.float16).astype(np.float32), rounded)
    assert np.all(np.abs(rounded / steps - 1) <= 2.0**-11)
    for bad in ([0.0123, 1e-7], [0.5, 1e6], [0.5, np.float32(2.0**-20)]):  # subnormal/zero, overflow: all kept
        kept = np.array(bad, np.float32)
        assert np.array_equal(half_steps(kept), kept)
