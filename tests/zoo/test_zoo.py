"""The paper's architectures in the registry: definitions, torchvision state-dict compatibility, and
compress -> save -> load -> verify with outputs equal to the float model carrying the decoded weights.

Full-size compression of VGG-16 and SSD300 is left to bench/zoo.py; here they are checked for definition and
forward, and the same structures are compressed at reduced size (test-only registered builders)."""

from __future__ import annotations

import copy
import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models as tv
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD

from cbdnet import CBDConfig, compress, load, save, verify
from cbdnet.cli import main
from cbdnet.nn import COMPRESSIBLE, CBDModule
from cbdnet.nn.walk import float_state
from cbdnet.zoo.models import build, load_weights, register
from cbdnet.zoo.segnet import SegNet, SegNetBasic, _pool, _unpool

# ---------------------------------------------------------------- reduced test-only builds of the same structures


class _TinyBackbone(nn.Module):
    """Two feature maps, as SSD's VGG extractor returns them (an OrderedDict)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.extra = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, stride=2), nn.ReLU())
        self.scale_weight = nn.Parameter(torch.ones(8) * 20)  # like SSD300's L2Norm scale: stays float

    def forward(self, x):
        first = self.stem(x)
        return OrderedDict([("0", first * self.scale_weight.view(1, -1, 1, 1)), ("1", self.extra(first))])


@register("test-ssd-tiny")
def _tiny_ssd(num_classes: int = 21) -> nn.Module:
    return SSD(_TinyBackbone(), DefaultBoxGenerator([[2], [2]]), (64, 64), num_classes, score_thresh=0.0)


@register("test-vgg-small")
def _small_vgg(num_classes: int = 10) -> nn.Module:
    model = tv.VGG(tv.vgg.make_layers([8, "M", 16, "M", 16, 16, "M"]), num_classes=num_classes)
    model.classifier = nn.Sequential(nn.Linear(16 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 64),
                                     nn.ReLU(True), nn.Dropout(), nn.Linear(64, num_classes))
    return model


@register("test-densenet-small")
def _small_densenet(num_classes: int = 10) -> nn.Module:
    return tv.DenseNet(growth_rate=8, block_config=(2, 2, 2, 2), num_init_features=16, num_classes=num_classes)


@register("test-mobile-small")
def _grouped(num_classes: int = 10) -> nn.Module:
    """Grouped, depthwise and 1x1 convolutions."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1, groups=16),
                         nn.Conv2d(16, 32, 3, padding=1, groups=4), nn.Conv2d(32, 8, 1), nn.Flatten(),
                         nn.Linear(8 * 16 * 16, num_classes))


@register("test-upsample-small")
def _upsampling(num_classes: int = 3) -> nn.Module:
    """Transposed convolutions (plain, grouped with output padding, bias-free), as in FCN/U-Net decoders."""
    return nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.ConvTranspose2d(16, 8, 2, stride=2), nn.ReLU(),
                         nn.ConvTranspose2d(8, 8, 3, stride=2, padding=1, output_padding=1, groups=2, bias=False),
                         nn.Conv2d(8, num_classes, 1))


def _forward(model, x):
    with torch.no_grad():
        return model(list(x)) if isinstance(model, SSD) else model(x)


CASES = [("segnet-basic", {}, (2, 3, 45, 60)), ("segnet", {"width_mult": 0.125}, (1, 3, 36, 52)),
         ("test-densenet-small", {}, (1, 3, 32, 32)), ("test-vgg-small", {}, (2, 3, 32, 32)),
         ("test-ssd-tiny", {}, (2, 3, 64, 64)), ("test-mobile-small", {}, (2, 3, 16, 16)),
         ("test-upsample-small", {}, (2, 3, 16, 20))]


