"""Small networks and data shared by the re-rounding tests (learned rounding, refit)."""

from __future__ import annotations

import torch
from torch import nn

from cbdnet.zoo.data import ClassificationData
from cbdnet.zoo.models import CifarResNet


def resnet8() -> nn.Module:
    """A 3-block CIFAR ResNet (ResNet-8) with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = CifarResNet(1, num_classes=4)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def toy_data(n: int = 96, seed: int = 0) -> ClassificationData:
    """``n`` random 8x8 images with 4 random classes."""
    g = torch.Generator().manual_seed(seed)
    return ClassificationData(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g), "toy")
