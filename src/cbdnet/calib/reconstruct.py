"""Learned rounding by block reconstruction (AdaRound, Nagel et al. 2020; BRECQ, Li et al. 2021).

GPTQ rounds each layer against that layer's own output error. Here, after the codes are chosen, every grid
code's levels are learned again against the output of the *block* the layer sits in (a residual block, or
the layer alone), given the block's input in the compressed model so far, so that errors earlier in the
network are compensated downstream. The steps (and so the grid and its bit width) stay as chosen.

Per layer, a weight ``w`` on the per-channel grid ``s`` whose chosen level is ``q`` (GPTQ's) gets ``b + h(V)``,
``h(V) = clip(1.2 * sigmoid(V) - 0.1, 0, 1)``, where ``b`` is ``q`` or ``q - 1`` (whichever side of ``w / s`` lets
it keep ``q`` or move one step toward ``w``), with ``h`` started at 0.15 or 0.85: near ``q``, not saturated.
(Started at the fractional part of ``w / s``, as in the AdaRound paper, 2,000 steps did worse than GPTQ's
levels in 10 of ResNet-20's 11 blocks; started at them, better in 8, see BENCHMARKS.md.) Per block, Adam
minimises ``E|f(x; W(V)) - y|^2 / E|y|^2 + (lam / n) * sum(1 - |2 h(V) - 1|^beta)``: the block output ``f``
against the float model's ``y``, relative, plus a term that drives every ``h`` to 0 or 1 (off for the first
20 % of the steps, then ``beta`` annealed from 20 to 2). The hard levels ``b + [h >= 0.5]``,
clamped to the code's range, are kept for a block only where they lower its reconstruction error on the
calibration images below that of the levels it had.
"""

from __future__ import annotations

import time
from contextlib import suppress
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..codec.code import GridCode
from ..codec.grid import with_levels
from ..nn.walk import owns_its_code
from .batches import CalibrationSet
from .stats import single_thread

__all__ = ["RoundingResult", "refine_rounding", "reconstruction_units"]

MAX_CAPTURE_BYTES = 512 << 20  # a block's captured inputs and float outputs, at most (fewer images if larger)
BATCH = 32
LEARNING_RATE = 3e-3
WARMUP = 0.2
REGULARISER = 0.5  # lam: the rounding term's weight, relative to the block's relative output error


class _Stop(Exception):
    """Raised by a capture hook: the rest of the forward pass is not needed."""


class SoftRounding(nn.Module):
    """One layer's learnable rounding on its fixed grid, started at its chosen ``levels``:
    ``step * clamp(b + h(V), -top, top)``, ``b`` the chosen level or the one below it (see the module text)."""

    def __init__(self, weight: torch.Tensor, steps: np.ndarray, top: int, levels: np.ndarray) -> None:
        super().__init__()
        shape = (-1,) + (1,) * (weight.ndim - 1)
        self.step = torch.as_tensor(np.asarray(steps, np.float32)).reshape(shape)
        ratio = weight.detach().float() / self.step
        chosen = torch.as_tensor(levels, dtype=torch.float32)  # the levels GPTQ (or rounding) chose
        above = ratio >= chosen
        self.floor = torch.where(above, chosen, chosen - 1)  # each weight may keep its level or move one toward w
        near = torch.where(above, 0.15, 0.85)  # h(V) near the chosen level, not saturated (a gradient to move on)
        start = (near + 0.1) / 1.2
        self.logit = nn.Parameter(torch.log(start / (1 - start)))
        self.top = float(top)

    def h(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.logit) * 1.2 - 0.1, 0, 1)

    def weight(self) -> torch.Tensor:
        return self.step * torch.clamp(self.floor + self.h(), -self.top, self.top)

    def hard_levels(self) -> np.ndarray:
        levels = torch.clamp(self.floor + (self.h() >= 0.5).float(), -self.top, self.top)
        return levels.detach().numpy().astype(np.int64)

    def penalty(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs() ** beta).sum()


