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
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TypeVar

import numpy as np
import torch

from ..codec import LayerCode
from ..codec.grid import composite_steps, grid_code, half_steps, round_levels, rtn_steps
from .stats import LayerStats, gptq_levels_stacked, output_error

__all__ = ["Candidate", "layer_candidates", "choose", "CLIP_RATIOS", "RTN_BITS", "COMPOSITE_PLANES", "FREE_LEVELS",
           "level_candidate", "weighted_steps", "weighted_candidate", "WEIGHTED_LEVELS", "SENSITIVITY_EXPONENTS",
           "WEIGHTED_MAX_BITS", "LayerSearch", "Estimate", "choose_refined", "min_layer_bits", "REFINE_SPAN",
           "SCREEN_MACS"]

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

    @property
    def numel(self) -> int:
        return self.code.numel


def _predicted_loss(weight: np.ndarray, code: LayerCode, stats: LayerStats | None) -> float:
    delta = code.decode().astype(np.float64) - weight
    if stats is None:  # no calibration data: plain squared error
        return float((delta**2).sum())
    return float(0.5 * (stats.fisher.numpy() * output_error(delta, stats)).sum())


def _rounding_note(gptq: bool, stats: LayerStats | None) -> str:
    """What a code's reason says of its rounding: GPTQ, or a diagonal ``H`` (a layer too wide for GPTQ)."""
    if stats is not None and stats.diagonal:
        return ", diagonal H: no gptq"
    return ", gptq" if gptq and stats is not None else ""


def _levels(weight, grids, stats, gptq: bool) -> list[np.ndarray]:
    """The levels of ``weight`` on each ``(steps, mag_bits)`` grid: GPTQ's (all grids in one stacked run)
    where calibration statistics with a full ``H`` are there, else rounding (GPTQ on a diagonal ``H``)."""
    if gptq and stats is not None and not stats.diagonal:
        return gptq_levels_stacked(weight, grids, stats.hessian)
    return [round_levels(weight, steps, mag_bits) for steps, mag_bits in grids]


def _stored(steps: np.ndarray, half: bool) -> np.ndarray:
    return half_steps(steps) if half else np.asarray(steps, np.float32)


def rtn_label(bits: int) -> str:
    """The table's name of a per-channel ``bits``-bit rounding candidate (the file records it per layer)."""
    return f"rtn{bits}/ch"


def levels_label(levels: int) -> str:
    return f"L{levels}/ch"


def weighted_label(levels: float, exponent: float) -> str:
    return f"w{levels:g}e{exponent:g}/ch"


def composite_label(planes: int) -> str:
    return f"cbd J={planes}/ch"


def candidate_labels(rtn_bits=RTN_BITS, composite_planes=COMPOSITE_PLANES, levels=(), weighted_levels=(),
           exponents=SENSITIVITY_EXPONENTS) -> list[str]:
    """Every label a candidate of these families can carry (the arguments of :class:`LayerSearch`): the file's
    header records the chosen one per layer, so the budget sets aside room for the longest."""
    return ([rtn_label(bits) for bits in rtn_bits] + [levels_label(count) for count in levels]
            + [weighted_label(count, e) for count in weighted_levels for e in exponents]
            + [composite_label(planes) for planes in composite_planes])


def _rtn_grids(weight, bits: int, clip_ratios, half: bool) -> list[tuple[np.ndarray, int]]:
    base = rtn_steps(weight, bits, "channel")
    return [(_stored(base * np.float32(ratio), half), bits - 1) for ratio in clip_ratios]


def _rtn_best(weight, bits: int, stats, gptq: bool, clip_ratios, grids, levels) -> Candidate:
    best: Candidate | None = None
    for ratio, (steps, mag_bits), chosen in zip(clip_ratios, grids, levels, strict=True):
        code = grid_code(chosen, steps, mag_bits,
                         reason=f"rtn {bits} bits per channel, clip {ratio}{_rounding_note(gptq, stats)}")
        code.extra["label"] = rtn_label(bits)
        loss = _predicted_loss(weight, code, stats)
        if best is None or loss < best.loss:
            best = Candidate(f"rtn{bits}", code, code.coded_bits(), loss)
    return _found(best)


