"""Every torchvision classification builder (``--arch torchvision:NAME``) through the calibrated budget at
3.0 bits/weight: statistics, the budget, bias correction, the file and its reload, on the reduced twin of each
(``tv_small``: the same classes and block types, a few channels, 64-pixel images).

The cheap test uses few candidate codes and no GPTQ, and checks a twin that several builders share once, so
that all of them fit in ``make test`` (four of them, ``FAST``, in ``make test-fast``); the gated one
(``CBDNET_SLOW=1``) runs the default budget with GPTQ and refit on each, and the real ConvNeXt-T and ViT-B/16
through the command line.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from tv_small import classification_builders, image_size, reduced

import cbdnet
from cbdnet.calib.configs import BudgetConfig, CalibrationConfig
from cbdnet.format import encode_file
from cbdnet.nn import CBDModule
from cbdnet.nn.walk import compressible_layers

NAMES = classification_builders()
slow = pytest.mark.skipif(not os.environ.get("CBDNET_SLOW"), reason="slow: set CBDNET_SLOW=1")
CHEAP = BudgetConfig(target_bits=3.0, rtn_bits=(2, 3, 4), composite_planes=(), levels=(), weighted_levels=(2,))


def _images(name: str, count: int = 4) -> torch.Tensor:
    size = image_size(name)
    return torch.rand(count, 3, size, size, generator=torch.Generator().manual_seed(1))


_DONE: dict[tuple, str] = {}  # a reduced twin already checked (several builders share one) -> the builder


def _signature(model: torch.nn.Module, config: BudgetConfig) -> tuple:
    return (type(model).__name__, repr(config), tuple((k, tuple(v.shape)) for k, v in model.state_dict().items()))


def _check(name: str, config: BudgetConfig, settings: CalibrationConfig, tmp_path) -> None:
    model = reduced(name)
    signature = _signature(model, config)
    if signature in _DONE:  # e.g. convnext_tiny/small/base/large: one twin, checked once
        return
    skeleton = copy.deepcopy(model)
    weights = sum(p.numel() for p in model.parameters() if p.ndim >= 2)  # biases and norms' affine aside
    expected = {name for name, _ in compressible_layers(model)}
    images = _images(name)
    model, report = cbdnet.compress(model, config, calibration=[images], calibration_config=settings,
                                     progress=False)
    data = encode_file(model)
    assert 8 * len(data) / report.params <= 3.0  # the whole file
    assert report.params >= 0.99 * weights  # coded: all but class tokens and position tables
    assert {layer.name for layer in report.layers} == expected
    path = tmp_path / f"{name}.cbd"
    path.write_bytes(data)
    loaded = cbdnet.load(path, skeleton)
    assert sum(isinstance(m, CBDModule) for m in loaded.modules()) == len(expected)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), model.eval()(images), rtol=1e-4, atol=1e-5)
    _DONE[signature] = name


# The fast set checks one builder of each kind below (plain convolutions, residual blocks with BatchNorm, depthwise
# convolutions with channels-last Linear and LayerNorm, packed attention); the other twins take 5-20 s of CPU each
# and run in `make test`.
FAST = {"alexnet", "resnet18", "convnext_tiny", "vit_b_16"}


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_every_builder_compresses_at_3_bits(name, tmp_path):
    _check(name, CHEAP, CalibrationConfig(gptq=False), tmp_path)


def test_every_builder_is_covered():
    """A builder a newer torchvision adds gets a reduced twin or fails here, not silently."""
    assert len(NAMES) >= 70 and {"vit_b_16", "convnext_tiny", "swin_v2_t", "maxvit_t", "regnet_y_128gf"} <= set(NAMES)
    assert set(NAMES) >= FAST  # the fast set's builders still exist
    kinds = {type(m).__name__ for name in ("vit_b_16", "maxvit_t") for m in reduced(name).modules()}
    assert "MultiheadAttention" in kinds


@slow
@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_every_builder_default_budget_with_gptq(name, tmp_path):
    _check(name, BudgetConfig(target_bits=3.0), CalibrationConfig(), tmp_path)


@slow
@pytest.mark.slow
@pytest.mark.parametrize("arch", ["convnext_tiny", "vit_b_16"])
def test_full_size_cli(arch, tmp_path):
    from PIL import Image

    from cbdnet.cli import main

    generator = torch.Generator().manual_seed(0)
    for index in range(8):
        folder = tmp_path / "calib" / f"c{index % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = torch.randint(0, 256, (256, 256, 3), generator=generator, dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"{index}.png")
    out, report = tmp_path / "m.cbd", tmp_path / "m.json"
    assert main(["compress", "--arch", f"torchvision:{arch}", "--weights", "random", "--target-bits", "3.0",
                 "--calib", f"imagefolder:{tmp_path / 'calib'}", "--no-gptq", "-o", str(out), "--json", str(report),
                 "--quiet"]) == 0
    result = json.loads(report.read_text())
    assert result["file_bits_per_weight"] <= 3.0
    total = result["params"] + sum(row["params"] for row in result["float_layers"])
    assert result["params"] >= 0.99 * total
