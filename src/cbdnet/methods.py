"""The compression methods behind ``cbdnet compress`` flags: which encoder each layer gets, and the
corrections applied to the compressed model before it is saved.

- ``--method cbd`` (default, the paper): ``--granularity tensor`` (default) is the original per-layer code;
  ``--granularity channel`` is the composite code with one step per output channel (:mod:`cbdnet.grid`).
- ``--method rtn --bits K --granularity channel|tensor``: the round-to-nearest baseline.
- ``--method uniform``: the plain J-bit code of the core engine.
- ``--calib SPEC``: calibration images (training images only). With it, ``rtn`` and ``--target-bits`` round
  by GPTQ (``--no-gptq`` to switch off) and pick the clipping of each channel's step by predicted loss; the
  corrections ``--bias-correction`` / ``--bn-reestimate`` run on the compressed model before it is saved.
- ``--target-bits X``: per-layer settings under a budget of X bits/weight (:mod:`cbdnet.budget`).
"""

from __future__ import annotations

import argparse
import re
import time
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from .budget import choose, layer_candidates, rtn_candidate
from .calibrate import (
    bias_correct,
    bias_correct_if_better,
    calibration_loss,
    collect_stats,
    load_calibration,
    reestimate_bn,
    single_thread,
)
from .codec import LayerCode, _check_finite
from .compress import compressible_layers
from .errors import CBDError
from .grid import GRANULARITIES, encode_composite_grouped, encode_rtn

__all__ = ["add_method_args", "MethodPlan", "build_encoder", "finish_model"]


@dataclass
class MethodPlan:
    """What the ``compress`` flags resolve to before :func:`cbdnet.compress` runs, and what the corrections
    after it need: the per-layer encoder (``None``: the core engine's own), the config entries for the report,
    and the calibration state (empty without ``--calib``)."""

    encoder: object = None  # Callable[[str, np.ndarray], LayerCode] | None
    config: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)  # layer name -> LayerStats of the float model
    calib_data: object = None
    original: dict = field(default_factory=dict)  # layer name -> float64 weight before compression
    loss_before: float | None = None
    calib_seconds: float = 0.0
    build_seconds: float = 0.0
    chosen: dict | None = None  # --target-bits: layer name -> chosen candidate's label
    predicted_loss: float | None = None


def add_method_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", type=int, default=4,
                        help="--method rtn: bits per weight K, sign included (2^(K-1)-1 levels per side; default 4)")
    parser.add_argument("--granularity", choices=GRANULARITIES, default=None,
                        help="one scale per output channel or per tensor (default: channel for rtn, tensor "
                             "for cbd, i.e. the paper's code)")
    parser.add_argument("--calib", help="calibration data spec (training images only), e.g. "
                                        "cifar10-npz:../shared/data/cifar10_calib1000.npz")
    parser.add_argument("--calib-images", type=int, default=None, help="use only the first N calibration images")
    parser.add_argument("--target-bits", type=float, default=None,
                        help="choose per-layer settings to fit X bits/weight (as stored), by predicted --calib loss "
                             "(without --calib: by weight squared error)")
    parser.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=True,
                        help="with --calib: error-compensating rounding (GPTQ) instead of round-to-nearest")
    parser.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                        help="with --calib: remove each layer's mean output shift (default: kept where it "
                             "lowers the calibration loss)")
    parser.add_argument("--bn-reestimate", action=argparse.BooleanOptionalAction, default=None,
                        help="with --calib: recompute BatchNorm statistics on the calibration images (default: " +
                        ("on" if DEFAULT_BN_REESTIMATE else "off") + ")")


def _granularity(args) -> str:
    if args.granularity is not None:
        return args.granularity
    return "channel" if args.method == "rtn" else "tensor"


# Measured on ResNet-20 with cifar10_calib1000 (calibration loss; FP32 0.5636). Bias correction: --target-bits 3
# 0.5957 -> 0.5814 (test top-1 0.7934 -> 0.7958), --target-bits 4 0.5694 -> 0.5621, rtn 3 bits + GPTQ
# 0.5996 -> 0.5927 (test 0.8028 both), but rtn 4 bits + GPTQ 0.5954 -> 0.6017 (test 0.8040 -> 0.8041): so by
# default it is applied and kept only where it lowers the calibration loss ("auto").
# BN re-estimation: --target-bits 3 0.5957 -> 0.7078 (test 0.7754), rtn 3 + GPTQ 0.5996 -> 0.6666 (test 0.7860):
# it re-fits noisy statistics from 1,000 images, so it is off by default.
DEFAULT_BIAS_CORRECTION = "auto"
DEFAULT_BN_REESTIMATE = False


def _calibrate(args, model: nn.Module, plan: MethodPlan) -> None:
    """Calibration statistics of the float model into ``plan`` (nothing without ``--calib``)."""
    if not args.calib:
        if args.bias_correction or args.bn_reestimate:
            raise CBDError("--bias-correction and --bn-reestimate need --calib")
        return
    if re.search(r"(^|[^a-z])test", args.calib.rsplit("/", 1)[-1].lower()):
        raise CBDError(f"refusing to calibrate on {args.calib}: calibration must not use test images")
    start = time.perf_counter()
    plan.calib_data = load_calibration(args.calib, args.calib_images)
    if str(getattr(plan.calib_data, "name", "")).endswith(":test"):  # e.g. camvid-npz:PATH, whose default split
        raise CBDError(f"refusing to calibrate on {plan.calib_data.name}: calibration must not use test images; "
                       f"name a training split (e.g. {args.calib}:train)")
    with single_thread():
        plan.stats = collect_stats(model, compressible_layers(model, args.skip or ()), plan.calib_data)
    plan.calib_seconds = time.perf_counter() - start
    plan.loss_before = calibration_loss(model, plan.calib_data)


