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

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .batches import CalibrationSet, as_calibration_set

__all__ = ["single_thread", "LayerStats", "collect_stats", "input_patches", "input_positions", "input_patches_at",
           "sample_positions", "sampled_patches",
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


def task_loss(logits, labels: torch.Tensor, data: CalibrationSet) -> torch.Tensor:
    """Summed cross-entropy: per image (classification) or per labelled pixel, void ignored (segmentation)."""
    if isinstance(logits, dict):  # torchvision's segmentation models: {"out": ..., "aux": ...}
        logits = logits["out"]
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=data.ignore_index)


@dataclass
class LayerStats:
    """Per-layer statistics. A grouped (or depthwise) conv has one ``H`` and ``mean`` per group ``g`` of its
    ``groups``: output channel ``o`` sees only the inputs of group ``o // (out / groups)``."""

    hessian: torch.Tensor  # float64 [d, d] (or [groups, d, d]), E[x x^T]
    mean: torch.Tensor  # float64 [d] (or [groups, d]), E[x]
    fisher: torch.Tensor  # float64 [out], E_n[sum_p g^2]
    samples: int = 0

    @property
    def groups(self) -> int:
        return int(self.hessian.shape[0]) if self.hessian.ndim == 3 else 1

    def group_of(self, out: int) -> list[slice]:
        """The rows (output channels) of each group, for a weight with ``out`` output channels."""
        size = out // self.groups
        return [slice(g * size, (g + 1) * size) for g in range(self.groups)]

    def of_group(self, index: int) -> LayerStats:
        """The statistics of one group, as those of an ungrouped layer."""
        if self.groups == 1:
            return self
        rows = self.group_of(self.fisher.shape[0])[index]
        return LayerStats(self.hessian[index], self.mean[index], self.fisher[rows], self.samples)