@pytest.mark.parametrize(("arch", "kwargs", "shape"), CASES, ids=[c[0] for c in CASES])
def test_compress_save_load_equals_decoded_float_model(tmp_path, arch, kwargs, shape, assert_same):
    torch.manual_seed(0)
    model = build(arch, **kwargs).eval()
    reference = copy.deepcopy(model)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, COMPRESSIBLE))
    model, report = compress(model, CBDConfig(planes=5, bottleneck=0.3), progress=False)
    assert report.params == weights  # every Conv2d (any groups, 1x1), ConvTranspose2d and Linear is coded
    path = tmp_path / f"{arch}.cbd"
    size = save(model, path)
    assert size == path.stat().st_size and not verify(path)
    for name, module in model.named_modules():
        if isinstance(module, CBDModule):
            reference.get_submodule(name).weight.data.copy_(torch.from_numpy(module.code.decode()))
    # the float tensors as the file stores them: compress rounded them to float16 where that is exact enough
    reference.load_state_dict(float_state(model), strict=False)
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    loaded = load(path)
    assert loaded.cbdnet_arch == arch
    assert_same(_forward(loaded, x), _forward(reference, x))
    kinds = {row["type"] for row in report.to_dict()["float_layers"]}
    assert kinds <= {"BatchNorm2d", "_TinyBackbone"}
    if arch == "test-ssd-tiny":  # the L2Norm-like scale parameter is listed with its reason
        row = next(r for r in report.float_layers if r["type"] == "_TinyBackbone")
        assert row["tensors"] == ["scale_weight"] and "float" in row["reason"]


def test_segnet_definitions():
    basic = SegNetBasic()
    assert sum(p.numel() for p in basic.parameters()) == 261_515  # 3x3 kernels, 64 channels, 4+4 stages
    with torch.device("meta"):
        full, vgg = SegNet(), tv.vgg16_bn(weights=None)
    convs = [m for m in full.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 26 and not any(isinstance(m, nn.ConvTranspose2d) for m in full.modules())
    encoder_convs = [m for m in full.encoders.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in encoder_convs] == [64] * 2 + [128] * 2 + [256] * 3 + [512] * 6
    assert convs[-1].out_channels == 11
    # the encoder's conv/BN weights have VGG-16-BN's shapes, in order
    vgg_shapes = [tuple(m.weight.shape) for m in vgg.features if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    ours = [tuple(m.weight.shape) for m in full.encoders.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    assert ours == vgg_shapes
    x = torch.rand(1, 3, 45, 62)  # odd sizes: unpooling restores the pre-pool size at each stage
    with torch.no_grad():
        assert basic.eval()(x).shape == (1, 11, 45, 62)
        assert SegNet(num_classes=5, width_mult=0.125).eval()(x).shape == (1, 5, 45, 62)


def test_unpooling_puts_values_back_at_the_max_positions():
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))  # odd sizes: last row/column dropped
    pooled, indices, size = _pool(x)
    up = _unpool(pooled, indices, size)
    assert up.shape == x.shape and pooled.shape == (2, 3, 2, 3)
    window_max = F.max_pool2d(up[..., :4, :6].abs() + (up[..., :4, :6] != 0) * 1e9, 2)
    assert torch.all(window_max > 1e8)  # exactly one kept value in every 2x2 window
    kept = up != 0
    assert torch.equal(up[kept], x[kept])  # kept values sit where they came from
    assert torch.equal(F.max_pool2d(x, 2), pooled)


def test_torchvision_state_dicts_load_unchanged(tmp_path):
    torch.manual_seed(1)
    arch = "resnet18"
    source = tv.resnet18(weights=None)
    path = tmp_path / "w.pth"
    torch.save(source.state_dict(), path)
    model = load_weights(build(arch), path)
    for key, value in source.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)


@pytest.mark.slow
def test_big_archs_match_torchvision_and_run():
    """Same state-dict layout as torchvision's constructors (built on the meta device: no weight init cost)."""
    references = {"vgg16": lambda: tv.vgg16(weights=None), "resnet18": lambda: tv.resnet18(weights=None),
                  "densenet121": lambda: tv.densenet121(weights=None),
                  "ssd300": lambda: tv.detection.ssd300_vgg16(weights=None, weights_backbone=None)}
    for arch, reference in references.items():
        with torch.device("meta"):
            ours, theirs = build(arch).state_dict(), reference().state_dict()
        assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
        if arch == "vgg16":
            assert ours["classifier.0.weight"].shape == (4096, 25088)
    torch.manual_seed(0)
    with torch.no_grad():
        detections = build("ssd300").eval()([torch.rand(3, 300, 300)])
    assert set(detections[0]) == {"boxes", "scores", "labels"}


