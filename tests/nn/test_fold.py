"""Folding BatchNorm into per-channel steps (cbdnet.nn.fold): same outputs, smaller file, exact reload."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import cbdnet
from cbdnet.codec import GridCode
from cbdnet.format.cbdfile import read
from cbdnet.nn import CBDModule
from cbdnet.nn.fold import conv_bn_pairs, unit_variance
from cbdnet.zoo.models import build


def _trained_like(seed: int = 0) -> nn.Module:
    """A CIFAR ResNet-20 with BatchNorm statistics like a trained one's: scales of both signs, shifted means."""
    torch.manual_seed(seed)
    model = build("cifar-resnet20").eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.normal_(0.3, 0.5)  # some negative, as in the pretrained checkpoint
                module.bias.normal_(0, 0.2)
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.2, 3.0)
    return model


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_folding_keeps_the_outputs_and_shrinks_the_file(tmp_path):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plain, plain_report = cbdnet.compress(_trained_like(), cbdnet.RTNConfig(bits=4), progress=False,
                                          fold_bn=False, float32=True)
    folded, report = cbdnet.compress(_trained_like(), cbdnet.RTNConfig(bits=4), progress=False, float32=True)
    assert len(report.extra["folded_batchnorm"]) == 19  # every conv -> bn pair of ResNet-20
    reference = _outputs(plain, x)
    assert torch.allclose(_outputs(folded, x), reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max()))
    assert report.coded_weight_bits == plain_report.coded_weight_bits  # the levels did not change
    saved = cbdnet.save(folded, tmp_path / "f.cbd")
    # gamma, mean and var of 688 channels (float32 here) leave the file; a value each goes into the header
    assert saved < cbdnet.save(plain, tmp_path / "p.cbd") - 0.95 * 3 * 4 * 688
    loaded = cbdnet.load(tmp_path / "f.cbd")
    assert torch.equal(_outputs(loaded, x), _outputs(folded, x))  # the file holds exactly the folded model
    assert cbdnet.verify(tmp_path / "f.cbd") == []
    constants = [key for key, array in read(tmp_path / "f.cbd").floats.items() if np.all(array == array.flat[0])]
    assert {f"{name}.running_mean" for name in report.extra["folded_batchnorm"]} <= set(constants)


def test_negative_scales_become_negative_steps_and_positive_integer_steps():
    model, report = cbdnet.compress(_trained_like(), cbdnet.RTNConfig(bits=4), progress=False)
    codes = [m.code for m in model.modules() if isinstance(m, CBDModule) and isinstance(m.code, GridCode)]
    negative = [code for code in codes if np.any(code.scales() < 0)]
    assert negative  # the fixture's BatchNorms have negative scales
    for code in negative:
        levels, steps = code.levels()
        assert np.all(steps > 0)
        dense = levels.astype(np.float32) * steps.reshape((-1,) + (1,) * (levels.ndim - 1))
        assert np.allclose(dense, code.decode(), rtol=1e-6, atol=0)


def test_only_safe_pairs_fold():
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
            self.conv2, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

        def forward(self, x):
            y = self.conv(x)
            z = self.conv2(self.bn(y) + y)  # conv's output has a second consumer: not foldable
            return self.bn2(z)

    model = Branching().eval()
    assert conv_bn_pairs(model) == [("conv2", "bn2")]
    folded, report = cbdnet.compress(copy.deepcopy(model), cbdnet.RTNConfig(bits=4), progress=False)
    assert report.extra["folded_batchnorm"] == ["bn2"]
    _, paper = cbdnet.compress(_trained_like(), cbdnet.CBDConfig(), progress=False)  # per-tensor composite
    assert paper.extra["folded_batchnorm"] == []
    training = _trained_like().train()
    _, report = cbdnet.compress(training, cbdnet.RTNConfig(bits=4), progress=False)
    assert report.extra["folded_batchnorm"] == []  # batch statistics in training mode: nothing to fold


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 1e-1])
def test_unit_variance_makes_the_normalisation_exactly_one(eps):
    var = np.float32(unit_variance(eps))
    assert np.float32(var + np.float32(eps)) == 1.0
    norm = nn.BatchNorm1d(3, eps=eps).eval()
    with torch.no_grad():
        norm.running_var.fill_(float(var))
    x = torch.randn(5, 3)
    assert torch.equal(norm(x), x)


def test_budget_file_fits_with_folding(tmp_path):
    model, report = cbdnet.compress(_trained_like(), cbdnet.BudgetConfig(target_bits=3.0), progress=False)
    assert report.extra["folded_batchnorm"] and report.file_bits_per_weight <= 3.0
    assert cbdnet.save(model, tmp_path / "b.cbd") == report.file_bytes
