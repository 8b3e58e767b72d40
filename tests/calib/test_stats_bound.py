"""The per-layer bound on the calibration statistics' rows (``row_bound``): how many patches per image enter a
layer's second moment, that the bounded statistics are seeded (same bytes every run) and close to the unbounded
ones, and that the Fisher still sees every position."""

from __future__ import annotations

import torch
from torch import nn

from cbdnet.calib import refit
from cbdnet.calib import stats as calibrate
from cbdnet.calib.stats import collect_stats, positions_per_image, row_bound
from cbdnet.zoo.data import ClassificationData


class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.deep = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(torch.relu(self.deep(torch.relu(self.conv(x)))).mean(dim=(2, 3)))


def _setup(n: int = 40):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, 12, 12, generator=g) + torch.tensor([1.0, -0.5, 0.3]).view(1, 3, 1, 1)
    data = ClassificationData(images, torch.randint(0, 4, (n,), generator=g), "toy")
    model = TwoConvs().eval()
    return model, [("conv", model.conv), ("deep", model.deep), ("head", model.head)], data


def test_the_bound_is_spread_evenly_over_the_images():
    assert row_bound(144) == 256 * 144 and row_bound(9) == 1 << 14  # per input dimension, at least MIN_ROWS
    assert positions_per_image(144, 1000) == 37  # ResNet-20's first 3x3 convs: 37 of 1,024 positions per image
    assert positions_per_image(576, 1000) == 148  # more than layer3's 64 positions: every one is kept
    assert positions_per_image(147, 128) == 294  # ResNet-50's stem on 128 images: 294 of 12,544
    assert positions_per_image(3, 1) == calibrate.MAX_POSITIONS  # never above the per-image cap
    assert positions_per_image(10, 10**9) == 1  # at least one row per image
    assert refit.ROWS_PER_INPUT == calibrate.ROWS_PER_INPUT and refit.MIN_ROWS == calibrate.MIN_ROWS  # one rule
    assert calibrate.STATS_ROWS_PER_INPUT == calibrate.ROWS_PER_INPUT  # the statistics use refit's bound


def test_bounded_statistics_are_seeded_unbiased_and_keep_the_whole_fisher(monkeypatch):
    model, layers, data = _setup()
    full = collect_stats(model, layers, data, batch_size=16)  # 40 images x 144 positions: under the bound
    assert full["conv"].samples == 40 * 144
    monkeypatch.setattr(calibrate, "MIN_ROWS", 1)
    monkeypatch.setattr(calibrate, "STATS_ROWS_PER_INPUT", 20)  # conv: d = 27 -> 540 rows, 14 per image
    bounded = collect_stats(model, layers, data, batch_size=16)
    again = collect_stats(model, layers, data, batch_size=16)
    assert bounded["conv"].samples == 40 * positions_per_image(27, 40) == 40 * 14
    assert bounded["deep"].samples == 40 * positions_per_image(36, 40) == 40 * 18  # per group d = 4 * 9
    assert bounded["head"].samples == full["head"].samples == 40  # one row per image: nothing to thin
    for name in ("conv", "deep"):
        assert torch.equal(bounded[name].hessian, again[name].hessian)  # the positions are seeded
        assert torch.equal(bounded[name].mean, again[name].mean)
        torch.testing.assert_close(bounded[name].fisher, full[name].fisher)  # every position's gradient
        error = (bounded[name].hessian - full[name].hessian).abs().max() / full[name].hessian.abs().max()
        assert 0 < error < 0.15, error  # another estimate of the same moments, not a biased one
        shift = (bounded[name].mean - full[name].mean).abs().max() / full[name].mean.abs().max()
        assert shift < 0.15, shift


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(6, 5)
        self.head = nn.Linear(5, 4)

    def forward(self, x):  # x [N, 3, 8, 8] as 32 tokens of 6 features each
        return self.head(self.layer(x.reshape(x.shape[0], 32, 6)).mean(1))


def test_the_bound_thins_token_rows_of_a_linear(monkeypatch):
    """A Linear over tokens ([N, T, d]: T rows per image) keeps positions_per_image(d, N) of them per image."""
    torch.manual_seed(0)
    net = Tokens().eval()
    g = torch.Generator().manual_seed(2)
    data = ClassificationData(torch.randn(10, 3, 8, 8, generator=g), torch.randint(0, 4, (10,), generator=g), "t")
    full = collect_stats(net, [("layer", net.layer)], data)
    assert full["layer"].samples == 10 * 32  # under the default bound: every token
    monkeypatch.setattr(calibrate, "MIN_ROWS", 1)
    monkeypatch.setattr(calibrate, "STATS_ROWS_PER_INPUT", 10)  # 60 rows: 6 tokens per image
    bounded = collect_stats(net, [("layer", net.layer)], data)
    assert bounded["layer"].samples == 10 * 6
    torch.testing.assert_close(bounded["layer"].fisher, full["layer"].fisher)
