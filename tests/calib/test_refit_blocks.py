"""Refit's block captures: each layer runs only its block from the block's kept arguments, and gets the very
inputs a whole forward pass would give it (the levels, so the file's bytes, are the same)."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from small_nets import resnet8, toy_data
from torch import nn

import cbdnet
from cbdnet.calib import refit as refit_module
from cbdnet.calib.refit import block_of, refit_levels


def _codes(model) -> dict:
    return {name: m.code for name, m in model.named_modules() if getattr(m, "code", None) is not None}


@pytest.mark.parametrize(("builder", "layer", "block"), [
    ("resnet18", "layer2.0.conv1", "layer2.0"),
    ("resnet18", "layer2.0.downsample.0", "layer2.0"),  # inside a Sequential inside the block: still the block
    ("resnet18", "fc", "fc"),  # not in any Sequential: the layer itself
    ("mobilenet_v3_small", "features.4.block.1.0", "features.4"),
    ("mobilenet_v3_small", "features.0.0", "features.0.0"),  # features.0 is itself a Sequential
    ("vgg11", "features.3", "features.3"),
    ("convnext_tiny", "features.3.1.block.3", "features.3.1"),  # stage (a Sequential) -> its CNBlock
])
def test_block_of_a_layer_is_its_shallowest_non_sequential_item_of_a_sequential(builder, layer, block):
    model = getattr(torchvision.models, builder)()
    assert block_of(model, layer) == block


def _refitted(monkeypatch, blocks: bool, cap: int | None = None) -> tuple[dict, int]:
    float_model = resnet8()
    settings = cbdnet.CalibrationConfig(bias_correction=False, refit=False)
    model, _ = cbdnet.compress(copy.deepcopy(float_model), cbdnet.RTNConfig(bits=3, calibration=settings),
                               toy_data(), progress=False, fold_bn=False)
    calls = []
    real = refit_module._block_call
    monkeypatch.setattr(refit_module, "_block_call", lambda *a: calls.append(1) or real(*a))
    if not blocks:
        monkeypatch.setattr(refit_module, "block_of", lambda _model, name: name)
    if cap is not None:
        monkeypatch.setattr(refit_module, "MAX_BLOCK_CACHE_BYTES", cap)
    result = refit_levels(model, float_model, list(_codes(model)), toy_data(n=160))
    assert result.layers_changed
    return {name: code.levels()[0].copy() for name, code in _codes(model).items()}, len(calls)


@pytest.mark.parametrize("cap", [None, 1])  # kept arguments, or (cap of one byte) recaptured per layer
def test_block_captures_give_the_levels_of_whole_forward_passes(monkeypatch, cap):
    with monkeypatch.context() as patched:
        whole, none = _refitted(patched, blocks=False)
    with monkeypatch.context() as patched:
        blocked, captured = _refitted(patched, blocks=True, cap=cap)
    assert none == 0 and captured > 0  # the block path ran (two models per captured batch)
    assert whole.keys() == blocked.keys()
    for name in whole:
        assert (whole[name] == blocked[name]).all(), name


def test_a_block_that_changes_its_argument_in_place_is_run_on_a_copy():
    """An in-place activation first in the block would otherwise change the kept argument for the next
    layer of the block."""

    class InPlaceFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.conv2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            x.sub_(1.0)
            return self.conv2(self.conv1(x))

    model = nn.Sequential(nn.Conv2d(3, 4, 1), InPlaceFirst()).eval()
    images = torch.randn(2, 3, 4, 4)
    call = refit_module._block_call(model, model[1], images)
    kept = call[0][0].clone()
    for _ in range(2):
        refit_module._inputs(lambda: refit_module._call_copied(model[1], call), model[1].conv2)
    assert torch.equal(call[0][0], kept)
