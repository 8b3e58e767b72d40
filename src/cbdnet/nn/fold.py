"""Fold a BatchNorm into the per-channel steps of the coded layer before it.

In inference a BatchNorm after a layer with output ``y`` computes ``s * (y - mu) + beta`` with the per-channel
scale ``s = gamma / sqrt(var + eps)``. Where the layer's code has one step per output channel
(``w = q * step_c``: RTN per channel, the per-channel composite grids, the ``--target-bits`` codes), the scale
moves into the steps, ``step_c <- step_c * s_c``, and the BatchNorm keeps only its shift: ``beta' = beta +
s * (b - mu)`` (``b``: the layer's bias, then set to zero), with unit scale, zero mean and a variance ``v``
such that ``v + eps`` is 1. Those three are constant tensors, which the file stores as one value each, so a
folded BatchNorm costs its ``beta'`` alone. The model stays the same architecture (int8 and ONNX runtimes fuse
the BatchNorm as before); the levels, and so the coded size, do not change; outputs change only by float32
rounding of the products.

A pair is folded only where it is safe: the BatchNorm (1d/2d, affine, with running statistics, in eval mode)
is the only consumer of the layer's output in the traced graph, each is called once, the layer's weight is not
tied to another layer, its code is a grid with one step per output channel, and every ``s_c`` is finite and
non-zero. A negative ``s_c`` makes a negative step (:meth:`cbdnet.codec.GridCode.levels` hands the integer
runtimes the channel's levels negated and a positive step).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from torch import fx, nn

from ..codec import GridCode
from .modules import COMPRESSIBLE, CBDModule

__all__ = ["fold_batchnorm", "conv_bn_pairs", "foldable_norms", "unit_variance", "replace_steps"]

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


class _LeafTracer(fx.Tracer):
    """Keeps coded layers and BatchNorms as single graph nodes."""

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, (*COMPRESSIBLE, *_NORMS)) or super().is_leaf_module(module, qualified_name)


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer, batchnorm)`` names where the BatchNorm is the only consumer of a Conv2d/Linear's output (each
    called once; coded or not yet). Empty where the model cannot be traced symbolically (data-dependent control
    flow)."""
    try:
        graph = _LeafTracer().trace(model)
    except Exception:  # any tracing failure: fold nothing rather than guess the graph
        return []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(model.get_submodule(node.target), (nn.Conv2d, nn.Linear)):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" and len(users[0].args) == 1 \
                and isinstance(model.get_submodule(users[0].target), _NORMS) \
                and calls[node.target] == 1 and calls[users[0].target] == 1:
            pairs.append((node.target, users[0].target))
    return pairs


def unit_variance(eps: float) -> float:
    """A float32 ``v`` with ``float32(v + eps) == 1``, so that ``1 / sqrt(v + eps)`` is exactly 1."""
    value = np.float32(1.0 - eps)
    for _ in range(64):
        total = np.float32(value + np.float32(eps))
        if total == 1:
            return float(value)
        value = np.nextafter(value, np.float32(2 if total < 1 else 0), dtype=np.float32)
    return float(np.float32(1.0 - eps))


def _scale(norm: nn.Module) -> np.ndarray | None:
    if not (isinstance(norm, _NORMS) and norm.affine and norm.track_running_stats and not norm.training
            and norm.running_mean is not None and norm.running_var is not None):
        return None
    var = norm.running_var.detach().double().cpu().numpy()
    scale = norm.weight.detach().double().cpu().numpy() / np.sqrt(var + norm.eps)
    return scale if np.all(np.isfinite(scale)) and np.all(scale != 0) else None


def _foldable(layer: nn.Module, norm: nn.Module, tied: set[int]) -> np.ndarray | None:
    code = getattr(layer, "code", None)
    if not isinstance(code, GridCode) or id(layer.weight) in tied or isinstance(layer, nn.ConvTranspose2d):
        return None
    out = int(code.shape[0])
    if code.scales().size != out or getattr(norm, "num_features", None) != out:
        return None
    return _scale(norm)


def replace_steps(layer: nn.Module, steps: np.ndarray) -> None:
    """Give ``layer``'s grid code new per-group ``steps`` (its levels, and so their coding, unchanged) and run
    with the new decoding."""
    assert isinstance(layer, CBDModule)
    code = layer.code
    assert isinstance(code, GridCode), "steps are replaced on grid codes only"
    changed = dataclasses.replace(code, steps=np.asarray(steps, np.float32))
    if "_stream" in code.__dict__:
        changed.__dict__["_stream"] = code.__dict__["_stream"]
    layer.set_code(changed)


@torch.no_grad()
def _fold(layer: nn.Module, norm: nn.Module, scale: np.ndarray) -> None:
    assert isinstance(layer, CBDModule) and isinstance(layer.code, GridCode) and isinstance(norm, _NORMS)
    mean, var = norm.running_mean, norm.running_var  # present: _foldable checked them
    assert mean is not None and var is not None
    replace_steps(layer, (layer.code.scales().astype(np.float64) * scale).astype(np.float32))
    shift = mean.detach().double().cpu().numpy()
    if layer.bias is not None:
        shift = shift - layer.bias.detach().double().cpu().numpy()
        layer.bias.zero_()
    beta = norm.bias.detach().double().cpu().numpy() - scale * shift
    norm.bias.copy_(torch.from_numpy(beta).to(norm.bias.dtype))
    norm.weight.fill_(1.0)
    mean.zero_()
    var.fill_(unit_variance(norm.eps))
    if norm.num_batches_tracked is not None:
        norm.num_batches_tracked.zero_()


def foldable_norms(model: nn.Module, layers: set[str]) -> list[str]:
    """The BatchNorms that :func:`fold_batchnorm` will fold once ``layers`` carry per-channel grid codes (what
    a bit budget predicts before choosing the codes)."""
    return [norm for layer, norm in conv_bn_pairs(model)
            if layer in layers and not isinstance(model.get_submodule(layer), nn.ConvTranspose2d)
            and _scale(model.get_submodule(norm)) is not None]


def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold every safe BatchNorm into the coded layer before it (see the module docstring), in place; returns
    the folded BatchNorms' names."""
    seen: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, CBDModule):
            seen[id(module.weight)] = seen.get(id(module.weight), 0) + 1
    tied = {key for key, count in seen.items() if count > 1}
    folded = []
    for layer_name, norm_name in conv_bn_pairs(model):
        layer, norm = model.get_submodule(layer_name), model.get_submodule(norm_name)
        if not isinstance(layer, CBDModule):
            continue
        scale = _foldable(layer, norm, tied)
        if scale is not None:
            _fold(layer, norm, scale)
            folded.append(norm_name)
    return folded
