"""Per-layer settings under a global bit budget (``--target-bits X``).

Every layer gets a list of candidate codes (RTN grids of 2..8 bits per output channel, grids of L levels per
side, sensitivity-weighted grids (:func:`weighted_steps`), the composite code per channel, each rounded by GPTQ
when calibration statistics are there), each with its exact coded size
(:meth:`cbdnet.codec.LayerCode.coded_bits`: the entropy-coded levels and steps, what format 2 stores) and
its predicted calibration-loss increase
``0.5 * sum_o fisher[o] * dW[o] @ H @ dW[o]`` (:mod:`cbdnet.calib.stats`). The choice minimises the summed
predicted loss subject to ``sum bits <= X * params``: a Lagrangian sweep (each layer independently minimises
``loss + lam * bits``; bisection on ``lam``) followed by greedy upgrades, best loss saved per bit first, while
they fit. Layers are never left in float: every weight is counted in ``bits_per_weight``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..codec import LayerCode
from ..codec.grid import composite_steps, grid_code, half_steps, round_levels, rtn_steps
from .stats import LayerStats, gptq_levels_stacked, output_error

__all__ = ["Candidate", "layer_candidates", "choose", "CLIP_RATIOS", "RTN_BITS", "COMPOSITE_PLANES", "FREE_LEVELS",
           "level_candidate", "weighted_steps", "weighted_candidate", "WEIGHTED_LEVELS", "SENSITIVITY_EXPONENTS",
           "WEIGHTED_MAX_BITS"]

RTN_BITS = (2, 3, 4, 5, 6, 8)
COMPOSITE_PLANES = (3, 4)
# L levels per side where RTN's 2^(K-1) - 1 leaves gaps (RTN gives L = 1, 3, 7, 15, 31, 127): with entropy
# coding the rate follows log2(2L + 1), not the bit width
FREE_LEVELS = (2, 4, 5, 6, 10, 12, 20)
CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7)
# sensitivity-weighted grids (see weighted_steps): levels per side at the geometric mean of the channels' steps,
# and the exponents that blend per-channel range (0) into sensitivity (1)
WEIGHTED_LEVELS = (1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 31)
SENSITIVITY_EXPONENTS = (0.5, 1.0)
# at most 63 levels per side: int8 kernels run them without narrowing the activations (ONNX export narrows the
# inputs of layers with levels above 64, see cbdnet.export)
WEIGHTED_MAX_BITS = 6
DEAD_STEP = 16.0  # a channel with no sensitivity gets step 16 * max|w_c|: all its levels round to 0


@dataclass
class Candidate:
    label: str
    code: LayerCode
    bits: int
    loss: float  # predicted calibration-loss increase


def _predicted_loss(weight: np.ndarray, code: LayerCode, stats: LayerStats | None) -> float:
    delta = code.decode().astype(np.float64) - weight
    if stats is None:  # no calibration data: plain squared error
        return float((delta**2).sum())
    return float(0.5 * (stats.fisher.numpy() * output_error(delta, stats)).sum())


def _levels(weight, grids, stats, gptq: bool) -> list[np.ndarray]:
    """The levels of ``weight`` on each ``(steps, mag_bits)`` grid: GPTQ's (all grids in one stacked run)
    where calibration statistics are there, else rounding."""
    if gptq and stats is not None:
        return gptq_levels_stacked(weight, grids, stats.hessian)
    return [round_levels(weight, steps, mag_bits) for steps, mag_bits in grids]


def _stored(steps: np.ndarray, half: bool) -> np.ndarray:
    return half_steps(steps) if half else np.asarray(steps, np.float32)


def _rtn_grids(weight, bits: int, clip_ratios, half: bool) -> list[tuple[np.ndarray, int]]:
    base = rtn_steps(weight, bits, "channel")
    return [(_stored(base * np.float32(ratio), half), bits - 1) for ratio in clip_ratios]


def _rtn_best(weight, bits: int, stats, gptq: bool, clip_ratios, grids, levels) -> Candidate:
    best = None
    for ratio, (steps, mag_bits), chosen in zip(clip_ratios, grids, levels, strict=True):
        code = grid_code(chosen, steps, mag_bits,
                         reason=f"rtn {bits} bits per channel, clip {ratio}{', gptq' if gptq and stats else ''}")
        code.extra["label"] = f"rtn{bits}/ch"
        loss = _predicted_loss(weight, code, stats)
        if best is None or loss < best.loss:
            best = Candidate(f"rtn{bits}", code, code.coded_bits(), loss)
    return best


def rtn_candidate(weight: np.ndarray, bits: int, stats: LayerStats | None, gptq: bool = True,
                  clip_ratios=CLIP_RATIOS, half: bool = False) -> Candidate:
    """The best (lowest predicted loss) per-channel K-bit grid over a few clipping ratios of the step
    (``half``: each step rounded to float16 first, as the file will store it)."""
    grids = _rtn_grids(weight, bits, clip_ratios, half)
    return _rtn_best(weight, bits, stats, gptq, clip_ratios, grids, _levels(weight, grids, stats, gptq))


def _level_grids(weight, levels: int, clip_ratios, half: bool) -> list[tuple[np.ndarray, int]]:
    base = rtn_steps(weight, 2, "channel") / np.float32(levels)  # 2-bit RTN's step is max|w_c|
    mag_bits = int(levels).bit_length()
    return [(_stored(base * np.float32(ratio), half), mag_bits) for ratio in clip_ratios]


def _level_best(weight, levels: int, stats, gptq: bool, clip_ratios, grids, chosen_levels) -> Candidate:
    best = None
    for ratio, (steps, mag_bits), chosen in zip(clip_ratios, grids, chosen_levels, strict=True):
        code = grid_code(chosen, steps, mag_bits,
                         reason=f"{levels} levels per side per channel, clip {ratio}"
                                f"{', gptq' if gptq and stats else ''}")
        code.extra["label"] = f"L{levels}/ch"
        loss = _predicted_loss(weight, code, stats)
        if best is None or loss < best.loss:
            best = Candidate(f"L{levels}", code, code.coded_bits(), loss)
    return best


def level_candidate(weight: np.ndarray, levels: int, stats: LayerStats | None, gptq: bool = True,
                    clip_ratios=CLIP_RATIOS, half: bool = False) -> Candidate:
    """The best per-channel grid of ``levels`` levels per side (step ``max|w_c| / levels`` times a clipping
    ratio) over a few clipping ratios; rounding clips at the planes' top, ``2^B - 1 >= levels``."""
    grids = _level_grids(weight, levels, clip_ratios, half)
    return _level_best(weight, levels, stats, gptq, clip_ratios, grids, _levels(weight, grids, stats, gptq))


