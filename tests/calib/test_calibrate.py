"""Calibration statistics and the training-free corrections, on toy models with exact expectations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gptq_reference import gptq_reference
from torch import nn

from cbdnet.calib import stats as calibrate
from cbdnet.calib.batches import CalibrationSet
from cbdnet.calib.stats import (
    LayerStats,
    bias_correct,
    collect_stats,
    following_bn,
    gptq_levels,
    output_error,
    reestimate_bn,
)
from cbdnet.cli import main
from cbdnet.codec.grid import round_levels, rtn_steps
from cbdnet.zoo.data import ClassificationData


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


def _data(n: int = 64, seed: int = 0) -> ClassificationData:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 6, 6, generator=g) + torch.tensor([1.0, -0.5, 0.3]).view(1, 3, 1, 1)
    return ClassificationData(images, torch.randint(0, 4, (n,), generator=g), "toy")


def _model() -> ConvBN:
    torch.manual_seed(0)
    model = ConvBN()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_hessian_and_mean_are_the_input_patch_moments():
    model, data = _model(), _data()
    stats = collect_stats(model, [("conv", model.conv), ("head", model.head)], data, batch_size=16)
    cols = torch.nn.functional.unfold(data.images, 3, padding=1).transpose(1, 2).reshape(-1, 27).double()
    # float32 products summed in float64, kept in float32 (4 bytes per entry)
    assert stats["conv"].hessian.dtype == torch.float32 and stats["conv"].mean.dtype == torch.float64
    torch.testing.assert_close(stats["conv"].hessian, (cols.T @ cols / cols.shape[0]).float())
    torch.testing.assert_close(stats["conv"].mean, cols.mean(0))
    assert stats["conv"].fisher.shape == (6,) and bool((stats["conv"].fisher > 0).all())


def test_bias_correction_removes_the_mean_output_shift():
    model, data = _model(), _data()
    stats = collect_stats(model, [("conv", model.conv)], data)
    original = model.conv.weight.detach().double().numpy().copy()
    with torch.no_grad():
        float_out = model.bn(model.conv(data.images))
        steps = rtn_steps(original, 2, "tensor")  # coarse: a large error with a non-zero mean effect
        model.conv.weight.copy_(torch.from_numpy(round_levels(original, steps, 1) * steps[0]).float())
        before = (model.bn(model.conv(data.images)) - float_out).mean(dim=(0, 2, 3)).abs()
    assert following_bn(model) == {"conv": "bn"}
    assert bias_correct(model, {"conv": original}, stats) == ["conv"]
    with torch.no_grad():
        after = (model.bn(model.conv(data.images)) - float_out).mean(dim=(0, 2, 3)).abs()
    assert float(before.max()) > 1e-2
    assert float(after.max()) < 1e-4


def test_bn_reestimation_matches_the_batch_statistics():
    model, data = _model(), _data()
    assert reestimate_bn(model, data, batch_size=16) == 1
    with torch.no_grad():
        out = model.conv(data.images)
    torch.testing.assert_close(model.bn.running_mean, out.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    per_batch = [out[i:i + 16].var(dim=(0, 2, 3), unbiased=True) for i in range(0, 64, 16)]
    torch.testing.assert_close(model.bn.running_var, torch.stack(per_batch).mean(0), rtol=1e-4, atol=1e-5)
    assert not model.training and model.bn.momentum == 0.1


@pytest.mark.parametrize("mag_bits", [1, 2, 3])
def test_gptq_lowers_the_output_error_against_round_to_nearest(mag_bits):
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((40, 40))
    x = torch.from_numpy(rng.standard_normal((2000, 40)) @ mix)  # strongly correlated inputs
    hessian = (x.T @ x) / x.shape[0]
    weight = rng.standard_normal((16, 40)).astype(np.float32)
    steps = rtn_steps(weight, mag_bits + 1, "channel")
    rtn = round_levels(weight, steps, mag_bits) * steps[:, None]
    gptq = gptq_levels(weight, steps, mag_bits, hessian)
    assert np.abs(gptq).max() <= (1 << mag_bits) - 1
    entry = LayerStats(hessian, torch.zeros(40, dtype=torch.float64), torch.ones(16, dtype=torch.float64))
    error_rtn = output_error(rtn - weight, entry).sum()
    error_gptq = output_error(gptq * steps[:, None] - weight, entry).sum()
    assert error_gptq < 0.8 * error_rtn





@pytest.mark.parametrize("groups", [1, 2])
def test_stacked_gptq_gives_each_grid_the_levels_of_its_own_run(groups, monkeypatch):
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((groups, 500, 12)) @ rng.standard_normal((12, 12)))
    hessian = x.transpose(1, 2) @ x / 500
    hessian[:, 3, :] = hessian[:, :, 3] = 0.0  # a dead input
    weight = rng.standard_normal((8, 3, 2, 2)).astype(np.float32)
    grids = [(rtn_steps(weight, bits, "channel") * ratio, bits - 1) for bits in (2, 3, 5) for ratio in (1.0, 0.7)]
    expected = [np.concatenate([gptq_reference(weight[g * 8 // groups:(g + 1) * 8 // groups],
                                               steps[g * 8 // groups:(g + 1) * 8 // groups], bits, hessian[g])
                                for g in range(groups)]) for steps, bits in grids]
    h = hessian if groups > 1 else hessian[0]
    for limit in (1 << 22, 2 * 48):  # all grids in one run; two grids' rows at a time
        monkeypatch.setattr(calibrate, "MAX_STACKED_ELEMENTS", limit)
        got = calibrate.gptq_levels_stacked(weight, grids, h)
        assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert len({a.tobytes() for a in expected}) == len(grids)  # the grids do differ

def test_chunked_patches_give_the_same_moments(monkeypatch):
    model, data = _model(), _data()
    full = collect_stats(model, [("conv", model.conv)], data, batch_size=16)
    monkeypatch.setattr(calibrate, "MAX_PATCH_ELEMENTS", 27 * 36 * 3)  # three 6x6 images unfolded at a time
    chunked = collect_stats(model, [("conv", model.conv)], data, batch_size=16)
    torch.testing.assert_close(chunked["conv"].hessian, full["conv"].hessian)
    torch.testing.assert_close(chunked["conv"].mean, full["conv"].mean)
    assert chunked["conv"].samples == full["conv"].samples == 64 * 36


def test_large_images_use_a_random_subset_of_patches(monkeypatch):
    model, data = _model(), _data(n=200)
    full = collect_stats(model, [("conv", model.conv)], data, batch_size=16)
    monkeypatch.setattr(calibrate, "MAX_POSITIONS", 12)
    sampled = collect_stats(model, [("conv", model.conv)], data, batch_size=16)
    assert sampled["conv"].samples == 200 * 12
    error = (sampled["conv"].hessian - full["conv"].hessian).abs().max() / full["conv"].hessian.abs().max()
    assert 0 < error < 0.1  # a different, unbiased estimate of the same moments


def test_calibration_batch_shrinks_with_the_image_size():
    assert CalibrationSet(_data().images, _data().labels).batch_size_for(100) == 100  # 6x6: the default batch
    camvid_like = CalibrationSet(torch.zeros(4, 3, 180, 240), torch.zeros(4, dtype=torch.int64))
    assert camvid_like.batch_size_for(100) == 2
    assert CalibrationSet(torch.zeros(1, 3, 2000, 2000), torch.zeros(1, dtype=torch.int64)).batch_size_for(100) == 1


def _camvid_npz(path, n=4, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 12, (n, 32, 48)).astype(np.uint8)  # 11 = void
    images = rng.integers(0, 256, (n, 32, 48, 3)).astype(np.uint8)
    np.savez(path, train_images=images, train_labels=labels, val_images=images[:2], val_labels=labels[:2])
    return path


@pytest.mark.slow
def test_segmentation_calibration_ignores_void_and_fits_the_budget(tmp_path):
    npz = _camvid_npz(tmp_path / "cam.npz")
    report = tmp_path / "r.json"
    assert main(["compress", "--arch", "segnet-basic", "--weights", "random", "--target-bits", "4.0",
                 "--calib", f"camvid-npz:{npz}:train", "--json", str(report), "--quiet"]) == 0
    payload = json.loads(report.read_text())
    assert payload["file_bits_per_weight"] <= 4.0 and payload["calibration"]["images"] == 4
    assert np.isfinite(payload["calibration"]["loss_before"])


def test_detection_data_cannot_calibrate(tmp_path, capsys, write_voc):
    write_voc(tmp_path / "voc", {"a": [("dog", [1, 1, 30, 20], 0)]}, size=(64, 64))
    assert main(["compress", "--arch", "segnet-basic", "--weights", "random", "--target-bits", "4.0",
                 "--calib", f"voc:{tmp_path / 'voc'}", "--quiet"]) == 2
    assert "classification or segmentation" in capsys.readouterr().err


def test_camvid_default_split_is_test_and_is_refused_for_calibration(tmp_path, capsys):
    npz = tmp_path / "cam.npz"
    images = np.zeros((2, 32, 48, 3), np.uint8)
    np.savez(npz, test_images=images, test_labels=np.zeros((2, 32, 48), np.uint8))
    assert main(["compress", "--arch", "segnet-basic", "--weights", "random", "--target-bits", "4.0",
                 "--calib", f"camvid-npz:{npz}", "--quiet"]) == 2
    assert "must not use test images" in capsys.readouterr().err


@pytest.mark.parametrize("layer, shape", [
    (nn.Conv2d(3, 4, 3, padding=1), (5, 3, 9, 11)),
    (nn.Conv2d(6, 2, (3, 5), stride=(2, 1), padding=(2, 1), dilation=(1, 2)), (3, 6, 13, 10)),
    (nn.Conv2d(4, 4, 1, stride=2), (2, 4, 8, 8)),
    (nn.Linear(7, 3), (4, 5, 7)),
    (nn.Linear(7, 3), (4, 7)),
])
def test_input_patches_at_positions_are_the_unfolded_rows(layer, shape):
    """Refit unfolds only the positions it keeps: the very rows (bitwise) that unfolding everything and
    indexing gives, so its moments, and the files, do not change."""
    from cbdnet.calib.stats import input_patches, input_patches_at, input_positions

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    every = input_patches(layer, x)
    per_image = input_positions(layer, x)
    assert per_image * shape[0] == every.shape[0]
    positions = torch.stack([torch.randperm(per_image, generator=generator)[:max(1, per_image // 2)]
                             for _ in range(shape[0])])
    rows = torch.cat([i * per_image + positions[i] for i in range(shape[0])])
    assert torch.equal(input_patches_at(layer, x, positions), every[rows])


def test_statistics_thin_large_images_to_the_same_rows_as_unfolding_everything():
    """Past MAX_POSITIONS output positions per image, the statistics gather only the seeded random subset:
    the rows that unfolding every position and indexing with the same draws gives."""
    layer = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(3, 2, 72, 72, generator=torch.Generator().manual_seed(1))  # 5,184 positions per image
    per_image = 72 * 72
    got = torch.cat(list(calibrate._patch_chunks(layer, x, per_image, torch.Generator().manual_seed(0))))
    draws = torch.Generator().manual_seed(0)
    keep = torch.cat([i * per_image + torch.randperm(per_image, generator=draws)[:calibrate.MAX_POSITIONS]
                      for i in range(3)])
    assert torch.equal(got, calibrate.input_patches(layer, x)[keep])
