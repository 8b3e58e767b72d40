"""Drop-in modules that carry a layer's stored code and run with its decoded weight.

:class:`CBDConv2d`, :class:`CBDConvTranspose2d` and :class:`CBDLinear` subclass ``nn.Conv2d`` /
``nn.ConvTranspose2d`` / ``nn.Linear``: the forward pass is the parent's, on a frozen dense weight decoded once
from the code, so a compressed model runs at the speed of the float model. The code
(:class:`cbdnet.codec.LayerCode`) is what :func:`cbdnet.save` writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Self

import torch
from torch import nn

from ..codec import LayerCode

__all__ = ["CBDConv2d", "CBDConvTranspose2d", "CBDLinear", "CBDLayer", "CBDMultiheadAttention", "CBDModule",
           "from_module", "COMPRESSIBLE", "is_compressible", "coded_weight", "coded_key", "packed_attention"]

COMPRESSIBLE = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def packed_attention(module: nn.Module) -> bool:
    """An ``nn.MultiheadAttention`` whose query/key/value projections are one packed ``in_proj_weight``
    ``[3 * embed_dim, embed_dim]`` (the usual case; separate ``q/k/v_proj_weight`` stay float)."""
    return isinstance(module, nn.MultiheadAttention) and getattr(module, "in_proj_weight", None) is not None


def is_compressible(module: nn.Module) -> bool:
    """Whether cbdnet codes a weight of ``module``: a Conv2d, ConvTranspose2d or Linear (its ``weight``), or a
    packed multi-head attention (its ``in_proj_weight``; its ``out_proj`` is a Linear of its own)."""
    return isinstance(module, COMPRESSIBLE) or packed_attention(module)


def coded_weight(module: nn.Module) -> torch.Tensor:
    """The Parameter of ``module`` that cbdnet codes (``weight``, or an attention's ``in_proj_weight``)."""
    weight = module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight
    assert isinstance(weight, torch.Tensor), f"a {type(module).__name__} without a weight"
    return weight


def coded_key(name: str, module: object) -> str:
    """The state-dict key of the coded Parameter of the module called ``name``."""
    leaf = "in_proj_weight" if isinstance(module, nn.MultiheadAttention) else "weight"
    return f"{name}.{leaf}" if name else leaf


class CBDModule:
    """Mixin: a module whose weight is the decoding of ``self.code`` (a :class:`cbdnet.codec.LayerCode`).

    The code is plain Python data beside the module's tensors: TorchScript ignores it, so
    ``torch.jit.script`` compiles a loaded model like the float one. A module may also hold no code in memory
    but a ``code_source`` (a callable that rebuilds it, e.g. by re-reading the ``.cbd`` file it was loaded
    from, see :meth:`release_code`): then ``.code`` is rebuilt on each access."""

    __jit_unused_properties__ = ["code"]
    coded_name = "weight"  # the Parameter the code decodes to

    if TYPE_CHECKING:  # what the torch layer this is mixed into provides (nn.Conv2d, nn.ConvTranspose2d,
        # nn.Linear); for the type checker only, as TorchScript would read class annotations as attributes
        weight: torch.Tensor
        bias: Any  # a Tensor or None (Any: nn.Linear leaves it undeclared)
        training: bool

        def __init__(self, *args: Any, **kwargs: Any) -> None: ...
        def train(self, mode: bool = True) -> Self: ...

    @property
    def code(self) -> LayerCode | None:
        code = self.__dict__.get("_code")
        if code is None and self.__dict__.get("code_source") is not None:
            return self.__dict__["code_source"]()
        return code

    @code.setter
    def code(self, value: LayerCode) -> None:
        self.__dict__["_code"] = value
        self.__dict__.pop("code_source", None)

    def release_code(self, source: Callable[[], LayerCode]) -> None:
        """Drop the in-memory code; ``source()`` rebuilds it whenever ``.code`` is read."""
        self.__dict__.pop("_code", None)
        self.__dict__["code_source"] = source

    def set_code(self, code: LayerCode, dtype: torch.dtype | None = None, device: torch.device | None = None) -> None:
        """Carry ``code`` and run with its decoding as the (frozen) weight."""
        current = getattr(self, self.coded_name)
        dtype = current.dtype if dtype is None else dtype
        device = current.device if device is None else device
        if tuple(code.shape) != tuple(current.shape):
            raise ValueError(f"code of shape {tuple(code.shape)} does not fit weight {tuple(current.shape)}")
        self.code = code
        decoded = torch.from_numpy(code.decode()).to(device=device, dtype=dtype)
        setattr(self, self.coded_name, nn.Parameter(decoded, requires_grad=False))
        weight = getattr(self, self.coded_name)
        self._coded_weight = [weight, weight._version]  # a list: not registered as a parameter

    def share_weight(self, other: CBDModule) -> None:
        """Run with ``other``'s decoded Parameter (a tied weight: one code, one Parameter)."""
        setattr(self, self.coded_name, getattr(other, other.coded_name))

    def code_matches_weight(self) -> bool:
        """Whether the weight is still the decoding of ``self.code`` (not replaced or edited in place since)."""
        weight = getattr(self, self.coded_name)
        coded = getattr(self, "_coded_weight", None)
        if coded is not None and coded[0] is weight and coded[1] == weight._version:
            return True
        code = self.code
        assert code is not None, "a CBD module without a code"
        decoded = torch.from_numpy(code.decode()).to(weight)
        return bool(torch.equal(weight.detach(), decoded))

    @classmethod
    def _twin(cls, original: nn.Conv2d | nn.ConvTranspose2d | nn.Linear, code: LayerCode, *args, **kwargs):
        """Build on the meta device, copy the bias, then set the decoded weight (no float weight allocated). The
        original may itself be on the meta device (its bias is then filled by the caller)."""
        bias, weight = original.bias, original.weight
        assert bias is None or isinstance(bias, torch.Tensor)
        module = cls(*args, bias=bias is not None, device="meta", **kwargs)
        module.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        device = torch.device("cpu") if weight.is_meta else weight.device  # a meta skeleton
        module.set_code(code, weight.dtype, device)  # shape checked against the meta weight
        module.train(original.training)
        return module


class CBDConv2d(CBDModule, nn.Conv2d):
    """``nn.Conv2d`` whose weight is decoded from a composite binary code."""

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, code: LayerCode) -> CBDConv2d:
        return cls._twin(conv, code, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                         padding_mode=conv.padding_mode)