def _found(best: Candidate | None) -> Candidate:
    if best is None:
        raise ValueError("no clipping ratio to try")
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
    best: Candidate | None = None
    for ratio, (steps, mag_bits), chosen in zip(clip_ratios, grids, chosen_levels, strict=True):
        code = grid_code(chosen, steps, mag_bits,
                         reason=f"{levels} levels per side per channel, clip {ratio}"
                                f"{_rounding_note(gptq, stats)}")
        code.extra["label"] = levels_label(levels)
        loss = _predicted_loss(weight, code, stats)
        if best is None or loss < best.loss:
            best = Candidate(f"L{levels}", code, code.coded_bits(), loss)
    return _found(best)


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
                            f"side at the geometric mean{_rounding_note(gptq, stats)}")
    code.extra["label"] = weighted_label(levels, exponent)
    return Candidate(f"w{levels:g}e{exponent:g}", code, code.coded_bits(), _predicted_loss(weight, code, stats))


def weighted_candidate(weight: np.ndarray, levels: float, exponent: float, stats: LayerStats | None,
                       gptq: bool = True, half: bool = False) -> Candidate:
    """The sensitivity-weighted grid (:func:`weighted_steps`) of ``levels`` levels per side at the geometric
    mean and sensitivity ``exponent``, rounded by GPTQ where ``stats`` are there."""
    weight = np.asarray(weight, np.float32)
    grids = _weighted_grid(weight, _sensitivity(stats, weight.shape[0]), levels, exponent, half)
    return _weighted_of(weight, levels, exponent, stats, gptq, grids, _levels(weight, grids, stats, gptq))


def _composite_grid(weight, planes: int, bottleneck: float, half: bool) -> tuple[list[tuple[np.ndarray, int]], int]:
    steps, factor_from, _ = composite_steps(weight, planes, bottleneck, "channel")
    return [(_stored(steps, half), planes)], factor_from


def _composite_of(weight, planes: int, stats, gptq: bool, grids, factor_from: int, levels) -> Candidate:
    (steps, _), = grids
    code = grid_code(levels[0], steps, planes, factor_from=factor_from,
                     reason=f"composite J={planes} per channel{_rounding_note(gptq, stats)}")
    code.extra["label"] = composite_label(planes)
    return Candidate(f"cbd{planes}", code, code.coded_bits(), _predicted_loss(weight, code, stats))


# levels of a layer's candidate grids made exact at once (a wide layer's grids are made exact a few at a time:
# VGG-16's fc6 has 103 M weights per grid)
MAX_REFINE_LEVELS = 1 << 25
SCREEN_MACS = 1 << 27  # multiply-adds per grid for a screening loss; beyond, a seeded subset of output rows
REFINE_SPAN = 4.0  # GPTQ first runs on each layer's picks at the multiplier / SPAN .. * SPAN of the screening
REFINE_TOP = 3  # and on the best REFINE_TOP families at each of those multipliers
MIN_STREAM_BITS = 48  # the smallest coded level stream (cbdnet.codec.entropy: an empty blob and its CRC)


@dataclass
class Estimate:
    """A cheap stand-in for one candidate family of a layer: its grids rounded to nearest (no GPTQ, no coding),
    the best grid's estimated bits (empirical entropy of the levels plus float16 steps) and predicted loss."""

    label: str
    bits: float
    loss: float
    numel: int
    plan: int


Grids = list[tuple[np.ndarray, int]]  # (steps, magnitude bits) per grid of a candidate family
# a candidate family: its label, its grids, and ``finish(levels per grid)``, which makes its candidate (best grid)
Plan = tuple[str, Grids, Callable[[list[np.ndarray]], Candidate]]


