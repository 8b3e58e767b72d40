"""SegNet (Badrinarayanan, Kendall and Cipolla, TPAMI 2017) and its small SegNet-Basic variant.

Both are encoder-decoder networks whose decoders upsample with the *indices* of the encoder's max-pooling
(``max_unpool2d``) instead of learned transposed convolutions, so every weight layer is a plain ``Conv2d``.

- :class:`SegNet`: the VGG-16-BN encoder (13 3x3 convs in 5 stages of 2, 2, 3, 3, 3) and a mirrored decoder
  (13 convs; the last one maps to the class scores).
- :class:`SegNetBasic`: 4 encoder and 4 decoder stages of one conv each, 64 channels, batch norm; as in the paper
  the decoder convs have no ReLU and a final 1x1 conv gives the class scores. The paper used 7x7 kernels; the
  default here is 3x3 (``kernel_size`` picks).

Odd feature-map sizes (e.g. 180x240 -> 45x60 -> 22x30) are handled by unpooling to the pre-pool size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SegNet", "SegNetBasic", "VGG16_STAGES"]

# (channels, convs) of the five VGG-16 stages
VGG16_STAGES: tuple[tuple[int, int], ...] = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


def _conv_bn(in_ch: int, out_ch: int, kernel_size: int = 3, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),
                               nn.BatchNorm2d(out_ch)]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


def _pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    pooled, indices = F.max_pool2d(x, 2, 2, return_indices=True)
    return pooled, indices, x.shape[-2:]


def _unpool(x: torch.Tensor, indices: torch.Tensor, size: torch.Size) -> torch.Tensor:
    if torch.jit.is_tracing():  # the ONNX exporter's trace: sizes are traced tensors that F.max_unpool2d's
        size = torch.Size(int(s) for s in size)  # Python checks cannot test; the export's H, W are fixed anyway
    return F.max_unpool2d(x, indices, (2, 2), (2, 2), output_size=size)


def _encode_decode(encoders: nn.ModuleList, decoders: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    """Each encoder stage then a 2x2 max-pool; each decoder stage after unpooling with the mirrored
    stage's pooling indices (the SegNet scheme shared by both variants)."""
    stack = []
    for encoder in encoders:
        x, indices, size = _pool(encoder(x))
        stack.append((indices, size))
    for decoder in decoders:
        indices, size = stack.pop()
        x = decoder(_unpool(x, indices, size))
    return x


class SegNetBasic(nn.Module):
    """SegNet-Basic: 4 x (conv, BN, ReLU, max-pool) then 4 x (unpool, conv, BN), then a 1x1 classifier."""

    def __init__(self, num_classes: int = 11, in_channels: int = 3, width: int = 64, kernel_size: int = 3,
                 depth: int = 4) -> None:
        super().__init__()
        self.encoders = nn.ModuleList(
            nn.Sequential(*_conv_bn(in_channels if i == 0 else width, width, kernel_size)) for i in range(depth))
        self.decoders = nn.ModuleList(
            nn.Sequential(*_conv_bn(width, width, kernel_size, relu=False)) for _ in range(depth))
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(_encode_decode(self.encoders, self.decoders, x))


class SegNet(nn.Module):
    """SegNet with a VGG-16-BN encoder; ``encoders[k]`` / ``decoders[k]`` hold stage k's conv-BN-ReLU layers.

    The decoder mirrors the encoder: stage k's decoder ends with the channel count of stage k-1's encoder, and
    the last decoder conv outputs ``num_classes`` scores (no BN/ReLU after it).
    """

    def __init__(self, num_classes: int = 11, in_channels: int = 3, width_mult: float = 1.0) -> None:
        super().__init__()
        stages = [(max(1, int(round(c * width_mult))), n) for c, n in VGG16_STAGES]
        encoders, previous = [], in_channels
        for channels, convs in stages:
            layers = []
            for _ in range(convs):
                layers += _conv_bn(previous, channels)
                previous = channels
            encoders.append(nn.Sequential(*layers))
        decoders = []
        for k in reversed(range(len(stages))):
            channels, convs = stages[k]
            out_channels = stages[k - 1][0] if k > 0 else None
            layers = []
            for i in range(convs):
                last = i == convs - 1
                if last and out_channels is None:
                    layers.append(nn.Conv2d(channels, num_classes, 3, padding=1))
                else:
                    layers += _conv_bn(channels, out_channels if last and out_channels is not None else channels)
            decoders.append(nn.Sequential(*layers))
        self.encoders = nn.ModuleList(encoders)
        self.decoders = nn.ModuleList(decoders)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _encode_decode(self.encoders, self.decoders, x)