class CBDConvTranspose2d(CBDModule, nn.ConvTranspose2d):
    """``nn.ConvTranspose2d`` whose weight (``[in, out / groups, kh, kw]``) is decoded from a composite binary code."""

    @classmethod
    def from_conv_transpose(cls, conv: nn.ConvTranspose2d, code: LayerCode) -> CBDConvTranspose2d:
        return cls._twin(conv, code, conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                         padding=conv.padding, output_padding=conv.output_padding, groups=conv.groups,
                         dilation=conv.dilation, padding_mode=conv.padding_mode)


class CBDLinear(CBDModule, nn.Linear):
    """``nn.Linear`` whose weight is decoded from a composite binary code."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, code: LayerCode) -> CBDLinear:
        return cls._twin(linear, code, linear.in_features, linear.out_features)


class CBDMultiheadAttention(CBDModule, nn.MultiheadAttention):
    """``nn.MultiheadAttention`` whose packed ``in_proj_weight`` (``[3 * embed_dim, embed_dim]``: the query, key
    and value projections stacked) is decoded from a composite binary code. Its state dict keeps the keys of
    ``nn.MultiheadAttention``; ``out_proj`` (a Linear) is coded as a layer of its own. ``weight`` reads
    ``in_proj_weight``, so code that handles CBD modules by their ``weight`` handles this one too."""

    coded_name = "in_proj_weight"

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]  # a view of the packed Parameter, not a second one
        return self.in_proj_weight

    @classmethod
    def from_attention(cls, attention: nn.MultiheadAttention, code: LayerCode) -> CBDMultiheadAttention:
        """Build on the meta device, take the original's other tensors and ``out_proj`` (that very module: the
        walker may swap it for its own twin next), then set the decoded ``in_proj_weight``."""
        module = cls(attention.embed_dim, attention.num_heads, dropout=attention.dropout,
                     bias=attention.in_proj_bias is not None, add_bias_kv=attention.bias_k is not None,
                     add_zero_attn=attention.add_zero_attn, kdim=attention.kdim, vdim=attention.vdim,
                     batch_first=attention.batch_first, device="meta")
        for key in ("in_proj_bias", "bias_k", "bias_v"):
            value = getattr(attention, key)
            setattr(module, key, None if value is None else nn.Parameter(value.detach().clone(),
                                                                         requires_grad=value.requires_grad))
        module.out_proj = attention.out_proj
        weight = attention.in_proj_weight
        device = torch.device("cpu") if weight.is_meta else weight.device
        module.set_code(code, weight.dtype, device)
        module.train(attention.training)
        return module


CBDLayer = CBDConv2d | CBDConvTranspose2d | CBDLinear | CBDMultiheadAttention


def from_module(module: nn.Module, code: LayerCode) -> CBDLayer:
    """The CBD twin of a Conv2d, ConvTranspose2d, Linear or packed MultiheadAttention module, carrying ``code``."""
    if isinstance(module, nn.Conv2d):
        return CBDConv2d.from_conv(module, code)
    if isinstance(module, nn.ConvTranspose2d):
        return CBDConvTranspose2d.from_conv_transpose(module, code)
    if isinstance(module, nn.Linear):
        return CBDLinear.from_linear(module, code)
    if isinstance(module, nn.MultiheadAttention) and packed_attention(module):
        return CBDMultiheadAttention.from_attention(module, code)
    raise TypeError(f"cannot compress a {type(module).__name__}")