def _sensitivity(stats: LayerStats | None, out: int) -> np.ndarray:
    """Per-output-channel sensitivity: the Fisher weight of the predicted loss, or 1 without statistics (then
    the predicted loss is the squared error, which weighs every channel alike)."""
    if stats is None:
        return np.ones(out)
    return np.asarray(stats.fisher.numpy(), np.float64)


def weighted_steps(weight: np.ndarray, sensitivity: np.ndarray, levels: float, exponent: float,
                   max_bits: int = WEIGHTED_MAX_BITS) -> tuple[np.ndarray, int]:
    """float32 per-channel steps that spend bits where the loss is sensitive, and the magnitude bits they need.

    With entropy-coded levels, a weight rounded with step ``s_c`` costs about ``h - log2 s_c`` bits and adds
    ``s_c^2 / 12`` to its squared error, so channel ``c`` adds about ``f_c * s_c^2 * tr(H) / 12`` to the predicted
    loss ``0.5 * sum_c f_c dW_c H dW_c`` (``f_c``: ``sensitivity``). Minimising that plus ``lambda`` times the
    bits gives ``s_c`` proportional to ``f_c^(-1/2)`` (the high-rate optimum), where a per-channel RTN grid sets
    ``s_c`` proportional to the channel's range ``r_c = max|w_c|``, spending as many bits on an insensitive channel
    as on a sensitive one. At low rates the high-rate model overstates the gain, so ``exponent`` (``e``) blends:
    ``s_c = k * r_c^(1 - e) * f_c^(-e / 2)``, with ``k`` set so that the geometric mean of ``r_c / s_c`` over the
    live channels is ``levels`` (``e = 0`` is a per-channel grid of ``levels`` levels per side; ``e = 1`` without
    calibration data, ``f_c = 1``, is one step for the whole layer). A channel with no sensitivity (below
    ``1e-12`` of the largest: a ReLU that is off on every calibration image) gets ``DEAD_STEP * r_c``, so its
    levels round to 0; steps stay at least ``r_c / (2^max_bits - 1)``.
    """
    rows = np.abs(np.asarray(weight, np.float64).reshape(weight.shape[0], -1))
    ranges = rows.max(axis=1)
    sensitivity = np.asarray(sensitivity, np.float64)
    if not sensitivity.max() > 0:  # no channel felt the loss (e.g. a zero-initialised head after it): no information
        sensitivity = np.ones_like(sensitivity)
    live = (ranges > 0) & (sensitivity > 1e-12 * sensitivity.max())
    steps = np.where(ranges > 0, DEAD_STEP * ranges, 1.0)
    if live.any():
        shape = ranges[live] ** (1.0 - exponent) * sensitivity[live] ** (-0.5 * exponent)
        levels_now = np.exp(np.mean(np.log(ranges[live] / shape)))  # geometric mean of r_c / shape_c
        top = float((1 << max_bits) - 1)
        steps[live] = np.maximum(shape * levels_now / float(levels), ranges[live] / top)
    largest = int(np.ceil(np.max(ranges[live] / steps[live]) - 1e-9)) if live.any() else 1
    return steps.astype(np.float32), max(1, min(max_bits, largest.bit_length()))