def _budgeted(args, model: nn.Module, plan: MethodPlan):
    layers = compressible_layers(model, args.skip or ())
    params = sum(m.weight.numel() for _, m in layers)
    candidates = {}
    for name, module in layers:
        weight = module.weight.detach().float().cpu().numpy()
        _check_finite(weight, name)
        with single_thread():
            candidates[name] = layer_candidates(weight, plan.stats.get(name), gptq=args.gptq)
    try:
        chosen = choose(candidates, args.target_bits * params)
    except ValueError as exc:
        raise CBDError(f"--target-bits {args.target_bits}: {exc}") from None
    plan.chosen = {name: c.label for name, c in chosen.items()}
    plan.predicted_loss = sum(c.loss for c in chosen.values())
    return lambda name, weight: chosen[name].code


def build_encoder(args, model: nn.Module) -> MethodPlan:
    """The :class:`MethodPlan` for the parsed ``compress`` arguments. Calibrated and budgeted codes are all
    computed here, before :func:`cbdnet.compress` (whose encoder then only looks them up)."""
    start = time.perf_counter()
    plan = MethodPlan()
    try:
        plan.encoder, plan.config = _build_encoder(args, model, plan)
    finally:
        plan.build_seconds = time.perf_counter() - start
    return plan


def _build_encoder(args, model: nn.Module, plan: MethodPlan):
    granularity = _granularity(args)
    plan.original = {name: m.weight.detach().double().cpu().numpy() for name, m in
                     compressible_layers(model, args.skip or ())}
    _calibrate(args, model, plan)
    stats = plan.stats
    calib = {"calib": args.calib, "gptq": bool(args.gptq and stats)} if stats else {}
    if args.target_bits is not None:
        if not 1.0 < args.target_bits <= 32.0:
            raise CBDError(f"--target-bits must be in (1, 32], got {args.target_bits}")
        return _budgeted(args, model, plan), {"method": "target-bits", "target_bits": args.target_bits, **calib}
    if args.method == "rtn":
        if not 2 <= args.bits <= 17:
            raise CBDError(f"--bits must be in 2..17 (sign included), got {args.bits}")

        calibrated = {}  # GPTQ codes computed here, up front: the encoder below only looks them up
        if granularity == "channel":
            with single_thread():
                for name, weight in plan.original.items():
                    if name in stats:
                        _check_finite(weight, name)
                        calibrated[name] = rtn_candidate(weight.astype(np.float32), args.bits, stats[name],
                                                         gptq=args.gptq).code

        def rtn(name: str, weight: np.ndarray) -> LayerCode:
            _check_finite(weight, name)
            return calibrated[name] if name in calibrated else encode_rtn(weight, args.bits, granularity)

        return rtn, {"method": "rtn", "bits": args.bits, "granularity": granularity, **calib}
    if args.method == "cbd" and granularity == "channel":
        def composite(name: str, weight: np.ndarray) -> LayerCode:
            _check_finite(weight, name)
            return encode_composite_grouped(weight, args.planes, args.bottleneck, granularity)

        return composite, {"method": "cbd", "granularity": granularity}
    if args.granularity == "channel":
        raise CBDError(f"--granularity channel is not available for --method {args.method}")
    return None, {"method": args.method, "granularity": granularity}


def finish_model(args, plan: MethodPlan, model: nn.Module, report) -> None:
    """Corrections applied to the compressed model before it is saved, and calibration figures."""
    if not plan.stats:
        return
    data = plan.calib_data
    use_bias = DEFAULT_BIAS_CORRECTION if args.bias_correction is None else args.bias_correction
    use_bn = DEFAULT_BN_REESTIMATE if args.bn_reestimate is None else args.bn_reestimate
    loss_compressed = calibration_loss(model, data)
    corrected = []
    if use_bias == "auto":
        corrected = bias_correct_if_better(model, plan.original, plan.stats, data, loss_compressed)
    elif use_bias:
        corrected = bias_correct(model, plan.original, plan.stats)
    bns = reestimate_bn(model, data) if use_bn else 0
    report.config.update({"bias_correction": use_bias, "bn_reestimate": use_bn})
    report.seconds += plan.build_seconds  # calibration statistics and the per-layer candidates
    report.extra["calibration"] = {
        "spec": args.calib, "images": len(data), "seconds_stats": round(plan.calib_seconds, 2),
        "seconds_encode": round(plan.build_seconds, 2),
        "loss_compressed": loss_compressed, "bias_corrected_layers": len(corrected), "bn_reestimated": bns,
        "loss_before": plan.loss_before, "loss_after": calibration_loss(model, data),
        **({"chosen": plan.chosen, "predicted_loss_increase": plan.predicted_loss}
           if plan.chosen is not None else {}),
    }