@dataclass
class RoundingResult:
    """What :func:`refine_rounding` did, for the report."""

    iters: int
    blocks: int = 0
    blocks_kept: int = 0
    layers_changed: list[str] = field(default_factory=list)
    levels_changed: int = 0
    images: int = 0
    seconds: float = 0.0
    errors: dict[str, tuple[float, float]] = field(default_factory=dict)  # block: relative error before, learned
    loss: tuple[float, float] | None = None  # the model's calibration loss before and after (set by the caller)
    undone: bool = False  # the caller restored the previous levels (the calibration loss did not go down)

    def to_dict(self) -> dict:
        return {"iters": self.iters, "blocks": self.blocks, "blocks_kept": self.blocks_kept,
                "layers_changed": len(self.layers_changed), "levels_changed": self.levels_changed,
                "images": self.images, "seconds": round(self.seconds, 2), "undone": self.undone,
                "calibration_loss": None if self.loss is None else [round(v, 6) for v in self.loss],
                "block_errors": {name: [round(before, 6), round(after, 6)]
                                 for name, (before, after) in self.errors.items()}}


def reconstruction_units(model: nn.Module, layers: list[str]) -> list[tuple[str, list[str]]]:
    """The blocks to reconstruct, as ``(module name, [its layers])`` in ``layers``' order: each layer's
    outermost ancestor that is an element of an ``nn.Sequential`` or ``nn.ModuleList`` (a residual block in
    ``layer1``, a layer in VGG's ``features``), else the layer alone."""
    containers = {name for name, m in model.named_modules() if isinstance(m, (nn.Sequential, nn.ModuleList))}
    units: dict[str, list[str]] = {}
    for layer in layers:
        parts = layer.split(".")
        unit = layer
        for depth in range(1, len(parts)):
            parent, child = ".".join(parts[:depth - 1]), ".".join(parts[:depth])
            if parent in containers:
                unit = child
                break
        units.setdefault(unit, []).append(layer)
    return list(units.items())


def _capture(model: nn.Module, unit: nn.Module, data: CalibrationSet, images: int, want: str) -> torch.Tensor | None:
    """The unit's single tensor input (``want="input"``) or output over the first ``images`` calibration
    images, or None where the unit is not called with exactly one tensor."""
    parts: list[torch.Tensor] = []
    unusable = []

    def hook(_module, args, output):
        if len(args) != 1 or not isinstance(args[0], torch.Tensor) or not isinstance(output, torch.Tensor):
            unusable.append(True)
        else:
            parts.append((args[0] if want == "input" else output).detach())
        raise _Stop

    handle = unit.register_forward_hook(hook)
    seen = 0
    try:
        with torch.no_grad():
            for batch, _labels in data.batches(data.batch_size_for(100)):
                batch = batch[:images - seen]
                with suppress(_Stop):
                    model(batch)
                seen += len(batch)
                if unusable or seen >= images:
                    break
    finally:
        handle.remove()
    return None if unusable or not parts else torch.cat(parts)


