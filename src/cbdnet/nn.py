"""Drop-in modules that carry a layer's stored code and run with its decoded weight.

:class:`CBDConv2d` and :class:`CBDLinear` subclass ``nn.Conv2d`` / ``nn.Linear``: the forward pass is the
parent's, on a frozen dense weight decoded once from the code, so a compressed model runs at the speed of
the float model. The code (:class:`cbdnet.codec.LayerCode`) is what :func:`cbdnet.save` writes.
"""

from __future__ import annotations

import torch
from torch import nn

from .codec import LayerCode

__all__ = ["CBDConv2d", "CBDLinear", "CBDModule", "from_module", "COMPRESSIBLE"]

COMPRESSIBLE = (nn.Conv2d, nn.Linear)


class CBDModule:
    """Mixin: a module whose weight is the decoding of ``self.code``."""

    code: LayerCode
    weight: nn.Parameter

    def _set_code(self, code: LayerCode, dtype: torch.dtype, device: torch.device) -> None:
        if tuple(code.shape) != tuple(self.weight.shape):
            raise ValueError(f"code of shape {tuple(code.shape)} does not fit weight {tuple(self.weight.shape)}")
        self.code = code
        decoded = torch.from_numpy(code.decode()).to(device=device, dtype=dtype)
        self.weight = nn.Parameter(decoded, requires_grad=False)


class CBDConv2d(CBDModule, nn.Conv2d):
    """``nn.Conv2d`` whose weight is decoded from a composite binary code."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, code: LayerCode) -> CBDConv2d:
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                     padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                     bias=conv.bias is not None, padding_mode=conv.padding_mode,
                     device="meta")
        module.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(),
                                                                  requires_grad=conv.bias.requires_grad)
        module.weight = nn.Parameter(torch.empty_like(conv.weight, device="cpu"), requires_grad=False)
        module._set_code(code, conv.weight.dtype, conv.weight.device)
        module.train(conv.training)
        return module


class CBDLinear(CBDModule, nn.Linear):
    """``nn.Linear`` whose weight is decoded from a composite binary code."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, code: LayerCode) -> CBDLinear:
        module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        module.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(),
                                                                    requires_grad=linear.bias.requires_grad)
        module.weight = nn.Parameter(torch.empty_like(linear.weight, device="cpu"), requires_grad=False)
        module._set_code(code, linear.weight.dtype, linear.weight.device)
        module.train(linear.training)
        return module


def from_module(module: nn.Module, code: LayerCode) -> nn.Module:
    """The CBD twin of a Conv2d or Linear module, carrying ``code``."""
    if isinstance(module, nn.Conv2d):
        return CBDConv2d.from_conv(module, code)
    if isinstance(module, nn.Linear):
        return CBDLinear.from_linear(module, code)
    raise TypeError(f"cannot compress a {type(module).__name__}")