def test_cli_compress_info_eval_segmentation(tmp_path):
    out, report = tmp_path / "sb.cbd", tmp_path / "sb.json"
    assert main(["compress", "--arch", "segnet-basic", "--weights", "random", "--seed", "0", "--planes", "5",
                 "--bottleneck", "0.3", "-o", str(out), "--json", str(report), "--quiet"]) == 0
    assert main(["info", str(out), "--verify", "--quiet"]) == 0
    payload = json.loads(report.read_text())
    assert payload["weights"] == "random (seed 0)" and payload["params"] == 260_480
    assert {row["type"] for row in payload["float_layers"]} == {"BatchNorm2d"}
    labels = np.random.default_rng(0).integers(0, 12, (2, 16, 24)).astype(np.uint8)
    npz = tmp_path / "cam.npz"
    np.savez(npz, test_images=np.zeros((2, 16, 24, 3), np.uint8), test_labels=labels)
    result = tmp_path / "eval.json"
    assert main(["eval", str(out), "--data", f"camvid-npz:{npz}", "--json", str(result), "--quiet"]) == 0
    scores = json.loads(result.read_text())
    assert 0.0 <= scores["miou"] <= 1.0 and scores["n"] == 2 and set(scores["iou"]) >= {"Sky", "Bicyclist"}


def test_cli_eval_detection_dispatch(tmp_path, write_voc):
    write_voc(tmp_path / "voc", {"a": [("dog", [1, 1, 30, 20], 0)], "b": [("cat", [2, 2, 20, 20], 1)]},
               size=(64, 64))
    result = tmp_path / "eval.json"
    assert main(["eval", "--arch", "test-ssd-tiny", "--weights", "random", "--data", f"voc:{tmp_path / 'voc'}",
                 "--json", str(result), "--quiet"]) == 0
    scores = json.loads(result.read_text())
    assert 0.0 <= scores["map50"] <= 1.0 and scores["ap"]["cat"] is None and scores["n"] == 2
    assert "top1" not in scores


def test_cli_num_classes_is_recorded_in_the_file(tmp_path):
    out = tmp_path / "n5.cbd"
    assert main(["compress", "--arch", "segnet-basic", "--num-classes", "5", "--weights", "random", "-o", str(out),
                 "--quiet"]) == 0
    assert load(out).classifier.out_channels == 5
    register("test-headless")(lambda: nn.Sequential(nn.Conv2d(3, 4, 3)))
    assert main(["compress", "--arch", "test-headless", "--num-classes", "3", "--quiet"]) == 2  # one-line error


def test_transposed_conv_is_coded_and_other_convs_are_listed_as_float():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ConvTranspose2d(8, 4, 2, stride=2),
                          nn.Flatten(2), nn.Conv1d(4, 4, 3), nn.ConvTranspose1d(4, 4, 2))
    compressed, report = compress(model, progress=False, input_shape=(1, 3, 10, 10))
    assert [(layer.name, layer.kind) for layer in report.layers] == [("0", "conv"), ("2", "conv_transpose")]
    assert type(compressed[2]).__name__ == "CBDConvTranspose2d"
    assert report.layers[1].output_positions == 8 * 8  # its input positions: each meets the whole weight once
    assert report.layers[1].dense_macs == 8 * 4 * 2 * 2 * 8 * 8
    rows = {row["name"]: row for row in report.to_dict()["float_layers"]}
    assert set(rows) == {"1", "4", "5"} and "1-D/3-D" in rows["4"]["reason"] and "transposed" in rows["5"]["reason"]
    _, skipped = compress(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(2, 2)), skip=["1"], progress=False)
    assert skipped.float_layers[0]["name"] == "1" and "skipped" in skipped.float_layers[0]["reason"]


def test_input_spec_knows_the_registered_architectures_and_refuses_others():
    from cbdnet.errors import CBDError
    from cbdnet.zoo import input_spec

    assert input_spec("cifar-resnet20").shape == (1, 3, 32, 32)
    digits = input_spec("digits-cnn")
    assert (digits.shape, digits.mean, digits.std) == ((1, 1, 8, 8), (0.0,), (1.0,))
    assert input_spec("segnet-basic").task == "segmentation" and input_spec("segnet").shape == (1, 3, 180, 240)
    assert input_spec("torchvision:resnet50").shape == (1, 3, 224, 224)
    assert input_spec("mine.py:Net", (2, 3, 16, 16)).shape == (2, 3, 16, 16)  # an explicit shape for any name
    with pytest.raises(CBDError, match="--input-shape"):
        input_spec("mine.py:Net")