def _relative_error(unit: nn.Module, weights: dict, inputs: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        error = sum(float(((functional_call(unit, weights, (inputs[i:i + 256],)) - target[i:i + 256]) ** 2).sum())
                    for i in range(0, len(inputs), 256))
    return error / max(float((target ** 2).sum()), 1e-30)


def _learn(unit: nn.Module, rounds: dict[str, SoftRounding], inputs, target, iters: int, seed: int) -> None:
    optimiser = torch.optim.Adam([r.logit for r in rounds.values()], lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(seed)
    energy = (target ** 2).sum(1).mean().clamp_min(1e-30)
    count = sum(r.logit.numel() for r in rounds.values())
    warm = int(WARMUP * iters)
    with torch.enable_grad():  # the caller may run under no_grad
        _steps(unit, rounds, inputs, target, iters, optimiser, generator, energy, count, warm)


def _steps(unit, rounds, inputs, target, iters, optimiser, generator, energy, count, warm) -> None:
    for step in range(iters):
        pick = torch.randint(0, len(inputs), (min(BATCH, len(inputs)),), generator=generator)
        out = functional_call(unit, {name: r.weight() for name, r in rounds.items()}, (inputs[pick],))
        loss = ((out - target[pick]) ** 2).sum(1).mean() / energy
        if step >= warm:
            beta = 20 - 18 * (step - warm) / max(1, iters - warm)
            loss = loss + REGULARISER / count * sum(r.penalty(beta) for r in rounds.values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()


def refine_rounding(model: nn.Module, float_model: nn.Module, layers: list[str], data: CalibrationSet,
                    iters: int, seed: int = 0) -> RoundingResult:
    """Learn, block by block, the rounding of every grid-coded layer in ``layers`` of the compressed ``model``
    (in place; ``float_model``: the same network before compression). Returns what changed."""
    start = time.perf_counter()
    result = RoundingResult(iters)
    modules = dict(model.named_modules())
    own_code = owns_its_code(model)
    modes = [(m, m.training) for m in (model, float_model)]
    model.eval()
    float_model.eval()  # BatchNorm with its running statistics, as the model will run
    try:
        with single_thread():  # small convolutions: a second thread spins more than it helps on a shared box
            _refine_units(model, float_model, layers, data, iters, seed, result, modules, own_code)
    finally:
        for module, training in modes:
            module.train(training)
        model.zero_grad(set_to_none=True)
    result.seconds = time.perf_counter() - start
    return result


def _refine_units(model, float_model, layers, data, iters, seed, result, modules, own_code) -> None:
    for index, (unit_name, members) in enumerate(reconstruction_units(model, layers)):
        # grid codes only, and not a weight several layers share (one code: refining it per layer would untie it)
        members = [m for m in members if isinstance(modules[m].code, GridCode) and own_code(modules[m])]
        if not members:
            continue
        refined = _refine_unit(model, float_model, unit_name, members, data, iters, seed + index, result)
        if not refined and members != [unit_name]:  # a unit not called with one tensor: its layers one by one
            for layer in members:
                _refine_unit(model, float_model, layer, [layer], data, iters, seed + index, result)


def _refine_unit(model, float_model, unit_name: str, members: list[str], data: CalibrationSet, iters: int,
                 seed: int, result: RoundingResult) -> bool:
    """Learn the rounding of ``members`` against the output of the module ``unit_name``; False where that
    module is not called with exactly one tensor (nothing learned)."""
    unit, float_unit = model.get_submodule(unit_name), float_model.get_submodule(unit_name)
    one_in = _capture(model, unit, data, 1, "input")
    one_out = _capture(float_model, float_unit, data, 1, "output")
    if one_in is None or one_out is None:
        return False
    images = max(1, min(len(data), MAX_CAPTURE_BYTES // max(1, 4 * (one_in.numel() + one_out.numel()))))
    inputs = _capture(model, unit, data, images, "input")
    target = _capture(float_model, float_unit, data, images, "output")
    if inputs is None or target is None:  # as for one image above
        return False
    prefix = "" if unit_name == "" else unit_name + "."
    rounds, codes = {}, {}
    for layer in members:
        module = model.get_submodule(layer)
        levels, steps = module.code.levels()
        key = layer[len(prefix):] + ".weight" if layer != unit_name else "weight"
        rounds[key] = SoftRounding(float_model.get_submodule(layer).weight, steps, int(np.abs(levels).max()), levels)
        codes[key] = (layer, module, levels, steps)
    before = _relative_error(unit, {}, inputs, target)
    _learn(unit, rounds, inputs, target, iters, seed)
    hard = {key: r.hard_levels() for key, r in rounds.items()}
    trial = {key: torch.from_numpy((hard[key] * r.step.numpy()).astype(np.float32)) for key, r in rounds.items()}
    result.blocks += 1
    result.images = max(result.images, len(inputs))
    after = _relative_error(unit, trial, inputs, target)
    result.errors[unit_name] = (before, after)
    if after >= before:
        return True
    result.blocks_kept += 1
    for key, (layer, module, levels, _steps) in codes.items():
        changed = int((hard[key] != levels).sum())
        if not changed:
            continue
        module.set_code(with_levels(module.code, hard[key], "adaround"))
        result.layers_changed.append(layer)
        result.levels_changed += changed
    return True