def _plans(weight, stats, gptq, rtn_bits, composite_planes, levels, half, weighted_levels, exponents) -> list[Plan]:
    """Every candidate family of ``weight``: ``(label, grids, finish)`` where ``finish(levels per grid)`` makes the
    family's candidate (its best grid)."""
    plans: list[Plan] = []
    for bits in rtn_bits:
        grids = _rtn_grids(weight, bits, CLIP_RATIOS, half)
        plans.append((f"rtn{bits}", grids, partial(_rtn_best, weight, bits, stats, gptq, CLIP_RATIOS, grids)))
    for count in levels:
        grids = _level_grids(weight, count, CLIP_RATIOS, half)
        plans.append((f"L{count}", grids, partial(_level_best, weight, count, stats, gptq, CLIP_RATIOS, grids)))
    sensitivity = _sensitivity(stats, weight.shape[0])
    for count in weighted_levels:
        for exponent in exponents:
            grids = _weighted_grid(weight, sensitivity, count, exponent, half)
            plans.append((f"w{count:g}e{exponent:g}", grids,
                          partial(_weighted_of, weight, count, exponent, stats, gptq, grids)))
    if np.any(weight != 0):  # the composite scale search needs a non-zero entry
        for planes in composite_planes:
            grids, factor_from = _composite_grid(weight, planes, 0.3, half)
            plans.append((f"cbd{planes}", grids,
                          partial(_composite_of, weight, planes, stats, gptq, grids, factor_from)))
    return plans


def _entropy_bits(levels: np.ndarray) -> float:
    """The empirical entropy of ``levels`` in bits, plus a byte per distinct value for the frequency table."""
    flat = levels.reshape(-1)
    counts = np.bincount(flat - flat.min())
    counts = counts[counts > 0]
    return float(-(counts * np.log2(counts / flat.size)).sum()) + 8.0 * counts.size + MIN_STREAM_BITS


def min_layer_bits(shape: tuple[int, ...]) -> int:
    """A lower bound on the coded bits of any candidate of a weight of ``shape``: its float16 steps, one per
    output channel, and the smallest level stream (every candidate is a per-channel grid)."""
    return 16 * int(shape[0]) + MIN_STREAM_BITS