def input_patches(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A Linear or Conv2d layer's input columns ``[N * positions, d]`` for its input ``x``, in the order of
    ``weight.reshape(out, -1)``."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def input_positions(module: nn.Module, x: torch.Tensor) -> int:
    """How many rows per image :func:`input_patches` gives for the input ``x`` (output positions)."""
    if isinstance(module, nn.Linear):
        return int(x[0].numel()) // int(x.shape[-1])
    height, width = _output_extents(module, x)
    return height * width


def _output_extents(module: nn.Conv2d, x: torch.Tensor) -> tuple[int, int]:
    """A Conv2d's output height and width for the input ``x`` (numeric padding)."""
    return tuple((int(extent) + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
                 for extent, kernel, stride, padding, dilation in zip(x.shape[2:], module.kernel_size, module.stride,
                                                                      module.padding, module.dilation, strict=True))


def input_patches_at(module: nn.Module, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The rows of :func:`input_patches` at ``positions`` (``[N, P]``, each image's own output positions, row-major):
    ``[N * P, d]``, equal to ``input_patches(module, x)[i * per_image + positions[i]]`` stacked, without unfolding
    the positions that are not asked for (Conv2d with numeric zero padding, or Linear)."""
    count = x.shape[0]
    if isinstance(module, nn.Linear):
        rows = x.reshape(count, -1, x.shape[-1])
        return rows[torch.arange(count)[:, None], positions].reshape(-1, x.shape[-1])
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = module.kernel_size, module.stride, module.padding, module.dilation
    padded = F.pad(x, (pw, pw, ph, ph))
    width = _output_extents(module, x)[1]
    row = (positions // width)[:, :, None, None] * sh + (torch.arange(kh) * dh)[None, None, :, None]
    col = (positions % width)[:, :, None, None] * sw + (torch.arange(kw) * dw)[None, None, None, :]
    images = torch.arange(count)[:, None, None, None]
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


def _patch_chunks(module: nn.Module, x: torch.Tensor, positions: int, generator: torch.Generator):
    """The input patches of ``x`` a few images at a time (at most ``MAX_PATCH_ELEMENTS`` unfolded at once),
    each image's ``positions`` rows thinned to a seeded random ``MAX_POSITIONS`` of them (only those unfolded)."""
    d = int(module.weight[0].numel()) * module.groups if not isinstance(module, nn.Linear) else int(x.shape[-1])
    images_per_chunk = max(1, MAX_PATCH_ELEMENTS // max(1, positions * d))
    for start in range(0, x.shape[0], images_per_chunk):
        part = x[start:start + images_per_chunk]
        yield sampled_patches(module, part, sample_positions(module, part, MAX_POSITIONS, generator))


def collect_stats(model: nn.Module, layers: list[tuple[str, nn.Module]], data, batch_size: int = 100
                  ) -> dict[str, LayerStats]:
    """Second moments, means and output Fisher of every supported layer over ``data`` (float model).

    Large images are memory-bounded: the batch shrinks with the pixel count (:func:`batch_size_for`), patches
    are unfolded a few images at a time, and at most ``MAX_POSITIONS`` patches per image and layer (a seeded
    random subset) enter ``H`` and ``mean``, which are averages and stay unbiased."""
    data = as_calibration_set(data)
    stats: dict[str, LayerStats] = {}
    handles = []
    count = {"n": 0}
    generator = torch.Generator().manual_seed(0)

    def forward_hook(name):
        def hook(module, inputs, output):
            x = inputs[0].detach().float()
            positions = int(output[0, 0].numel()) if output.ndim == 4 else 1
            groups = getattr(module, "groups", 1)
            for cols in _patch_chunks(module, x, positions, generator):
                entry = stats.get(name)
                if entry is None:
                    d, out = cols.shape[1] // groups, module.weight.shape[0]
                    shape = (d,) if groups == 1 else (groups, d)
                    entry = stats[name] = LayerStats(torch.zeros(*shape, d, dtype=torch.float64),
                                                     torch.zeros(*shape, dtype=torch.float64),
                                                     torch.zeros(out, dtype=torch.float64))
                if groups == 1:
                    entry.hessian += (cols.T @ cols).double()
                else:  # the unfolded columns are channel-major: each group's inputs are one contiguous block
                    per_group = cols.reshape(cols.shape[0], groups, -1).transpose(0, 1)
                    entry.hessian += torch.bmm(per_group.transpose(1, 2), per_group).double()
                entry.mean += cols.sum(0).double().reshape(entry.mean.shape)
                entry.samples += cols.shape[0]
            if output.requires_grad:
                output.register_hook(grad_hook(name))
        return hook

    def grad_hook(name):
        def hook(grad):
            g = grad.detach().double()
            per_channel = (g**2).sum(dim=tuple(i for i in range(g.ndim) if i != 1))
            stats[name].fisher += per_channel
        return hook

    for name, module in layers:
        if _supported(module):
            handles.append(module.register_forward_hook(forward_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for images, labels in data.batches(data.batch_size_for(batch_size)):
                images = images.requires_grad_(True)  # so every layer output carries a gradient
                task_loss(model(images), labels, data).backward()
                count["n"] += len(labels)
    finally:
        for handle in handles:
            handle.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    for entry in stats.values():
        entry.hessian /= entry.samples
        entry.mean /= entry.samples
        entry.fisher /= max(count["n"], 1)
    return stats


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
    parts = [[] for _ in grids]
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
    h = hessian.double().index_select(0, reverse).index_select(1, reverse)
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
    if stats.groups > 1:
        rows = stats.group_of(delta.shape[0])
        return np.concatenate([output_error(delta[r], stats.of_group(g)) for g, r in enumerate(rows)])
    d = torch.from_numpy(np.asarray(delta, np.float64).reshape(delta.shape[0], -1))
    return ((d @ stats.hessian) * d).sum(1).numpy()


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


def _mean_shift(delta: np.ndarray, stats: LayerStats) -> np.ndarray:
    """``dW[o] @ E[x]`` per output channel (each group's channels against its own inputs' mean)."""
    flat = delta.reshape(delta.shape[0], -1)
    if stats.groups == 1:
        return flat @ stats.mean.numpy()
    return np.concatenate([flat[r] @ stats.mean[g].numpy() for g, r in enumerate(stats.group_of(flat.shape[0]))])


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
        delta = module.weight.detach().double().cpu().numpy() - weight
        shift = torch.from_numpy(_mean_shift(delta, stats[name]))
        if name in bns:
            bn = model.get_submodule(bns[name])
            bn.running_mean += shift.to(bn.running_mean)
        elif module.bias is not None:
            module.bias -= shift.to(module.bias)
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
    kept = {key: value.clone() for key, value in model.state_dict().items()}
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
