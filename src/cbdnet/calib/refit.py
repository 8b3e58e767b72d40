"""Sequential, output-matching GPTQ: each chosen grid re-rounded against the float layer's output.

The budget's GPTQ rounds every layer against its own output error on the *float* model's inputs,
``min E|W x - W_hat x|^2``. In the compressed network the layer sees ``x~``, its input after every earlier layer
was compressed, so what reaches its output is ``W x - W_hat x~``. Here every grid code's levels are rounded
again, layer by layer in module order on the compressed model so far, to minimise that error::

    E|W x - W_hat x~|^2 = (W_hat - W*) H~ (W_hat - W*)^T + const,   H~ = E[x~ x~^T],   W* = W E[x x~^T] H~^-1

that is, GPTQ with the compressed inputs' Hessian ``H~`` toward the target ``W*``, which absorbs the error the
earlier layers left (the asymmetric objective some GPTQ variants use). Steps, bit widths and so the grids stay
as chosen. A layer keeps its new levels only where they lower that error; the whole step is undone unless it
lowers the compressed model's KL divergence from the float model on the calibration images.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial
from typing import cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..codec.code import GridCode
from ..codec.grid import with_levels
from ..nn.walk import owns_its_code
from .batches import CalibrationSet, as_calibration_set
from .stats import (
    MAX_PATCH_ELEMENTS,
    MIN_ROWS,
    ROWS_PER_INPUT,
    gptq_levels,
    input_positions,
    keeps_full,
    row_bound,
    sample_positions,
    sampled_patches,
    single_thread,
)

__all__ = ["RefitResult", "refit_levels", "calibration_kl", "POSITIONS", "ROWS_PER_INPUT", "MIN_ROWS"]

POSITIONS = 256  # input patches per image that enter the moments (a seeded random subset)
# the moments stop after row_bound(d) patches (ROWS_PER_INPUT per input dimension, at least MIN_ROWS, the
# calibration statistics' bound): each layer's capture runs both models up to it, so images beyond what the
# moments need were the refit's main cost
MAX_BLOCK_CACHE_BYTES = 1 << 30  # both models' block arguments kept for the layers of one block
DAMP = 0.01  # added to H~'s diagonal, relative to its mean, before it is inverted (as GPTQ damps)


@dataclass
class RefitResult:
    """What :func:`refit_levels` did, for the report."""

    layers: int = 0
    layers_changed: list[str] = field(default_factory=list)
    levels_changed: int = 0
    kl: tuple[float, float] | None = None  # calibration KL(float || compressed) before, after
    undone: bool = False
    extra_bits: int = 0  # coded bits the kept layers gained (negative: saved)
    spare_bits: float | None = None  # what a budget had left, spent as layers grow (None: no budget)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"layers": self.layers, "layers_changed": len(self.layers_changed),
                "levels_changed": self.levels_changed, "kl_before": self.kl[0] if self.kl else None,
                "kl_after": self.kl[1] if self.kl else None, "undone": self.undone,
                "extra_coded_bits": 0 if self.undone else self.extra_bits,
                "seconds": round(self.seconds, 2)}


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


def _first_call(run: Callable[[], object], module: nn.Module) -> tuple[tuple, dict] | None:
    """The arguments ``module`` gets at its first call in the forward pass ``run()``, which stops there; None
    where the pass does not reach it."""
    got: list[tuple[tuple, dict]] = []

    def hook(_module, args, kwargs):
        got.append((args, kwargs))
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), suppress(_Stop):
            run()
    finally:
        handle.remove()
    return got[0] if got else None


def _inputs(run: Callable[[], object], layer: nn.Module) -> torch.Tensor | None:
    """``layer``'s input tensor in the forward pass ``run()`` (which stops there), or None where it is not
    called with one tensor."""
    call = _first_call(run, layer)
    if call is None or len(call[0]) != 1 or not isinstance(call[0][0], torch.Tensor):
        return None
    return call[0][0].detach()


def block_of(model: nn.Module, name: str) -> str:
    """The block whose inputs :class:`_Captures` holds for layer ``name``: its shallowest enclosing module
    that is an item of an ``nn.Sequential`` and not one itself (a ResNet bottleneck, an inverted residual, a
    ConvNeXt or ViT block), else the layer itself. A block is a function of its arguments, so running it on
    them gives the layer the input the whole forward pass would."""
    parts = name.split(".")
    for depth in range(1, len(parts)):
        parent = model.get_submodule(".".join(parts[:depth - 1])) if depth > 1 else model
        candidate = model.get_submodule(".".join(parts[:depth]))
        if isinstance(parent, nn.Sequential) and not isinstance(candidate, nn.Sequential):
            return ".".join(parts[:depth])
    return name


@dataclass(frozen=True)
class _Point:
    """Where a batch's kept arguments enter the forward pass: item ``index`` of the module ``parent``.
    ``chain``: ``parent`` runs its items one after another (``nn.Sequential``'s own forward), so the arguments
    of a later item follow from these by running the items in between."""

    parent: str
    index: int
    chain: bool

    def reaches(self, later: _Point) -> bool:
        """Whether arguments kept here give ``later``'s by running ``parent``'s items in between."""
        return self.parent == later.parent and (self.index == later.index or self.chain and self.index < later.index)


def _point_of(model: nn.Module, block: str) -> _Point:
    parent_name, _, child = block.rpartition(".")
    parent = model.get_submodule(parent_name)
    return _Point(parent_name, list(parent._modules).index(child), type(parent).forward is nn.Sequential.forward)


@dataclass
class _Batch:
    """One calibration batch and, for both models, the arguments kept at ``point`` (None: none kept)."""

    images: torch.Tensor
    point: _Point | None = None
    calls: tuple[tuple[tuple, dict], tuple[tuple, dict]] | None = None
    bytes: int = 0


class _Captures:
    """Both models' inputs of the layers, batch by batch, in module order, without running both models from
    the image up to every layer. Each batch keeps both models' arguments of the *block* of the layer last
    captured (:func:`block_of`: a bottleneck, an inverted residual, a ConvNeXt or ViT block, a VGG layer), at
    most :data:`MAX_BLOCK_CACHE_BYTES` over all batches. A layer then runs only its block from the kept
    arguments; a layer of a later block of the same ``nn.Sequential`` runs the items in between first (the
    chain: VGG's convolutions, a stage's bottlenecks), and its block's arguments replace the kept ones where the
    cap allows. A layer before the kept point was refitted before the arguments were kept (module order), and a
    layer at or after it changes only what follows it, so every input is the whole forward pass's, bit for
    bit. A batch with nothing usable kept runs the whole models from the image up to the layer."""

    def __init__(self, model: nn.Module, float_model: nn.Module, data: CalibrationSet):
        self.models = (model, float_model)
        self.batches = data.batches(data.batch_size_for(100))
        self.kept: list[_Batch] = []
        self.held = 0

    def _batch(self, index: int) -> _Batch | None:
        if index == len(self.kept):
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.kept.append(_Batch(batch[0]))
        return self.kept[index]

    def inputs(self, name: str) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
        """``(compressed input, float input)`` of layer ``name``, per batch."""
        block = block_of(self.models[0], name)
        point = _point_of(self.models[0], block)
        keep = point.chain or block != name  # a layer's own input helps no later layer unless it chains
        index = 0
        while (batch := self._batch(index)) is not None:
            if batch.point is not None and not batch.point.reaches(point):  # nor any later layer: let it go
                self._let_go(batch)
            found = [_layer_input(model, block, name, batch, point, which, keep)
                     for which, model in enumerate(self.models)]
            calls = (found[0][0], found[1][0])
            if keep and calls[0] is not None and calls[1] is not None and batch.point != point:
                self._keep(batch, point, (calls[0], calls[1]))
            yield found[0][1], found[1][1]
            index += 1

    def _let_go(self, batch: _Batch) -> None:
        self.held -= batch.bytes
        batch.point, batch.calls, batch.bytes = None, None, 0

    def _keep(self, batch: _Batch, point: _Point, calls: tuple[tuple[tuple, dict], tuple[tuple, dict]]) -> None:
        size = _bytes(calls[0]) + _bytes(calls[1])
        if self.held - batch.bytes + size > MAX_BLOCK_CACHE_BYTES:
            return  # the earlier point, if any, stays: it still reaches this block
        self._let_go(batch)
        batch.point, batch.calls, batch.bytes = point, calls, size
        self.held += size


def _layer_input(model: nn.Module, block: str, name: str, batch: _Batch, point: _Point, which: int,
                 keep: bool) -> tuple[tuple[tuple, dict] | None, torch.Tensor | None]:
    """``(the block's arguments, the layer's input)`` in ``model`` (``which``: 0 compressed, 1 float) for
    ``batch``, from its kept arguments where they reach the block, else from the image. The block's arguments
    (None unless ``keep``) are copies: a block may change its arguments in place (an in-place activation
    first)."""
    kept = batch.calls is not None and batch.point is not None and batch.point.reaches(point)
    if kept and batch.point == point:
        assert batch.calls is not None
        run = partial(_call_copied, model.get_submodule(block), batch.calls[which])
    elif kept:
        assert batch.calls is not None and batch.point is not None
        items = list(cast(nn.Sequential, model.get_submodule(batch.point.parent)))  # chain: a plain Sequential
        run = partial(_run_items, items[batch.point.index:point.index + 1], batch.calls[which])
    else:
        run = partial(model, batch.images)
    if not keep or batch.point == point:  # nothing new to keep
        return None, _inputs(run, model.get_submodule(name))
    calls: list[tuple[tuple, dict]] = []

    def keep_arguments(_module, args, kwargs):
        if not calls:
            calls.append(_copied((args, kwargs)))

    handle = model.get_submodule(block).register_forward_pre_hook(keep_arguments, with_kwargs=True)
    try:
        layer_input = _inputs(run, model.get_submodule(name))
    finally:
        handle.remove()
    return (calls[0] if calls else None), layer_input


def _run_items(items: list[nn.Module], call: tuple[tuple, dict]) -> object:
    """``items`` one after another (as ``nn.Sequential`` runs them) from a copy of the first one's arguments."""
    args, kwargs = _copied(call)
    out = items[0](*args, **kwargs)
    for item in items[1:]:
        out = item(out)
    return out


def _copied(call: tuple[tuple, dict]) -> tuple[tuple, dict]:
    args, kwargs = call
    return (tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args),
            {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})