@dataclass
class LayerSearch:
    """One layer's candidate families, scored cheaply first and made exact on demand.

    :meth:`estimates` rounds every grid to nearest and predicts its loss (on a seeded subset of output rows where
    the layer is large, see :data:`SCREEN_MACS`) and bits (the levels' entropy); :meth:`refine` makes chosen
    families exact: GPTQ levels (one stacked run over the families asked for, on the layer's Hessian factored
    once for every call), coded bits and the full predicted loss. :func:`choose_refined` asks only for the
    families the budget may pick, where :func:`layer_candidates` makes every one exact."""

    weight: np.ndarray
    stats: LayerStats | None
    gptq: bool = True
    rtn_bits: tuple = RTN_BITS
    composite_planes: tuple = COMPOSITE_PLANES
    levels: tuple = ()
    half: bool = False
    weighted_levels: tuple = ()
    exponents: tuple = SENSITIVITY_EXPONENTS
    plans: list[Plan] = field(init=False)
    exact: list[Candidate | None] = field(init=False)
    _estimates: list[Estimate] | None = field(init=False, default=None)
    _factors: dict = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, np.float32)
        self.gptq = bool(self.gptq and self.stats is not None and not self.stats.diagonal)
        self.plans = _plans(self.weight, self.stats, self.gptq, self.rtn_bits, self.composite_planes, self.levels,
                            self.half, self.weighted_levels, self.exponents)
        self.exact = [None] * len(self.plans)

    def estimates(self) -> list[Estimate]:
        if self._estimates is None:
            loss = _screen_loss(self.weight, self.stats)
            out = []
            for index, (label, grids, _) in enumerate(self.plans):
                best: Estimate | None = None
                for steps, mag_bits in grids:
                    lv = round_levels(self.weight, steps, mag_bits)
                    delta = lv.reshape(lv.shape[0], -1) * np.asarray(steps, np.float32).reshape(-1, 1) \
                        - self.weight.reshape(self.weight.shape[0], -1)
                    option = Estimate(label, _entropy_bits(lv) + 16.0 * len(np.ravel(steps)), loss(delta),
                                      self.weight.size, index)
                    if best is None or option.loss < best.loss:
                        best = option
                if best is None:
                    raise ValueError(f"candidate family {label} has no grid")
                out.append(best)
            self._estimates = out
        return self._estimates

    def options(self) -> list[Candidate | Estimate]:
        """Each family's exact candidate where it was made, else its estimate."""
        estimates = self.estimates()
        return [exact if exact is not None else estimates[i] for i, exact in enumerate(self.exact)]

    def refine(self, plans: Iterable[int]) -> int:
        """Make the families ``plans`` exact (their grids' levels from one GPTQ run); returns how many were new."""
        todo = sorted({i for i in plans if self.exact[i] is None})
        held = max(1, MAX_REFINE_LEVELS // max(1, self.weight.size))  # grids whose levels are held at once
        batch: list[int] = []
        for i in todo:
            batch.append(i)
            if sum(len(self.plans[j][1]) for j in batch) >= held:
                self._make_exact(batch)
                batch = []
        if batch:
            self._make_exact(batch)
        return len(todo)

    def _make_exact(self, todo: list[int]) -> None:
        """The exact candidates of the families ``todo``, their grids' levels from one stacked run (GPTQ rounds
        every output row on its own, so how the families are batched does not change their levels)."""
        grids = [grid for i in todo for grid in self.plans[i][1]]
        if self.gptq and self.stats is not None:  # (gptq is set only where there are statistics)
            every = gptq_levels_stacked(self.weight, grids, self.stats.hessian, factors=self._factors)
        else:
            every = [round_levels(self.weight, steps, mag_bits) for steps, mag_bits in grids]
        first = 0
        for i in todo:
            count = len(self.plans[i][1])
            self.exact[i] = self.plans[i][2](every[first:first + count])
            first += count

    def release(self) -> None:
        """Drop the Hessian factorisation kept for later refinements (a later one factors again)."""
        self._factors.clear()

    def candidates(self) -> list[Candidate]:
        """Every family's exact candidate."""
        self.refine(range(len(self.plans)))
        return _all_exact(self.exact)


def _screen_loss(weight: np.ndarray, stats: LayerStats | None) -> Callable[[np.ndarray], float]:
    """The predicted loss of a weight error ``delta`` ``[out, d]`` (as :func:`_predicted_loss`), in float32, on a
    seeded subset of the output rows (scaled up to all of them) where ``out * d^2`` exceeds :data:`SCREEN_MACS`:
    an unbiased estimate, on the same rows for every grid of the layer."""
    if stats is None:
        return lambda delta: float((delta.astype(np.float64) ** 2).sum())
    out = weight.shape[0]
    fisher = stats.fisher.numpy()
    if stats.diagonal:  # exact, in float32: sum_o fisher[o] sum_i delta[o, i]^2 H[i]
        diagonal, per_row = stats.hessian.float(), torch.from_numpy(fisher)
        return lambda delta: float(0.5 * (per_row * (torch.from_numpy(
            np.ascontiguousarray(delta.reshape(out, -1), np.float32)).square() @ diagonal).double()).sum())
    if stats.groups > 1:  # per-group inputs are few (a depthwise conv's d is its kernel size): exact
        return lambda delta: float(0.5 * (fisher * output_error(delta, stats)).sum())
    hessian = stats.hessian.float()
    d = hessian.shape[0]
    count = min(out, max(16, SCREEN_MACS // max(1, d * d)))
    rows = np.sort(np.random.default_rng(0).permutation(out)[:count]) if count < out else np.arange(out)
    weights = torch.from_numpy(fisher[rows] * (out / count))

    def loss(delta: np.ndarray) -> float:
        part = torch.from_numpy(np.ascontiguousarray(delta[rows], np.float32))
        return float(0.5 * (weights * ((part @ hessian) * part).sum(1).double()).sum())
    return loss


def layer_candidates(weight: np.ndarray, stats: LayerStats | None, gptq: bool = True,
                     rtn_bits=RTN_BITS, composite_planes=COMPOSITE_PLANES, levels=(), half: bool = False,
                     weighted_levels=(), exponents=SENSITIVITY_EXPONENTS) -> list[Candidate]:
    """Every candidate code of one layer (``half``: with float16 steps, see :func:`rtn_candidate`). The
    levels of all candidates' grids come from one stacked GPTQ run per layer."""
    return LayerSearch(weight, stats, gptq, tuple(rtn_bits), tuple(composite_planes), tuple(levels), half,
                       tuple(weighted_levels), tuple(exponents)).candidates()


def _all_exact(picks: Sequence[Candidate | Estimate | None]) -> list[Candidate]:
    out = [pick for pick in picks if isinstance(pick, Candidate)]
    assert len(out) == len(picks), "a pick was not made exact"  # the callers refine every pick first
    return out


Option = TypeVar("Option", bound="Candidate | Estimate")  # an exact candidate or a family's estimate


def _cost(options: Sequence[Candidate | Estimate], lam: float, i: int) -> tuple[float, float]:
    """Option ``i``'s ``loss + lam * bits``, ties broken by fewer bits."""
    return options[i].loss + lam * options[i].bits, options[i].bits


def _cheapest(options: Sequence[Candidate | Estimate]) -> int:
    return min(range(len(options)), key=lambda i: options[i].bits)


def _best(options: Sequence[Candidate | Estimate], lam: float, top: int) -> list[int]:
    """The ``top`` families of lowest ``loss + lam * bits``."""
    return sorted(range(len(options)), key=partial(_cost, options, lam))[:top]


def choose_refined(searches: dict[str, LayerSearch], budget_bits: float, span: float = REFINE_SPAN,
                   top: int = REFINE_TOP, progress: Callable[[str, int], None] | None = None
                   ) -> dict[str, Candidate]:
    """:func:`choose` over every layer's families, made exact only where the budget may pick them.

    The screening estimates give the Lagrange multiplier ``lam`` of the budget; every layer's ``top`` best
    families at each of ``lam / span`` to ``lam * span`` (GPTQ lowers losses unevenly, so the exact trade-off
    moves) and its cheapest are made exact first. Then :func:`choose` runs on each family's exact candidate where
    there is one, else its estimate; any estimate it picks is made exact and the choice repeated, and once every
    pick is exact, the ``top`` best families of every layer at the exact multiplier are made exact and the
    choice repeated once more. Left as estimates are the families that rounding's loss (almost always above GPTQ's)
    ranks far from the budget's trade-off. ``progress(layer, new)`` is called after each layer's refinement
    (``new``: the families it made exact)."""
    estimates = {name: search.estimates() for name, search in searches.items()}
    lam = _multiplier(estimates, budget_bits)
    for name, search in searches.items():
        wanted = {i for k in range(-2, 3) for i in _best(estimates[name], lam * span ** (k / 2), top)}
        wanted.add(_cheapest(estimates[name]))
        made = search.refine(wanted)
        if progress is not None:
            progress(name, made)
    polished = False
    while True:
        options = {name: search.options() for name, search in searches.items()}
        chosen = choose(options, budget_bits)
        missing = {name: [c.plan] for name, c in chosen.items() if isinstance(c, Estimate)}
        if not missing and not polished:  # once: the best families at the exact trade-off, then choose again
            polished, lam = True, _multiplier(options, budget_bits)
            missing = {name: _best(options[name], lam, top) for name in searches}
        new = {name: searches[name].refine(plans) for name, plans in missing.items()}
        if not any(new.values()):  # every pick is exact (an estimate picked was refined above)
            return dict(zip(chosen, _all_exact(list(chosen.values())), strict=True))
        if progress is not None:
            for name, count in new.items():
                progress(name, count)


def _pick(candidates: Mapping[str, Sequence[Candidate | Estimate]], lam: float) -> dict[str, int]:
    return {name: min(range(len(c)), key=partial(_cost, c, lam)) for name, c in candidates.items()}


def _bits(candidates: Mapping[str, Sequence[Candidate | Estimate]], picks: dict[str, int]) -> float:
    return sum(candidates[name][i].bits for name, i in picks.items())


def choose(candidates: Mapping[str, Sequence[Option]], budget_bits: float) -> dict[str, Option]:
    """The per-layer candidates with the least summed loss whose summed bits fit ``budget_bits``."""
    cheapest = {name: _cheapest(c) for name, c in candidates.items()}
    if _bits(candidates, cheapest) > budget_bits:
        need = _bits(candidates, cheapest) / sum(c[0].numel for c in candidates.values())
        raise ValueError(f"the budget is below the cheapest setting ({need:.3f} bits/weight)")
    picks = _pick(candidates, _multiplier(candidates, budget_bits))
    if _bits(candidates, picks) > budget_bits:
        picks = cheapest
    _upgrade(candidates, picks, budget_bits)
    return {name: candidates[name][i] for name, i in picks.items()}


def _multiplier(candidates: Mapping[str, Sequence[Candidate | Estimate]], budget_bits: float) -> float:
    """The least Lagrange multiplier (bisection) whose per-layer picks fit ``budget_bits``."""
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
    return hi


def _upgrade(candidates: Mapping[str, Sequence[Candidate | Estimate]], picks: dict[str, int],
             budget_bits: float) -> None:
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