def _weighted_grid(weight, sensitivity, levels: float, exponent: float, half: bool) -> list[tuple[np.ndarray, int]]:
    steps, mag_bits = weighted_steps(weight, sensitivity, levels, exponent)
    return [(_stored(steps, half), mag_bits)]


def _weighted_of(weight, levels: float, exponent: float, stats, gptq: bool, grids, chosen_levels) -> Candidate:
    (steps, mag_bits), = grids
    code = grid_code(chosen_levels[0], steps, mag_bits,
                     reason=f"sensitivity-weighted steps per channel (exponent {exponent:g}), {levels:g} levels per "
                            f"side at the geometric mean{', gptq' if gptq and stats else ''}")
    code.extra["label"] = f"w{levels:g}e{exponent:g}/ch"
    return Candidate(f"w{levels:g}e{exponent:g}", code, code.coded_bits(), _predicted_loss(weight, code, stats))


def weighted_candidate(weight: np.ndarray, levels: float, exponent: float, stats: LayerStats | None,
                       gptq: bool = True, half: bool = False) -> Candidate:
    """The sensitivity-weighted grid (:func:`weighted_steps`) of ``levels`` levels per side at the geometric
    mean and sensitivity ``exponent``, rounded by GPTQ where ``stats`` are there."""
    weight = np.asarray(weight, np.float32)
    grids = _weighted_grid(weight, _sensitivity(stats, weight.shape[0]), levels, exponent, half)
    return _weighted_of(weight, levels, exponent, stats, gptq, grids, _levels(weight, grids, stats, gptq))


def _composite_grid(weight, planes: int, bottleneck: float, half: bool) -> tuple[list, np.ndarray]:
    steps, factor_from, _ = composite_steps(weight, planes, bottleneck, "channel")
    return [(_stored(steps, half), planes)], factor_from


def _composite_of(weight, planes: int, stats, gptq: bool, grids, factor_from, levels) -> Candidate:
    (steps, _), = grids
    code = grid_code(levels[0], steps, planes, factor_from=factor_from,
                     reason=f"composite J={planes} per channel{', gptq' if gptq and stats else ''}")
    code.extra["label"] = f"cbd J={planes}/ch"
    return Candidate(f"cbd{planes}", code, code.coded_bits(), _predicted_loss(weight, code, stats))


def composite_candidate(weight: np.ndarray, planes: int, stats: LayerStats | None, gptq: bool = True,
                        bottleneck: float = 0.3, half: bool = False) -> Candidate:
    grids, factor_from = _composite_grid(weight, planes, bottleneck, half)
    return _composite_of(weight, planes, stats, gptq, grids, factor_from, _levels(weight, grids, stats, gptq))