def _call_copied(block: nn.Module, call: tuple[tuple, dict]) -> object:
    return _run_items([block], call)


def _bytes(call: tuple[tuple, dict]) -> int:
    args, kwargs = call
    return sum(t.numel() * t.element_size() for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor))


def _moments(model: nn.Module, name: str, captures: _Captures, generator) -> tuple | None:
    """``(H~, E[x x~^T])`` of layer ``name`` over the calibration images, the first ones up to a bounded number
    of patches (None where it cannot be captured)."""
    layer = model.get_submodule(name)
    groups = getattr(layer, "groups", 1)
    hessian: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    count = 0
    for compressed_in, float_in in captures.inputs(name):
        if compressed_in is None or float_in is None:
            return None
        keep = sample_positions(layer, float_in, POSITIONS, generator)  # the same positions in both models
        rows = (keep.shape[1] if keep is not None else input_positions(layer, float_in)) * _width(layer, float_in)
        step = max(1, MAX_PATCH_ELEMENTS // max(1, rows))  # images whose patches are unfolded at once
        for first in range(0, len(float_in), step):
            part = slice(first, first + step)
            picked = None if keep is None else keep[part]
            x_tilde = _per_group(sampled_patches(layer, compressed_in[part].float(), picked), groups)
            x = _per_group(sampled_patches(layer, float_in[part].float(), picked), groups)  # [groups, rows, d]
            part_hessian = torch.bmm(x_tilde.transpose(1, 2), x_tilde)  # float32 products, summed in float64
            part_cross = torch.bmm(x.transpose(1, 2), x_tilde)
            # in place, the float32 product added to the float64 sum directly (the same values): no new d x d
            # float64 arrays per batch, which is two images at ImageNet size
            if hessian is None or cross is None:
                hessian, cross = part_hessian.double(), part_cross.double()
            else:
                hessian += part_hessian
                cross += part_cross
            count += x.shape[1]
        if hessian is not None and count >= row_bound(hessian.shape[-1]):
            break
    if hessian is None or cross is None:  # no calibration image reached the layer
        return None
    return (hessian / count).cpu(), (cross / count).cpu()  # accumulated where the model runs; GPTQ runs on the CPU


def _per_group(cols: torch.Tensor, groups: int) -> torch.Tensor:
    """Unfolded columns ``[rows, groups * d]`` (channel-major: each group's inputs one block) as
    ``[groups, rows, d]``."""
    return cols.reshape(cols.shape[0], groups, -1).transpose(0, 1)


def _width(layer: nn.Module, x: torch.Tensor) -> int:
    """Elements per unfolded patch row of ``layer`` over its input ``x``."""
    kernel = getattr(layer, "kernel_size", (1, 1))
    return int(x.shape[1]) * int(np.prod(kernel)) if isinstance(layer, nn.Conv2d) else int(x.shape[-1])


def _output_error(levels: np.ndarray, steps: np.ndarray, weight: torch.Tensor, hessian: torch.Tensor,
                  cross: torch.Tensor) -> float:
    """``E|W x - W_hat x~|^2`` up to a constant: ``sum_o W_hat[o] H~ W_hat[o] - 2 W[o] E[x x~^T] W_hat[o]``
    (moments ``[groups, d, d]``, weight ``[groups, rows, d]``: each group's rows against its own inputs)."""
    approx = torch.from_numpy(levels.reshape(levels.shape[0], -1).astype(np.float64) * steps.reshape(-1, 1))
    approx = approx.reshape(weight.shape)
    return float((torch.bmm(approx, hessian) * approx).sum() - 2.0 * (torch.bmm(weight, cross) * approx).sum())


def _target(weight: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """``W* = W E[x x~^T] H~^-1``, written ``W + W (E[x x~^T] - H~) H~^-1`` so that damping ``H~`` shrinks only
    the correction: where the inputs are the float ones (``x~ = x``, the first layer) the target is ``W``. Per
    group (``[groups, ...]``); a group whose inputs were all zero keeps ``W``."""
    scale = torch.diagonal(hessian, dim1=1, dim2=2).mean(1)
    scale = torch.where(scale > 0, DAMP * scale, torch.ones_like(scale))
    damped = hessian + scale[:, None, None] * torch.eye(hessian.shape[1], dtype=hessian.dtype)
    return weight + torch.linalg.solve(damped, torch.bmm(weight, cross - hessian).transpose(1, 2)).transpose(1, 2)


def _refit_layer(model, float_model, name: str, captures: _Captures, generator, result: RefitResult) -> None:
    module = model.get_submodule(name)
    code = module.code
    moments = _moments(model, name, captures, generator)
    if moments is None:
        return
    hessian, cross = moments
    if not torch.diagonal(hessian, dim1=1, dim2=2).mean() > 0:  # every input was zero: nothing to fit
        return
    groups = hessian.shape[0]
    weight = float_model.get_submodule(name).weight.detach().double().cpu().reshape(groups, code.shape[0] // groups, -1)
    levels, steps = code.levels()
    steps = np.broadcast_to(steps.reshape(-1), (code.shape[0],)).astype(np.float64)
    new = gptq_levels(_target(weight, hessian, cross).numpy().reshape(code.shape), steps.astype(np.float32),
                      code.num_planes, hessian if groups > 1 else hessian[0])
    result.layers += 1
    changed = int((new != levels).sum())
    if not changed or _output_error(new, steps, weight, hessian, cross) >= _output_error(levels, steps, weight,
                                                                                           hessian, cross):
        return
    refitted = with_levels(code, new, "refit")
    extra_bits = refitted.coded_bits() - code.coded_bits()
    if result.spare_bits is not None and extra_bits > result.spare_bits:
        return  # the new levels cost more than the budget has left
    if result.spare_bits is not None:
        result.spare_bits -= extra_bits
    module.set_code(refitted)
    result.layers_changed.append(name)
    result.levels_changed += changed
    result.extra_bits += extra_bits


MAX_KEPT_REFERENCE_BYTES = 256 << 20  # the float model's log-probabilities kept between refit's two KL passes


@torch.no_grad()
def calibration_kl(model: nn.Module, float_model: nn.Module, data, kept: list[torch.Tensor] | None = None) -> float:
    """Mean ``KL(float || compressed)`` of the class (or per-pixel) distributions over the calibration images
    (``data``: a :class:`CalibrationSet` or anything :func:`as_calibration_set` takes). ``kept``: the float
    model's log-probabilities per batch from an earlier call with the same list (the float model does not
    change), filled as far as :data:`MAX_KEPT_REFERENCE_BYTES` allows; the rest are computed again."""
    data = as_calibration_set(data, float_model)
    kept = [] if kept is None else kept
    held = sum(t.numel() * t.element_size() for t in kept)
    total, count = 0.0, 0
    for index, (images, _labels) in enumerate(data.batches(data.batch_size_for(100))):
        reference = kept[index] if index < len(kept) else _log_probabilities(float_model(images))
        size = reference.numel() * reference.element_size()
        if index == len(kept) and held + size <= MAX_KEPT_REFERENCE_BYTES:
            kept.append(reference)
            held += size
        out = _log_probabilities(model(images))
        total += float(F.kl_div(out, reference, log_target=True, reduction="sum")) / (
            out[0, 0].numel() if out.ndim > 2 else 1)
        count += len(images)
    return total / max(count, 1)


def _log_probabilities(out) -> torch.Tensor:
    return F.log_softmax((out["out"] if isinstance(out, dict) else out).float(), 1)


def refit_levels(model: nn.Module, float_model: nn.Module, layers: list[str], data, seed: int = 0,
                 spare_bits: float | None = None) -> RefitResult:
    """Re-round, in module order, every grid-coded layer of ``layers`` in the compressed ``model`` (in place;
    ``float_model``: the network before compression) against the float layer's output on the calibration
    ``data`` (as :func:`calibration_kl` takes it), see the module text. Linear and Conv2d layers only;
    a weight several layers share keeps its code. ``spare_bits``: what a bit budget has left; a layer whose new
    levels would code to more bits than remain keeps its own (None: no budget)."""
    start = time.perf_counter()
    data = as_calibration_set(data, float_model)
    result = RefitResult(spare_bits=spare_bits)
    modules = dict(model.named_modules())
    own_code = owns_its_code(model)
    wanted = set(layers)
    names = [name for name, m in modules.items() if name in wanted and isinstance(getattr(m, "code", None), GridCode)
             and own_code(m) and _refittable(m)]
    codes = {name: modules[name].code for name in names}
    modes = [(m, m.training) for m in (model, float_model)]
    model.eval()
    float_model.eval()
    generator = torch.Generator().manual_seed(seed)
    try:
        with single_thread():
            reference: list[torch.Tensor] = []
            before = calibration_kl(model, float_model, data, reference)
            captures = _Captures(model, float_model, data)
            for name in names:
                _refit_layer(model, float_model, name, captures, generator, result)
            after = calibration_kl(model, float_model, data, reference) if result.layers_changed else before
    finally:
        for module, training in modes:
            module.train(training)
    result.kl = (before, after)
    if after >= before and result.layers_changed:
        for name in result.layers_changed:
            modules[name].set_code(codes[name])
        result.undone = True
    result.seconds = time.perf_counter() - start
    return result


def _refittable(module: nn.Module) -> bool:
    """Linear layers (inputs of any rank) and Conv2d with numeric zero padding, grouped and depthwise ones
    included, of at most ``MAX_FULL_INPUTS`` inputs where ungrouped (wider ones have a diagonal ``H`` in the
    statistics, and refit's ``d x d`` moments would not fit memory). Transposed convolutions and attention
    projections keep their codes."""
    if isinstance(module, nn.Linear):
        return keeps_full(module.in_features)
    return isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str) \
        and keeps_full(int(module.weight[0].numel()), module.groups)
