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
from cbdnet.calib.batches import as_calibration_set
from cbdnet.calib.refit import block_of, refit_levels
from cbdnet.zoo.models import CifarResNet


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


def _vgg_like() -> nn.Module:
    """Convolutions as items of one plain Sequential (VGG's layout): each is its own block, chained."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(inplace=True), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 16, 1), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(16 * 4 * 4, 4)).eval()


def _resnet14() -> nn.Module:
    """A CIFAR ResNet with two blocks per stage: a stage's second block is reached by the chain."""
    torch.manual_seed(0)
    return CifarResNet(2, num_classes=4).eval()


def _refitted(monkeypatch, blocks: bool, cap: int | None = None, net=resnet8) -> tuple[dict, dict]:
    """The levels after refit, and how often a batch ran from kept arguments: its block alone, or the chain."""
    float_model = net()
    settings = cbdnet.CalibrationConfig(bias_correction=False, refit=False)
    model, _ = cbdnet.compress(copy.deepcopy(float_model), cbdnet.RTNConfig(bits=3, calibration=settings),
                               toy_data(), progress=False, fold_bn=False)
    runs = {"block": 0, "chain": 0}
    for kind, function in (("block", "_call_copied"), ("chain", "_run_items")):
        real = getattr(refit_module, function)
        monkeypatch.setattr(refit_module, function, lambda *a, _real=real, _kind=kind: runs.__setitem__(
            _kind, runs[_kind] + 1) or _real(*a))
    if not blocks:
        monkeypatch.setattr(refit_module, "block_of", lambda _model, name: name)
    if cap is not None:
        monkeypatch.setattr(refit_module, "MAX_BLOCK_CACHE_BYTES", cap)
    result = refit_levels(model, float_model, list(_codes(model)), toy_data(n=160))
    assert result.layers_changed
    return {name: code.levels()[0].copy() for name, code in _codes(model).items()}, runs


@pytest.mark.parametrize("cap", [None, 1])  # kept arguments, or (cap of one byte) the whole pass per layer
def test_block_captures_give_the_levels_of_whole_forward_passes(monkeypatch, cap):
    with monkeypatch.context() as patched:
        whole, whole_runs = _refitted(patched, blocks=False, net=_resnet14)
    with monkeypatch.context() as patched:
        blocked, runs = _refitted(patched, blocks=True, cap=cap, net=_resnet14)
    assert whole_runs == {"block": 0, "chain": 0}
    if cap is None:  # both kinds ran: a block's later layers, the next block of a stage
        assert runs["block"] > 0 and runs["chain"] > 0
    else:
        assert runs == {"block": 0, "chain": 0}
    assert whole.keys() == blocked.keys()
    for name in whole:
        assert (whole[name] == blocked[name]).all(), name


@pytest.mark.parametrize("cap", [None, 150_000])  # 2 batches of 100 8x8 images: both kept, or the first only
def test_a_sequential_of_layers_is_chained_and_gives_the_levels_of_whole_passes(monkeypatch, cap):
    with monkeypatch.context() as patched:
        whole, _ = _refitted(patched, blocks=False, net=_vgg_like)
    with monkeypatch.context() as patched:
        chained, runs = _refitted(patched, blocks=True, cap=cap, net=_vgg_like)
    assert runs["chain"] > 0 and runs["block"] == 0  # every layer is its own block: only chains
    for name in whole:
        assert (whole[name] == chained[name]).all(), name


def test_kept_arguments_stay_within_the_cap_and_move_on_where_it_allows(monkeypatch):
    """4 batches of 25 64x64 images; per batch, both models' inputs of layer 0: 2.5 MB, 2: 6.6 MB, 5: 1.6 MB,
    7: 3.3 MB, 10: 4 KB, against a cap of 8.2 MB."""
    monkeypatch.setattr(refit_module, "MAX_BLOCK_CACHE_BYTES", 8_200_000)
    float_model = _vgg_like()
    model = copy.deepcopy(float_model)
    data = as_calibration_set(torch.randn(100, 3, 64, 64), float_model)
    captures = refit_module._Captures(model, float_model, data)
    where = {}
    for name in ("0", "2", "5", "7", "10"):
        for _ in captures.inputs(name):
            assert captures.held == sum(batch.bytes for batch in captures.kept) <= 8_200_000
        where[name] = [None if batch.point is None else batch.point.index for batch in captures.kept]
    assert where["0"] == where["2"] == [0, 0, 0, None]  # 2's inputs do not fit: its batches chain from 0
    assert where["5"] == [5, 5, 5, 5]
    assert where["7"] == [7, 5, 5, 5]
    assert where["10"] == [10, 10, 10, 10]


def test_a_chain_stops_at_a_sequential_that_runs_its_items_otherwise():
    class Reversed(nn.Sequential):
        def forward(self, x):
            for module in reversed(self):
                x = module(x)
            return x

    model = nn.Sequential(nn.Conv2d(3, 3, 1), Reversed(nn.Conv2d(3, 3, 1), nn.Conv2d(3, 3, 1)))
    assert refit_module._point_of(model, "0").chain
    assert not refit_module._point_of(model, "1.0").chain
    assert not refit_module._point_of(model, "1.0").reaches(refit_module._point_of(model, "1.1"))
    assert refit_module._point_of(model, "0").reaches(refit_module._point_of(model, "1"))


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
    call = refit_module._first_call(lambda: model(images), model[1])
    kept = call[0][0].clone()
    for _ in range(2):
        refit_module._inputs(lambda: refit_module._call_copied(model[1], call), model[1].conv2)
        refit_module._inputs(lambda: refit_module._run_items([model[1]], call), model[1].conv2)
    assert torch.equal(call[0][0], kept)