def layer_candidates(weight: np.ndarray, stats: LayerStats | None, gptq: bool = True,
                     rtn_bits=RTN_BITS, composite_planes=COMPOSITE_PLANES, levels=(), half: bool = False,
                     weighted_levels=(), exponents=SENSITIVITY_EXPONENTS) -> list[Candidate]:
    """Every candidate code of one layer (``half``: with float16 steps, see :func:`rtn_candidate`). The
    levels of all candidates' grids come from one :func:`_levels` call: one stacked GPTQ run per layer."""
    weight = np.asarray(weight, np.float32)
    plans = []  # (the grids, the candidate of their levels)
    for bits in rtn_bits:
        grids = _rtn_grids(weight, bits, CLIP_RATIOS, half)
        plans.append((grids, lambda lv, b=bits, g=grids: _rtn_best(weight, b, stats, gptq, CLIP_RATIOS, g, lv)))
    for count in levels:
        grids = _level_grids(weight, count, CLIP_RATIOS, half)
        plans.append((grids, lambda lv, c=count, g=grids: _level_best(weight, c, stats, gptq, CLIP_RATIOS, g, lv)))
    sensitivity = _sensitivity(stats, weight.shape[0])
    for count in weighted_levels:
        for exponent in exponents:
            grids = _weighted_grid(weight, sensitivity, count, exponent, half)
            plans.append((grids, lambda lv, c=count, e=exponent, g=grids:
                          _weighted_of(weight, c, e, stats, gptq, g, lv)))
    if np.any(weight != 0):  # the composite scale search needs a non-zero entry
        for planes in composite_planes:
            grids, factor_from = _composite_grid(weight, planes, 0.3, half)
            plans.append((grids, lambda lv, p=planes, g=grids, f=factor_from:
                          _composite_of(weight, p, stats, gptq, g, f, lv)))
    every = _levels(weight, [grid for grids, _ in plans for grid in grids], stats, gptq)
    out, first = [], 0
    for grids, candidate in plans:
        out.append(candidate(every[first:first + len(grids)]))
        first += len(grids)
    return out


def _pick(candidates: dict[str, list[Candidate]], lam: float) -> dict[str, int]:
    return {name: min(range(len(c)), key=lambda i, c=c: (c[i].loss + lam * c[i].bits, c[i].bits))
            for name, c in candidates.items()}


def _bits(candidates, picks) -> int:
    return sum(candidates[name][i].bits for name, i in picks.items())


def choose(candidates: dict[str, list[Candidate]], budget_bits: float) -> dict[str, Candidate]:
    """The per-layer candidates with the least summed loss whose summed bits fit ``budget_bits``."""
    cheapest = {name: min(range(len(c)), key=lambda i, c=c: c[i].bits) for name, c in candidates.items()}
    if _bits(candidates, cheapest) > budget_bits:
        need = _bits(candidates, cheapest) / sum(c[0].code.numel for c in candidates.values())
        raise ValueError(f"the budget is below the cheapest setting ({need:.3f} bits/weight)")
    lo, hi = 0.0, 1.0
    while _bits(candidates, _pick(candidates, hi)) > budget_bits:
        hi *= 4.0
        if not math.isfinite(hi) or hi > 1e30:
            break
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if _bits(candidates, _pick(candidates, mid)) > budget_bits:
            lo = mid
        else:
            hi = mid
    picks = _pick(candidates, hi)
    if _bits(candidates, picks) > budget_bits:
        picks = cheapest
    _upgrade(candidates, picks, budget_bits)
    return {name: candidates[name][i] for name, i in picks.items()}


def _upgrade(candidates, picks: dict[str, int], budget_bits: float) -> None:
    """Spend what is left of the budget: repeatedly take the move with the best loss saved per extra bit."""
    while True:
        left = budget_bits - _bits(candidates, picks)
        best, best_gain = None, 0.0
        for name, i in picks.items():
            current = candidates[name][i]
            for j, option in enumerate(candidates[name]):
                extra = option.bits - current.bits
                saved = current.loss - option.loss
                if saved <= 0 or extra > left:
                    continue
                gain = saved / max(extra, 1)
                if gain > best_gain:
                    best, best_gain = (name, j), gain
        if best is None:
            return
        picks[best[0]] = best[1]
