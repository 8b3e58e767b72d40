"""Reduced twins of torchvision's classification builders, for tests that must run every one of them on a
2-core machine: the same model classes and block types (grouped and depthwise convs, squeeze-excitation,
channels-last MLPs, multi-head attention, shifted windows, ...), with a few channels and one block per stage,
10 classes and small images.

- Transformers and ConvNeXt are built from their torchvision classes with small settings.
- Every other builder is built on the ``meta`` device (no memory, even for regnet_y_128gf) and its Conv2d,
  BatchNorm2d and Linear modules are replaced by ones with every channel count divided by ``k`` (input images
  keep 3 channels, the classifier its 10 classes); the first ``k`` whose model runs a forward pass is used.
"""

from __future__ import annotations

import math
from functools import cache, partial

import torch
from torch import nn

CLASSES = 10
SIZE = 64  # image side for the reduced models (Inception v3 needs 80)
# enough weights that the file's fixed costs (header, per-layer entries, float tensors) leave room for 3 bits/weight
MIN_PARAMS = 150_000
PARAMS_PER_LAYER = 1_250  # each layer's header entry and per-channel steps (EfficientNet-B5 has ~190 layers)


def classification_builders() -> list[str]:
    """Every torchvision classification builder name (what ``--arch torchvision:NAME`` accepts, segmentation
    models aside)."""
    from torchvision import models as tv

    return sorted(tv.list_models(module=tv))


def image_size(name: str) -> int:
    return 80 if name == "inception_v3" else SIZE


def _shrunk(count: int, k: int, keep: bool = False) -> int:
    return count if keep else max(1, count // k)


def _narrow(module: nn.Module, k: int, classifier: bool) -> nn.Module | None:
    """``module`` with its channel counts divided by ``k`` (a classifier keeps its classes, images 3 channels)."""
    if isinstance(module, nn.Conv2d):
        cin, cout = _shrunk(module.in_channels, k, module.in_channels == 3), _shrunk(module.out_channels, k, classifier)
        if module.groups == module.in_channels and module.groups > 1:
            groups = cin
        else:
            groups = math.gcd(math.gcd(cin, cout), max(1, module.groups // k))
        return nn.Conv2d(cin, cout, module.kernel_size, module.stride, module.padding, module.dilation, groups,
                         module.bias is not None, module.padding_mode)
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(_shrunk(module.num_features, k), module.eps, module.momentum, module.affine,
                              module.track_running_stats)
    if isinstance(module, nn.Linear):
        return nn.Linear(_shrunk(module.in_features, k), _shrunk(module.out_features, k, classifier),
                         module.bias is not None)
    return None


def _meta_build(name: str, classes: int) -> nn.Module:
    from torchvision import models as tv

    options = {"weights": None, "num_classes": classes}
    if name in ("googlenet", "inception_v3"):
        options["init_weights"] = False  # their own init uses scipy's truncnorm on every weight: slow
    with torch.device("meta"):
        return tv.get_model_builder(name)(**options)


@cache
def _classifiers(name: str) -> frozenset[str]:
    """The modules whose shapes follow the number of classes (found by building with one class more)."""
    shapes = {key: value.shape for key, value in _meta_build(name, CLASSES + 1).state_dict().items()}
    return frozenset(key.rpartition(".")[0] for key, value in _meta_build(name, CLASSES).state_dict().items()
                     if shapes[key] != value.shape)


def _narrowed(name: str, k: int) -> nn.Module:
    model = _meta_build(name, CLASSES)
    classifiers = _classifiers(name)
    names = {id(module): module_name for module_name, module in model.named_modules()}
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            replacement = _narrow(child, k, names[id(child)] in classifiers)
            if replacement is not None:
                setattr(parent, child_name, replacement)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        raise ValueError(f"{name}: tensors outside Conv2d/BatchNorm2d/Linear")
    return model


def _transformer(name: str) -> nn.Module | None:
    from torchvision import models as tv
    from torchvision.models import convnext, regnet, swin_transformer

    if name.startswith("vit_"):
        return tv.VisionTransformer(image_size=SIZE, patch_size=16, num_layers=2, num_heads=2, hidden_dim=64,
                                    mlp_dim=128, num_classes=CLASSES)
    if name.startswith("swin_"):
        v2 = name.startswith("swin_v2")
        extra = {"block": swin_transformer.SwinTransformerBlockV2,
                 "downsample_layer": swin_transformer.PatchMergingV2} if v2 else {}
        return tv.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
                                  window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=CLASSES, **extra)
    if name == "maxvit_t":
        return tv.MaxVit(input_size=(SIZE, SIZE), stem_channels=16, partition_size=2, block_channels=[24, 48],
                         block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=CLASSES)
    if name.startswith("shufflenet_"):  # its channel split needs even widths
        return tv.ShuffleNetV2([1, 1, 1], [16, 32, 64, 128, 256], num_classes=CLASSES)
    if name.startswith("regnet_"):  # its builders compute the stage widths with torch: not on the meta device
        params = regnet.BlockParams.from_init_params(depth=6, w_0=48, w_a=24.0, w_m=2.0, group_width=8,
                                                     se_ratio=0.25 if name.startswith("regnet_y") else None)
        return tv.RegNet(params, num_classes=CLASSES, stem_width=8)
    if name.startswith("convnext_"):
        config = partial(convnext.CNBlockConfig, num_layers=1)
        return tv.ConvNeXt([config(16, 32), config(32, 64), config(64, None)], num_classes=CLASSES)
    return None


def reduced(name: str) -> nn.Module:
    """The reduced twin of torchvision builder ``name`` (eval mode, seeded random weights)."""
    torch.manual_seed(0)
    model = _transformer(name)
    if model is not None:
        return model.eval()
    size = image_size(name)
    for k in (16, 8, 4, 2):
        try:
            model = _narrowed(name, k).eval()
            with torch.no_grad():
                model(torch.zeros(1, 3, size, size))
        except (RuntimeError, ValueError):
            continue
        layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
        if sum(p.numel() for p in model.parameters()) >= max(MIN_PARAMS, PARAMS_PER_LAYER * layers):
            return model
    raise ValueError(f"no reduced twin of {name} runs")
