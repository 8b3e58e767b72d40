"""Layers of any shape in the calibrated path: Linear inputs of any rank (channels-last pixels, tokens), packed
``nn.MultiheadAttention`` projections, grouped convolutions and transposed convolutions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import cbdnet
from cbdnet.calib.batches import as_calibration_set
from cbdnet.calib.configs import BudgetConfig, CalibrationConfig
from cbdnet.calib.stats import LayerStats, _attention_hook, _mean_shift, bias_correct, collect_stats, output_error
from cbdnet.nn import CBDMultiheadAttention
from cbdnet.nn.walk import compressible_layers

FEW = BudgetConfig(target_bits=6.0, rtn_bits=(3, 4, 5), composite_planes=(), levels=(), weighted_levels=())


class ChannelsLast(nn.Module):
    """A ConvNeXt-style block: a Linear MLP on [N, H, W, C] activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 4)

    def forward(self, x):
        t = self.conv(x).permute(0, 2, 3, 1)
        return self.head(self.fc2(torch.relu(self.fc1(t))).mean((1, 2)))


class Attention(nn.Module):
    """Tokens through a packed multi-head attention, batch first or not."""

    def __init__(self, batch_first: bool = True, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(3, width)
        self.attention = nn.MultiheadAttention(width, 4, batch_first=batch_first)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        tokens = self.embed(x.flatten(2).transpose(1, 2))  # [N, L, C]
        if not self.attention.batch_first:
            tokens = tokens.transpose(0, 1)
        out, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head((out if self.attention.batch_first else out.transpose(0, 1)).mean(1))


def _data(n: int = 6, size: int = 4):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_linear_on_channels_last_input():
    torch.manual_seed(0)
    model = ChannelsLast().eval()
    x, y = _data()
    stats = collect_stats(model, compressible_layers(model), [(x, y)])
    rows = torch.relu(model.fc1(model.conv(x).permute(0, 2, 3, 1))).reshape(-1, 16).double()
    torch.testing.assert_close(stats["fc2"].hessian, (rows.T @ rows / rows.shape[0]).float())  # kept in float32
    torch.testing.assert_close(stats["fc2"].mean, rows.mean(0))
    assert stats["fc1"].fisher.shape == (16,) and stats["fc2"].fisher.shape == (8,)
    assert (stats["fc1"].fisher > 0).all() and stats["fc1"].samples == 6 * 16


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_hook_keeps_the_output_and_gets_exact_statistics(batch_first):
    torch.manual_seed(0)
    model = Attention(batch_first).eval()
    x, y = _data()
    with torch.no_grad():
        expected = model(x)
    stats: dict[str, LayerStats] = {}
    handle = model.attention.register_forward_hook(
        _attention_hook(stats, "attention", "attention.out_proj", torch.Generator()), with_kwargs=True)
    try:
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    finally:
        handle.remove()
    full = collect_stats(model, compressible_layers(model), [(x, y)])
    tokens = model.embed(x.flatten(2).transpose(1, 2)).reshape(-1, 16).double()
    assert full["attention"].groups == 3 and full["attention"].fisher.shape == (48,)
    for group in range(3):  # query, key and value rows all see the tokens here
        torch.testing.assert_close(full["attention"].hessian[group], (tokens.T @ tokens / tokens.shape[0]).float())
    assert (full["attention"].fisher > 0).all() and (full["attention.out_proj"].fisher > 0).all()
    assert full["attention.out_proj"].hessian.shape == (16, 16)


@pytest.mark.parametrize("batch_first", [True, False])
def test_attention_in_proj_is_coded_saved_and_reloaded(batch_first, tmp_path):
    torch.manual_seed(0)
    model = Attention(batch_first, width=64).eval()
    x, y = _data(8)
    keys = sorted(model.state_dict())
    model, report = cbdnet.compress(model, FEW, calibration=[(x, y)], progress=False)
    kinds = {layer.name: layer.kind for layer in report.layers}
    assert kinds == {"embed": "linear", "attention": "attention_in_proj", "attention.out_proj": "linear",
                     "head": "linear"}
    assert report.float_layers == [] and sorted(model.state_dict()) == keys
    assert isinstance(model.attention, CBDMultiheadAttention)
    assert torch.equal(model.attention.in_proj_weight, torch.from_numpy(model.attention.code.decode()))
    path = tmp_path / "attention.cbd"
    cbdnet.save(model, path)
    torch.manual_seed(1)
    loaded = cbdnet.load(path, Attention(batch_first, width=64))
    assert isinstance(loaded.attention, CBDMultiheadAttention) and sorted(loaded.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    from cbdnet.format.cbdfile import load

    model.cbdnet_arch = "attention"
    cbdnet.save(model, path)  # a file naming its architecture loads into a meta-device skeleton
    built = load(path, builder=lambda arch, kwargs: Attention(batch_first, width=64))
    assert isinstance(built.attention, CBDMultiheadAttention)
    with torch.no_grad():
        torch.testing.assert_close(built(x), model(x))


def test_attention_bias_correction_moves_in_proj_bias():
    torch.manual_seed(0)
    model = Attention().eval()
    x, y = _data()
    layers = compressible_layers(model)
    stats = collect_stats(model, layers, [(x, y)])
    original = {"attention": model.attention.in_proj_weight.detach().double().numpy().copy()}
    bias = model.attention.in_proj_bias.detach().clone()
    with torch.no_grad():
        model.attention.in_proj_weight += 0.01
    assert bias_correct(model, original, stats) == ["attention"]
    shift = _mean_shift(np.full((48, 16), 0.01), stats["attention"])
    torch.testing.assert_close(model.attention.in_proj_bias.double(), bias.double() - torch.from_numpy(shift),
                               rtol=1e-5, atol=1e-6)


def test_separate_projection_attention_stays_float_with_a_reason():
    model = nn.Sequential()
    model.add_module("attention", nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    model.add_module("fc", nn.Linear(8, 8))
    assert [name for name, _ in compressible_layers(model)] == ["attention.out_proj", "fc"]
    _, report = cbdnet.compress(model, progress=False)
    row = next(r for r in report.float_layers if r["name"] == "attention")
    assert "separate q/k/v" in row["reason"] and row["tensors"] == ["in_proj_bias", "k_proj_weight",
                                                                    "q_proj_weight", "v_proj_weight"]


def test_grouped_output_error_and_mean_shift_match_the_per_group_loop():
    generator = torch.Generator().manual_seed(0)
    groups, rows, d = 5, 3, 4
    hessian = torch.randn(groups, d, d, dtype=torch.float64, generator=generator)
    hessian = hessian @ hessian.transpose(1, 2)
    stats = LayerStats(hessian, torch.randn(groups, d, dtype=torch.float64, generator=generator),
                       torch.ones(groups * rows, dtype=torch.float64))
    delta = np.random.default_rng(0).normal(size=(groups * rows, d))
    blocks = [slice(g * rows, (g + 1) * rows) for g in range(groups)]
    np.testing.assert_allclose(output_error(delta, stats), np.concatenate(
        [((delta[b] @ hessian[g].numpy()) * delta[b]).sum(1) for g, b in enumerate(blocks)]))
    np.testing.assert_allclose(_mean_shift(delta, stats), np.concatenate(
        [delta[b] @ stats.mean[g].numpy() for g, b in enumerate(blocks)]))


def test_grouped_and_transposed_convolutions_compress_calibrated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1, groups=32),
                          nn.Conv2d(32, 64, 1, groups=4), nn.ConvTranspose2d(64, 16, 2, stride=2),
                          nn.Flatten(), nn.Linear(16 * 8 * 8, 4)).eval()
    x, y = _data(8)
    layers = compressible_layers(model)
    stats = collect_stats(model, layers, [(x, y)])
    assert stats["1"].groups == 32 and stats["2"].groups == 4 and "3" not in stats  # transposed: by weight error
    compressed, report = cbdnet.compress(model, FEW, calibration=[(x, y)],
                                         calibration_config=CalibrationConfig(bias_correction=True), progress=False)
    assert [layer.kind for layer in report.layers] == ["conv", "conv", "conv", "conv_transpose", "linear"]
    assert report.float_layers == []


def test_refit_takes_grouped_convolutions():
    from cbdnet.calib.refit import _Captures, _moments, _output_error, _target

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1, groups=64),
                          nn.ReLU(), nn.Conv2d(64, 128, 1, groups=4), nn.Flatten(), nn.Linear(128 * 4 * 4, 4)).eval()
    x, y = _data(8)
    float_model = copy.deepcopy(model)
    compressed, report = cbdnet.compress(model, FEW, calibration=[(x, y)], progress=False)
    assert report.extra["calibration"]["refit"]["layers"] == 4  # every layer, the grouped ones included
    data = as_calibration_set([(x, y)])
    captures = _Captures(compressed, float_model, data)
    hessian, cross = _moments(compressed, "2", captures, torch.Generator().manual_seed(0))
    assert hessian.shape == cross.shape == (64, 9, 9)
    weight = float_model[2].weight.detach().double().reshape(64, 1, 9)
    levels, steps = compressed[2].code.levels()
    steps = np.broadcast_to(np.asarray(steps, np.float64).reshape(-1), (64,))
    per_group = sum(_output_error(levels[g:g + 1], steps[g:g + 1], weight[g:g + 1], hessian[g:g + 1], cross[g:g + 1])
                    for g in range(64))
    assert _output_error(levels, steps, weight, hessian, cross) == pytest.approx(per_group)
    target = _target(weight, hessian, cross)
    for g in range(0, 64, 7):  # each group solved on its own
        torch.testing.assert_close(target[g:g + 1], _target(weight[g:g + 1], hessian[g:g + 1], cross[g:g + 1]))
