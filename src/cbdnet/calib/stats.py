"""Calibration statistics and training-free corrections.

One pass over the calibration images (forward and backward through the *float* model) gathers, for every
Conv2d/Linear layer ``l`` with its input patches ``x`` (``F.unfold`` columns, in the order of
``weight.reshape(out, -1)``) and output ``y``:

- ``H = E[x x^T]``, the input second moment (GPTQ's Hessian up to a factor 2);
- ``mean = E[x]``, for bias correction: a weight error ``dW`` shifts the output mean by ``dW @ mean``;
- ``fisher[o] = E_n[sum_p (d loss_n / d y[n, o, p])^2]``, the squared per-sample loss gradient at each output
  channel. With a small weight error ``dW`` the calibration loss grows by about
  ``0.5 * sum_o fisher[o] * dW[o] @ H @ dW[o]`` (diagonal Gauss-Newton on the outputs): the per-layer
  sensitivity that :mod:`cbdnet.calib.budget` trades against bits.

Corrections (each optional): :func:`gptq_levels` (quantise columns in order of decreasing ``H`` diagonal and
push each column's error onto the columns not yet quantised, Frantar et al. 2022), :func:`bias_correct`
(fold ``dW @ mean`` into the following BatchNorm's running mean or the layer's bias) and
:func:`reestimate_bn` (recompute BatchNorm running statistics of the compressed model on calibration data).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..nn.modules import coded_weight, packed_attention
from .batches import CalibrationSet, as_calibration_set

__all__ = ["single_thread", "LayerStats", "MAX_FULL_INPUTS", "keeps_full", "row_bound", "positions_per_image",
           "collect_stats", "input_patches", "input_positions", "input_patches_at", "sample_positions",
           "sampled_patches",
           "task_loss", "gptq_levels", "gptq_levels_stacked", "output_error", "bias_correct", "bias_correct_if_better",
           "reestimate_bn", "following_bn", "calibration_loss"]


@contextmanager
def single_thread():
    """Run torch on one thread: the small matrices here gain nothing from two, and on a shared 2-core
    machine torch's spinning worker threads made them 30x slower (measured: 576x576 Cholesky inverse).
    The GPTQ solver does not use it: its work is a few large float32 matrix products per block of columns,
    which do gain from threads (see :func:`gptq_levels_stacked`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


MAX_POSITIONS = 4096  # input patches per image and layer that enter the statistics (a seeded random subset)
MAX_PATCH_ELEMENTS = 1 << 24  # unfolded patch elements materialised at once (64 MiB of float32)
# A layer's second moment (here and in refit) is estimated from about ROWS_PER_INPUT input rows per input
# dimension, at least MIN_ROWS: beyond that more rows cost float32 products and change the estimate little
# (docs/benchmarks.md, "Scaling of the calibrated budget", measures the bound against every row).
ROWS_PER_INPUT = 256
MIN_ROWS = 1 << 14
STATS_ROWS_PER_INPUT = 256
# Above this many inputs (an ungrouped layer's d) only H's diagonal is kept: a float64 d x d second moment and
# its factorisation (several d x d temporaries) would not fit memory; VGG-16's fc6 (d = 25,088) needs 5 GB
# for H alone. 8,192 inputs: 512 MiB per H, and every torchvision classifier but VGG's and AlexNet's fc6 below.
MAX_FULL_INPUTS = 8192


def keeps_full(inputs: int, groups: int = 1) -> bool:
    """Whether a layer with ``inputs`` inputs (per group) gets a full ``d x d`` second moment, not its diagonal:
    grouped layers always (their per-group inputs are few), others up to :data:`MAX_FULL_INPUTS`."""
    return groups > 1 or inputs <= MAX_FULL_INPUTS


def row_bound(inputs: int, per_input: int | None = None) -> int:
    """The input rows that enter the second moment of a layer with ``inputs`` inputs (per group): ``per_input``
    (default :data:`ROWS_PER_INPUT`) per input, at least :data:`MIN_ROWS`."""
    return max(MIN_ROWS, (ROWS_PER_INPUT if per_input is None else per_input) * inputs)


def positions_per_image(inputs: int, images: int) -> int:
    """How many of each image's output positions enter the statistics of a layer with ``inputs`` inputs (per
    group) over ``images`` calibration images: :func:`row_bound` spread evenly over the images (every image
    gives as many rows, so ``H`` and ``mean`` stay unbiased averages), at most :data:`MAX_POSITIONS`."""
    return max(1, min(MAX_POSITIONS, -(-row_bound(inputs, STATS_ROWS_PER_INPUT) // max(images, 1))))


def task_loss(logits, labels: torch.Tensor, data: CalibrationSet) -> torch.Tensor:
    """Summed cross-entropy: per image (classification) or per labelled pixel, void ignored (segmentation)."""
    if isinstance(logits, dict):  # torchvision's segmentation models: {"out": ..., "aux": ...}
        logits = logits["out"]
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=data.ignore_index)


class LayerStats:
    """Per-layer statistics. A grouped (or depthwise) conv has one ``H`` and ``mean`` per group ``g`` of its
    ``groups``: output channel ``o`` sees only the inputs of group ``o // (out / groups)``.

    ``hessian`` is accumulated in float64 and stored in float32 (:func:`collect_stats`): for ResNet-50 the
    second moments are most of what a budget holds, and every product with them runs in float64 again
    (:func:`output_error`, :func:`_gptq_factor`). Only the budget's choice reads them, so the pipeline drops them
    (:meth:`release_hessian`) before refit and the corrections, which read ``mean`` and ``fisher`` only; reading
    ``hessian`` after that is an error, not a silent zero."""

    def __init__(self, hessian: torch.Tensor, mean: torch.Tensor, fisher: torch.Tensor, samples: int = 0):
        self._hessian: torch.Tensor | None = hessian
        self._shape = tuple(hessian.shape)
        self.mean = mean  # float64 [d] (or [groups, d]), E[x]
        self.fisher = fisher  # float64 [out], E_n[sum_p g^2]
        self.samples = samples

    @property
    def hessian(self) -> torch.Tensor:
        """E[x x^T]: [d, d] (or [groups, d, d]); a wide layer's diagonal: [d], E[x^2]."""
        if self._hessian is None:
            raise RuntimeError("the second moment of this layer was released after the budget's choice")
        return self._hessian

    @hessian.setter
    def hessian(self, value: torch.Tensor) -> None:
        self._hessian, self._shape = value, tuple(value.shape)

    @property
    def released(self) -> bool:
        """Whether :meth:`release_hessian` dropped ``hessian`` (its shape, ``diagonal`` and ``groups`` remain)."""
        return self._hessian is None

    def release_hessian(self) -> None:
        """Drop ``hessian`` (``d x d`` floats); ``mean``, ``fisher`` and the shape stay."""
        self._hessian = None

    def __repr__(self) -> str:
        return f"LayerStats(hessian={self._shape}{' released' if self.released else ''}, samples={self.samples})"

    @property
    def diagonal(self) -> bool:
        """Only the diagonal of ``H`` is kept (a layer of more than :data:`MAX_FULL_INPUTS` inputs): its codes
        are rounded to nearest (GPTQ on a diagonal ``H``), and refit leaves it alone."""
        return len(self._shape) == 1

    @property
    def groups(self) -> int:
        return int(self._shape[0]) if len(self._shape) == 3 else 1

    def group_of(self, out: int) -> list[slice]:
        """The rows (output channels) of each group, for a weight with ``out`` output channels."""
        size = out // self.groups
        return [slice(g * size, (g + 1) * size) for g in range(self.groups)]


def input_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Linear or Conv2d layer's input columns ``[N * positions, d]`` for its input ``x``, in the order of
    ``weight.reshape(out, -1)``."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    kernel, stride, padding, dilation = _geometry(module)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def input_positions(module: nn.Module, x: torch.Tensor) -> int:
    """How many rows per image :func:`input_patches` gives for the input ``x`` (output positions)."""
    if isinstance(module, nn.Linear):
        return int(x[0].numel()) // int(x.shape[-1])
    height, width = _output_extents(module, x)
    return height * width


def _conv(module: nn.Module) -> nn.Conv2d:
    """``module``, which the callers know to be a Conv2d (every layer with statistics that is not a Linear)."""
    if not isinstance(module, nn.Conv2d):
        raise TypeError(f"input patches of a {type(module).__name__}: only Linear and Conv2d layers have them")
    return module


def _geometry(module: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """A Conv2d's kernel size, stride, padding and dilation; its padding numeric (see :func:`_supported`)."""
    conv = _conv(module)
    if isinstance(conv.padding, str):
        raise TypeError(f"input patches of a Conv2d with padding={conv.padding!r}: numeric padding only")
    return conv.kernel_size, conv.stride, conv.padding, conv.dilation


def _output_extents(module: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """A Conv2d's output height and width for the input ``x`` (numeric padding)."""
    height, width = ((int(extent) + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
                     for extent, kernel, stride, padding, dilation in zip(x.shape[2:], *_geometry(module), strict=True))
    return height, width


def input_patches_at(module: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The rows of :func:`input_patches` at ``positions`` (``[N, P]``, each image's own output positions, row-major):
    ``[N * P, d]``, equal to ``input_patches(module, x)[i * per_image + positions[i]]`` stacked, without unfolding
    the positions that are not asked for (Conv2d with numeric zero padding, or Linear)."""
    count, device = x.shape[0], x.device
    positions = positions.to(device)
    if isinstance(module, nn.Linear):
        rows = x.reshape(count, -1, x.shape[-1])
        return rows[torch.arange(count, device=device)[:, None], positions].reshape(-1, x.shape[-1])
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _geometry(module)
    padded = F.pad(x, (pw, pw, ph, ph))
    width = _output_extents(module, x)[1]
    row = (positions // width)[:, :, None, None] * sh + (torch.arange(kh, device=device) * dh)[None, None, :, None]
    col = (positions % width)[:, :, None, None] * sw + (torch.arange(kw, device=device) * dw)[None, None, None, :]
    images = torch.arange(count, device=device)[:, None, None, None]
    patches = padded[images, :, row, col]  # [N, P, kh, kw, C]: the advanced indices' dims come first
    return patches.permute(0, 1, 4, 2, 3).reshape(-1, x.shape[1] * kh * kw)


def sample_positions(module: nn.Module, x: torch.Tensor, limit: int, generator: torch.Generator
                     ) -> torch.Tensor | None:
    """A seeded random ``limit`` of each image's output positions (``[N, limit]``, for :func:`sampled_patches`),
    or None where an image has no more than ``limit`` of them (then every position is kept)."""
    per_image = input_positions(module, x)
    if per_image <= limit:
        return None
    return torch.stack([torch.randperm(per_image, generator=generator)[:limit] for _ in range(x.shape[0])])


def sampled_patches(module: nn.Module, x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """The input patches of ``x`` at the positions :func:`sample_positions` kept (all of them for None); only
    those are unfolded."""
    return input_patches(module, x) if keep is None else input_patches_at(module, x, keep)


def _supported(module: nn.Module) -> bool:
    """Linear and Conv2d layers (grouped and depthwise ones included). Transposed convolutions and convs with
    string or non-zero padding modes get no statistics: their codes are chosen by weight error."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _patch_chunks(module: nn.Module, x: torch.Tensor, positions: int, generator: torch.Generator,
                  limit: int | None = None):
    """The input patches of ``x`` a few images at a time (at most ``MAX_PATCH_ELEMENTS`` unfolded at once),
    each image's ``positions`` rows thinned to a seeded random ``limit`` (default ``MAX_POSITIONS``) of them
    (only those unfolded)."""
    limit = MAX_POSITIONS if limit is None else limit
    if isinstance(module, nn.Linear):
        d = int(x.shape[-1])
    else:
        conv = _conv(module)
        d = int(conv.weight[0].numel()) * conv.groups
    images_per_chunk = max(1, MAX_PATCH_ELEMENTS // max(1, min(positions, limit) * d))
    for start in range(0, x.shape[0], images_per_chunk):
        part = x[start:start + images_per_chunk]
        yield sampled_patches(module, part, sample_positions(module, part, limit, generator))


def _accumulate(stats: dict[str, LayerStats], name: str, cols: torch.Tensor, groups: int, out: int) -> None:
    """Add the input rows ``cols`` ``[rows, groups * d]`` (each group's inputs one contiguous block) to the
    statistics of layer ``name`` (``out`` output channels), on the device of ``cols``."""
    entry = stats.get(name)
    if entry is None:
        d = cols.shape[1] // groups
        shape = (d,) if groups == 1 else (groups, d)
        square = (d,) if keeps_full(d, groups) else ()  # a wide layer keeps H's diagonal only
        entry = stats[name] = LayerStats(torch.zeros(*shape, *square, dtype=torch.float64, device=cols.device),
                                         torch.zeros(*shape, dtype=torch.float64, device=cols.device),
                                         torch.zeros(out, dtype=torch.float64, device=cols.device))
    if entry.diagonal:
        entry.hessian += (cols * cols).sum(0).double()
    elif groups == 1:
        entry.hessian += (cols.T @ cols).double()
    else:
        per_group = cols.reshape(cols.shape[0], groups, -1).transpose(0, 1)
        entry.hessian += torch.bmm(per_group.transpose(1, 2), per_group).double()
    entry.mean += cols.sum(0).double().reshape(entry.mean.shape)
    entry.samples += cols.shape[0]


def _add_fisher(stats: dict[str, LayerStats], name: str, tensor: torch.Tensor, channel_dim: int,
                rows: slice | None = None) -> None:
    """Once ``tensor`` (a layer's output) gets its gradient, add the squared gradient per output channel (along
    ``channel_dim``) to the Fisher of layer ``name`` (its ``rows`` only, for one of several outputs)."""
    if not tensor.requires_grad:
        return
    dim = channel_dim % tensor.ndim

    def hook(grad):
        g = grad.detach().double()
        per_channel = (g**2).sum(dim=tuple(i for i in range(g.ndim) if i != dim))
        entry = stats.get(name)
        if entry is not None:
            entry.fisher[rows if rows is not None else slice(None)] += per_channel
    tensor.register_hook(hook)


_ATTENTION_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
                   "is_causal")


def _sample_rows(rows: torch.Tensor, count: int, generator: torch.Generator, per_image: int = MAX_POSITIONS
                 ) -> torch.Tensor:
    """A seeded random ``per_image`` rows per image of ``rows`` (all of them where there are fewer)."""
    limit = per_image * max(count, 1)
    if rows.shape[0] <= limit:
        return rows
    return rows[torch.randperm(rows.shape[0], generator=generator)[:limit].to(rows.device)]


def _attention_hook(stats: dict[str, LayerStats], name: str, out_name: str | None, generator: torch.Generator,
                    images: int = 1):
    """A forward hook (``with_kwargs``) on a packed ``nn.MultiheadAttention`` that recomputes its output in
    three visible steps, ``q, k, v = in_proj(query, key, value)``, attention with identity projections (the
    context), ``out_proj(context)``, and returns that output, so that the loss gradient flows through tensors
    a hook can see: the statistics of ``in_proj_weight`` (as a layer of 3 groups, the query, key and value
    rows, each with its own input) and of ``out_proj`` (whose own forward is never called: the attention
    reads its weight) are exact, like any Linear's. Cross-attention with key/value of another length than the
    query gives ``in_proj`` no statistics (its code is then chosen by weight error). ``images``: the number of
    calibration images, which sets the rows kept per image (:func:`positions_per_image`)."""
    def hook(module, args, kwargs, output):
        call = {**dict(zip(_ATTENTION_ARGS, args, strict=False)), **kwargs}
        query, key, value = call["query"], call["key"], call["value"]
        if query.dim() != 3 or key.dim() != 3 or value.dim() != 3:
            return None
        if module.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        embed = module.embed_dim
        bias = module.in_proj_bias.chunk(3) if module.in_proj_bias is not None else (None, None, None)
        projected = [F.linear(x, w, b) for x, w, b in zip((query, key, value), module.in_proj_weight.chunk(3), bias,
                                                           strict=True)]
        eye = torch.eye(embed, dtype=query.dtype, device=query.device)
        context, weights = F.multi_head_attention_forward(
            *projected, embed, module.num_heads, None, None, module.bias_k, module.bias_v, module.add_zero_attn,
            module.dropout, eye, None, training=module.training, key_padding_mask=call.get("key_padding_mask"),
            need_weights=call.get("need_weights", True), attn_mask=call.get("attn_mask"),
            use_separate_proj_weight=True, q_proj_weight=eye, k_proj_weight=eye, v_proj_weight=eye,
            average_attn_weights=call.get("average_attn_weights", True), is_causal=call.get("is_causal", False))
        result = F.linear(context, module.out_proj.weight, module.out_proj.bias)
        batch = query.shape[1]
        if query.shape == key.shape == value.shape:
            rows = torch.cat([x.detach().float().reshape(-1, embed) for x in (query, key, value)], 1)
            kept = _sample_rows(rows, batch, generator, positions_per_image(embed, images))
            _accumulate(stats, name, kept, 3, 3 * embed)
            for index, part in enumerate(projected):
                _add_fisher(stats, name, part, -1, slice(index * embed, (index + 1) * embed))
        if out_name is not None:
            rows = context.detach().float().reshape(-1, embed)
            kept = _sample_rows(rows, batch, generator, positions_per_image(embed, images))
            _accumulate(stats, out_name, kept, 1, module.out_proj.weight.shape[0])
            _add_fisher(stats, out_name, result, -1)
        if module.batch_first:
            result = result.transpose(0, 1)
        return result, weights
    return hook


def collect_stats(model: nn.Module, layers: list[tuple[str, nn.Module]], data, batch_size: int = 100,
                  device: torch.device | str | None = None, seed: int = 0) -> dict[str, LayerStats]:
    """Second moments, means and output Fisher of every supported layer over ``data`` (float model).

    A Linear's input may have any rank: every vector along its last dimension (a token, a channels-last
    pixel) is one input row. A packed ``nn.MultiheadAttention`` gets statistics for its ``in_proj_weight``
    (3 groups: query, key and value rows) and its ``out_proj`` (see :func:`_attention_hook`).

    Large images are memory-bounded: the batch shrinks with the pixel count (:func:`batch_size_for`), patches
    are unfolded a few images at a time. Each layer's ``H`` and ``mean`` are bounded to about :func:`row_bound`
    rows over all images: every image gives the same seeded random subset size of its patches
    (:func:`positions_per_image`, at most ``MAX_POSITIONS``), so both stay unbiased averages; the Fisher
    takes every position of every image (its gradient is there anyway).

    The forward and backward passes run where ``model`` is, with the images moved to ``device`` (None: the
    device of the model's first parameter); the statistics are accumulated there and returned on the CPU.
    ``seed``: of the positions drawn where a layer has more than its bound."""
    data = as_calibration_set(data)
    device = _model_device(model) if device is None else torch.device(device)
    stats: dict[str, LayerStats] = {}
    handles = []
    count = {"n": 0}
    generator = torch.Generator().manual_seed(seed)

    def forward_hook(name):
        def hook(module, inputs, output):
            if not inputs or not isinstance(inputs[0], torch.Tensor) or not isinstance(output, torch.Tensor):
                return
            x = inputs[0].detach().float()
            groups = getattr(module, "groups", 1)
            inputs = int(x.shape[-1]) if isinstance(module, nn.Linear) else int(module.weight[0].numel())
            limit = positions_per_image(inputs, len(data))
            for cols in _patch_chunks(module, x, input_positions(module, x), generator, limit):
                _accumulate(stats, name, cols, groups, module.weight.shape[0])
            _add_fisher(stats, name, output, -1 if isinstance(module, nn.Linear) else 1)
        return hook

    names = {id(module): name for name, module in layers}
    for name, module in layers:
        if packed_attention(module):
            handles.append(module.register_forward_hook(
                _attention_hook(stats, name, names.get(id(module.out_proj)), generator, len(data)), with_kwargs=True))
        elif _supported(module):
            handles.append(module.register_forward_hook(forward_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for images, labels in data.batches(data.batch_size_for(batch_size)):
                images = images.to(device).requires_grad_(True)  # so every layer output carries a gradient
                task_loss(model(images), labels.to(device), data).backward()
                count["n"] += len(labels)
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    for entry in stats.values():  # float32 once summed (see LayerStats), one layer at a time: no second copy of all
        entry.hessian = (entry.hessian / max(entry.samples, 1)).float().cpu()
        entry.mean = (entry.mean / max(entry.samples, 1)).cpu()
        entry.fisher = (entry.fisher / max(count["n"], 1)).cpu()
    return stats


def _model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def gptq_levels(weight: np.ndarray, steps: np.ndarray, mag_bits: int, hessian: torch.Tensor,
                damp: float = 0.01) -> np.ndarray:
    """Signed integer levels on the per-output-channel grid ``steps`` chosen by GPTQ (act order); a grouped
    layer's ``hessian`` ``[groups, d, d]`` is applied to each group's output channels in turn."""
    return gptq_levels_stacked(weight, [(steps, mag_bits)], hessian, damp)[0]


MAX_STACKED_ELEMENTS = 1 << 23  # float32 weight entries GPTQ updates at once (32 MiB; a few such arrays live)
GPTQ_BLOCK = 128  # columns quantised one by one before their error reaches the later columns in one product


def gptq_levels_stacked(weight: np.ndarray, grids: Sequence[tuple[np.ndarray, int]], hessian: torch.Tensor,
                        damp: float = 0.01, factors: dict | None = None) -> list[np.ndarray]:
    """:func:`gptq_levels` of one weight on each ``(steps, mag_bits)`` grid, the same levels as one call per
    grid: GPTQ treats every output row on its own, so the grids' copies of the weight are stacked as rows of
    one matrix (up to :data:`MAX_STACKED_ELEMENTS` at once) and the Hessian is factored once, not per grid.
    ``factors``: a dict that keeps each group's factorisation between calls on the same ``hessian`` (a budget
    asks for more grids of a layer as its search goes on)."""
    out = weight.shape[0]
    groups = hessian.shape[0] if hessian.ndim == 3 else 1
    size = out // groups
    per_out = [np.broadcast_to(np.asarray(steps, np.float32).reshape(-1), (out,)) for steps, _ in grids]
    tops = [float((1 << mag_bits) - 1) for _, mag_bits in grids]
    flat = np.asarray(weight, np.float32).reshape(out, -1)
    factors = {} if factors is None else factors
    narrow = np.int16 if max(tops, default=0) < (1 << 15) else np.int32  # levels of every grid live at once
    parts: list[list[np.ndarray]] = [[] for _ in grids]
    for g in range(groups):
        rows = slice(g * size, (g + 1) * size)
        if (g, damp) not in factors:
            factors[g, damp] = _gptq_factor(hessian[g] if hessian.ndim == 3 else hessian, damp)
        per_chunk = max(1, MAX_STACKED_ELEMENTS // max(1, size * flat.shape[1]))
        for first in range(0, len(grids), per_chunk):
            chosen = range(first, min(first + per_chunk, len(grids)))
            levels = _gptq_rows(flat[rows], [per_out[i][rows] for i in chosen], [tops[i] for i in chosen],
                                factors[g, damp])
            for i, part in zip(chosen, levels, strict=True):
                parts[i].append(part.astype(narrow))
    return [np.concatenate(part).reshape(weight.shape) for part in parts]


def _gptq_factor(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dead inputs (zero ``H`` diagonal), the act order, and the upper Cholesky factor ``U`` of the ordered,
    damped ``H^-1`` (``H^-1 = U^T U``) that GPTQ pushes each column's error with, as float32.

    One Cholesky factorisation and one triangular inverse (:func:`_lower_inverse`), in float64: with ``J`` the
    order reversal and ``J H J = L L^T``, ``U = J L^-1 J`` is upper triangular with a positive diagonal and
    ``U^T U = H^-1``, so it is that factor (the textbook route, Cholesky of ``H``, its inverse, then Cholesky
    again, costs 2.5x more)."""
    diagonal = torch.diagonal(hessian).double().clone()
    dead = diagonal <= 0
    diagonal[dead] = 1.0
    order = torch.argsort(diagonal, descending=True)
    reverse = order.flip(0)  # J H J, ordered, in one gather per axis: the d x d copies are the factor's memory
    h = hessian.index_select(0, reverse).index_select(1, reverse).double()  # ordered first: one float64 copy
    on_diagonal = torch.diagonal(h)
    on_diagonal[dead[reverse]] = 1.0
    on_diagonal += damp * diagonal.mean()
    lower = torch.linalg.cholesky(h)
    del h, on_diagonal
    inverse = _lower_inverse(lower).float()
    del lower
    return dead, order, inverse.flip(0, 1).contiguous()


def _lower_inverse(lower: torch.Tensor, leaf: int = 256) -> torch.Tensor:
    """The inverse of a lower triangular matrix, by halves (``[[A, 0], [B, C]]^-1`` is
    ``[[A^-1, 0], [-C^-1 B A^-1, C^-1]]``): matrix products instead of a triangular solve against the identity,
    which ignores the identity's zeros (measured 2.7x faster at n = 4608, float64, one thread)."""
    n = lower.shape[0]
    if n <= leaf:
        return torch.linalg.solve_triangular(lower, torch.eye(n, dtype=lower.dtype), upper=False)
    half = n // 2
    top, bottom = _lower_inverse(lower[:half, :half], leaf), _lower_inverse(lower[half:, half:], leaf)
    out = torch.zeros_like(lower)
    out[:half, :half], out[half:, half:] = top, bottom
    out[half:, :half] = -(bottom @ (lower[half:, :half] @ top))
    return out


def _gptq_rows(weight: np.ndarray, steps: list[np.ndarray], tops: list[float], factor,
               block: int = GPTQ_BLOCK) -> list[np.ndarray]:
    """GPTQ levels of ``weight`` [out, d] on each per-row grid ``steps[k]`` (clamped to ``+-tops[k]``), float32.

    Columns are quantised one by one, in order of decreasing ``H`` diagonal; each column's rounding error
    (scaled by the inverse Hessian) is pushed onto the columns not yet quantised, which minimises
    ``sum_o dW[o] @ H @ dW[o]`` greedily instead of ``|dW|^2``. As in Frantar et al.'s lazy batches, the error
    of a block of ``block`` columns reaches the later columns in one matrix product (the same arithmetic,
    reordered), so the work is BLAS, not a Python loop over columns. Every step is elementwise per row, so the
    grids stacked as rows give each the levels it would get alone. The matrix is held transposed (a column
    is a contiguous row)."""
    dead, order, upper = factor
    out, k = weight.shape[0], len(steps)
    w = torch.from_numpy(np.tile(np.asarray(weight, np.float32), (k, 1)))
    w[:, dead] = 0.0
    w = w[:, order].T.contiguous()  # [d, k * out]
    step = torch.from_numpy(np.concatenate(steps).astype(np.float32))
    top = torch.from_numpy(np.repeat(np.asarray(tops, np.float32), out))
    levels = torch.empty_like(w)
    d = w.shape[0]
    for first in range(0, d, block):
        last = min(first + block, d)
        part, local = w[first:last], upper[first:last, first:last]
        errors = torch.empty_like(part)
        for col in range(last - first):
            q = torch.minimum(torch.maximum(torch.round(part[col] / step), -top), top)
            levels[first + col] = q
            errors[col] = (part[col] - q * step) / local[col, col]
            if col + 1 < last - first:
                part[col + 1:].addr_(local[col, col + 1:], errors[col], alpha=-1.0)
        if last < d:
            w[last:].addmm_(upper[first:last, last:].T, errors, alpha=-1.0)
    restored = torch.empty_like(levels)
    restored[order] = levels
    return list(restored.T.numpy().reshape(k, out, -1))


def output_error(delta: np.ndarray, stats: LayerStats) -> np.ndarray:
    """Per output channel ``dW[o] @ H @ dW[o]``: the mean squared output error the weight error causes."""
    d = torch.from_numpy(np.asarray(delta, np.float64).reshape(delta.shape[0], -1))
    hessian = stats.hessian.double()  # stored in float32, multiplied in float64
    if stats.diagonal:
        return ((d * d) @ hessian).numpy()
    if stats.groups > 1:  # all groups in one batched product (a depthwise conv has one group per channel)
        d = d.reshape(stats.groups, -1, d.shape[1])
        return (torch.bmm(d, hessian) * d).sum(2).reshape(-1).numpy()
    return ((d @ hessian) * d).sum(1).numpy()


def following_bn(model: nn.Module) -> dict[str, str]:
    """Layer name -> the BatchNorm that normalises its output: the next module registered after it, when
    that is a BatchNorm with as many features as the layer has outputs (the Conv -> BN idiom)."""
    modules = list(model.named_modules())
    pairs = {}
    for (name, module), (next_name, nxt) in zip(modules, modules[1:], strict=False):
        if isinstance(module, (nn.Conv2d, nn.Linear)) and isinstance(nxt, nn.modules.batchnorm._BatchNorm) \
                and nxt.num_features == module.weight.shape[0] and nxt.track_running_stats:
            pairs[name] = next_name
    return pairs


def _running_mean(bn: nn.Module) -> torch.Tensor:
    """A BatchNorm's running mean (:func:`following_bn` pairs layers only with BatchNorms that track it)."""
    mean = bn.running_mean
    if not isinstance(mean, torch.Tensor):
        raise TypeError(f"{type(bn).__name__} keeps no running mean")
    return mean


def _mean_shift(delta: np.ndarray, stats: LayerStats) -> np.ndarray:
    """``dW[o] @ E[x]`` per output channel (each group's channels against its own inputs' mean)."""
    flat = delta.reshape(delta.shape[0], -1)
    if stats.groups == 1:
        return flat @ stats.mean.numpy()
    per_group = flat.reshape(stats.groups, -1, flat.shape[1])
    return np.einsum("gri,gi->gr", per_group, stats.mean.numpy()).reshape(-1)


def _shift_keeping_half(tensor: torch.Tensor, shift: torch.Tensor) -> None:
    """``tensor += shift``, rounded to float16's values where ``tensor`` held only such values: the file stores
    it in 2 bytes then, as the budget counted it (float16's 11 bits are far finer than the estimated shift)."""
    half = bool(torch.equal(tensor, tensor.half().to(tensor.dtype)))
    tensor += shift.to(tensor)
    if half:
        rounded = tensor.half().to(tensor.dtype)
        if bool(torch.isfinite(rounded).all()):
            tensor.copy_(rounded)


@torch.no_grad()
def bias_correct(model: nn.Module, original: dict[str, np.ndarray], stats: dict[str, LayerStats]) -> list[str]:
    """Remove the mean output shift ``(W_hat - W) @ E[x]`` of every compressed layer; returns the layers
    corrected. The shift goes into the following BatchNorm's running mean, else into the layer's bias;
    layers with neither are left alone (adding a bias would add stored floats)."""
    bns = following_bn(model)
    corrected = []
    for name, weight in original.items():
        if name not in stats:
            continue
        module = model.get_submodule(name)
        delta = coded_weight(module).detach().double().cpu().numpy() - weight
        shift = torch.from_numpy(_mean_shift(delta, stats[name]))
        bias = module.in_proj_bias if isinstance(module, nn.MultiheadAttention) else module.bias
        if name in bns:
            _shift_keeping_half(_running_mean(model.get_submodule(bns[name])), shift)
        elif isinstance(bias, torch.Tensor):  # (a Parameter, or None)
            _shift_keeping_half(bias, -shift)
        else:
            continue
        corrected.append(name)
    return corrected


@torch.no_grad()
def bias_correct_if_better(model: nn.Module, original: dict[str, np.ndarray], stats: dict[str, LayerStats],
                           data, loss_now: float | None = None) -> list[str]:
    """:func:`bias_correct`, undone unless it lowers the calibration loss on ``data``."""
    data = as_calibration_set(data)
    loss_now = calibration_loss(model, data) if loss_now is None else loss_now
    state = model.state_dict()
    kept = OrderedDict((key, value.clone()) for key, value in state.items())
    # MNASNet refuses a state dict without versions (``_metadata``: an attribute torch sets on state dicts, which
    # its type does not declare)
    kept._metadata = getattr(state, "_metadata", OrderedDict())  # type: ignore[attr-defined]
    corrected = bias_correct(model, original, stats)
    if calibration_loss(model, data) >= loss_now:
        model.load_state_dict(kept)
        return []
    return corrected


@torch.no_grad()
def reestimate_bn(model: nn.Module, data, batch_size: int = 100) -> int:
    """Recompute every BatchNorm's running mean/variance on ``data`` (cumulative average, the model's
    current weights); returns how many BatchNorm layers were updated."""
    data = as_calibration_set(data)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for images, _ in data.batches(data.batch_size_for(batch_size)):
            model(images)
    finally:
        for bn, momentum in zip(bns, momenta, strict=True):
            bn.momentum = momentum
        model.train(was_training)
    return len(bns)


@torch.no_grad()
def calibration_loss(model: nn.Module, data, batch_size: int = 250) -> float:
    """Mean cross-entropy of ``model`` on ``data`` (per image: summed over its labelled pixels for segmentation)."""
    data = as_calibration_set(data)
    model.eval()
    total = 0.0
    for images, labels in data.batches(data.batch_size_for(batch_size)):
        total += float(task_loss(model(images), labels, data))
    return total / len(data)
