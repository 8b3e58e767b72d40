"""``cbdnet.compress(model, config, calibration=data)``: one entry point for every method.

The config says which code each layer gets (:mod:`cbdnet.calib.configs`); calibration data, when given, is
used for GPTQ rounding, the per-layer budget's loss estimates and the corrections applied to the compressed
model (bias correction, BatchNorm re-estimation). Calibrated and budgeted codes are all computed before the
walker runs, so the per-layer encoder it calls only looks them up.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

import numpy as np
import torch
from torch import nn

from ..codec import LayerCode, check_finite, encode_composite_grouped, encode_rtn, encode_uniform, encode_weight
from ..codec.code import GridCode
from ..codec.floats import as_float16, constant_value, stored_float_bytes
from ..codec.grid import half_steps
from ..errors import CBDError
from ..nn import CBDModule
from ..nn.fold import fold_batchnorm, foldable_norms, replace_steps
from ..nn.modules import coded_key, coded_weight
from ..nn.report import Report, layer_report
from ..nn.state import record
from ..nn.walk import Encoder, check_skip, compress_layers, compressible_layers, float_state, owns_its_code
from .batches import CalibrationSet, as_calibration_set
from .budget import LayerSearch, candidate_labels, choose_refined, min_layer_bits, rtn_candidate
from .configs import (
    BudgetConfig,
    CalibrationConfig,
    CBDConfig,
    CompressConfig,
    RTNConfig,
    UniformConfig,
    resolve_device,
)
from .progress import stage_bar
from .reconstruct import refine_rounding
from .refit import refit_levels
from .stats import (
    LayerStats,
    bias_correct,
    bias_correct_if_better,
    calibration_loss,
    collect_stats,
    reestimate_bn,
    single_thread,
)

__all__ = ["compress", "CompressCache"]


@dataclass
class _Calibration:
    """The float model's calibration state: statistics per layer, and the data they came from."""

    data: CalibrationSet | None = None
    stats: dict[str, LayerStats] = field(default_factory=dict)
    loss_before: float | None = None
    seconds: float = 0.0

    spilled: dict[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)  # H's offset and shape
    spill: BinaryIO | None = None

    def release_second_moments(self, keep: bool) -> None:
        """Move every layer's ``H`` out of memory once the codes are chosen: refit computes its own moments and
        the corrections read only ``mean`` and ``fisher``, so ``H`` (``d x d`` floats per layer, most of what the
        statistics hold) is not carried through them. ``keep`` (a :class:`CompressCache` holds this for a retry):
        it goes to an anonymous temporary file (removed by the system when closed, even if the process is
        killed), which a retry of the budget reads back (:meth:`restore_second_moments`), so the statistics are
        reused, not computed again; where the file cannot be written, ``H`` stays in memory."""
        if not keep:
            for entry in self.stats.values():
                entry.release_hessian()
            return
        try:
            if self.spill is None:  # open while the cache holds the calibration (a retry reads it): see close()
                self.spill = tempfile.TemporaryFile(prefix="cbdnet-moments-")  # noqa: SIM115
            for name, entry in self.stats.items():
                if entry.released:
                    continue
                if name not in self.spilled:  # else a retry's: the file still holds the same values
                    hessian = entry.hessian.contiguous().float().numpy()
                    offset = self.spill.seek(0, io.SEEK_END)
                    self.spill.write(hessian.data)
                    self.spill.flush()
                    self.spilled[name] = (offset, hessian.shape)  # only once written: a failed write keeps it here
                entry.release_hessian()
        except OSError:  # a full or read-only temporary folder: memory instead
            self.restore_second_moments()

    def close(self) -> None:
        if self.spill is not None:
            self.spill.close()
            self.spill = None
            self.spilled.clear()

    def restore_second_moments(self) -> None:
        """Put back the ``H`` that :meth:`release_second_moments` moved to its file (the same values, float32 as
        stored) into the same :class:`LayerStats` objects, which the cached searches hold."""
        for name, (offset, shape) in self.spilled.items():
            entry = self.stats[name]
            if entry.released and self.spill is not None:
                self.spill.seek(offset)
                count = int(np.prod(shape))
                entry.hessian = torch.from_numpy(np.fromfile(self.spill, np.float32, count).reshape(shape))


def _calibrate(model: nn.Module, layers, calibration, settings: CalibrationConfig) -> _Calibration:
    if calibration is None:
        if settings.bias_correction is True or settings.bn_reestimate:
            raise CBDError("bias correction and BatchNorm re-estimation need calibration data")
        return _Calibration()
    start = time.perf_counter()
    device = _device_of(model)
    data = as_calibration_set(calibration, model, limit=settings.images)
    data = dataclasses.replace(data, device=None if device.type == "cpu" else device)  # batches go to the model
    with single_thread():
        stats = collect_stats(model, layers, data, device=device)
    return _Calibration(data, stats, calibration_loss(model, data), time.perf_counter() - start)


def _checked(encode) -> Encoder:
    def encoder(name: str, weight: np.ndarray) -> LayerCode:
        check_finite(weight, name)
        return encode(name, weight)
    return encoder


def _rtn_encoder(config: RTNConfig, originals: dict, calib: _Calibration, gptq: bool, half: bool) -> Encoder:
    calibrated = {}  # GPTQ codes computed here, up front: the encoder only looks them up
    if config.granularity == "channel" and calib.stats:
        with single_thread():
            for name, weight in originals.items():
                if name in calib.stats:
                    check_finite(weight, name)
                    calibrated[name] = rtn_candidate(weight.astype(np.float32), config.bits, calib.stats[name],
                                                     gptq=gptq, half=half).code
    return _checked(lambda name, weight: calibrated[name] if name in calibrated
                    else encode_rtn(weight, config.bits, config.granularity))


CONTAINER_BYTES = 24 + 4 + 32  # prefix, header length, SHA-256
LABEL_BYTES = 2  # per layer: what a repeated code label adds to the zlib-compressed header (see header_allowance)
LABEL_FIRST_BYTES = 96  # the first occurrences of the few distinct labels a file holds


def header_allowance(layers: int, floats: int, label_chars: int = 0) -> int:
    """Bytes the budget sets aside for the file's zlib-compressed header: measured 525 B (digits-cnn, 5 layers,
    20 float tensors), 887 B (ResNet-20, 20 + 96), 1,030 B (ResNet-18, 21 + 101) before layers carried a label,
    so 1 KB + 24 B per layer + 8 B per float tensor leaves room for the recorded config; plus, where layers
    record a label (``label_chars``: the longest, 0 for none), :data:`LABEL_FIRST_BYTES` plus :data:`LABEL_BYTES`
    per layer. Labels repeat from layer to layer, so zlib stores most as a back-reference of a few bytes;
    setting aside each label's entry uncompressed (about 20 B per layer) left every budget file 0.01 bits per
    weight under its target on ResNet-20. Where the labels take more (many distinct ones on a few layers), the
    file overshoots and :func:`cbdnet.format.fit.compress_encoded` retries with the target lowered by the excess."""
    labels = LABEL_FIRST_BYTES + layers * LABEL_BYTES if label_chars else 0
    return 1024 + 24 * layers + 8 * floats + labels


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A state-dict tensor as numpy (bfloat16, which numpy lacks, as float32: exact)."""
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def _stored_bytes(array: np.ndarray, dtype: str, float32: bool, varying: bool) -> int:
    """:func:`stored_float_bytes`, or where ``varying`` and the tensor is constant now, what it will take once
    its values differ (float16 unless ``float32``)."""
    if varying and constant_value(array) is not None:
        return (4 if float32 or dtype == "float64" else 2) * int(array.size)
    return stored_float_bytes(array, dtype, float32)


def file_overhead_bits(model: nn.Module, coded: set[str], float32: bool, folded: Iterable[str] = (),
                       label_chars: int = 0, biases_vary: bool = True) -> int:
    """What the file stores beside the coded layers, in bits: container, header allowance (each layer's label
    at most ``label_chars`` characters), and every other state-dict tensor as the file will store it (float16
    where exact enough, unless ``float32``; the ``folded`` BatchNorms' constant scale, mean and variance as one
    value each in the header; their bias as a varying tensor even where it is constant now, since bias
    correction shifts the running mean, which folding moves into it, unless ``biases_vary`` is False)."""
    constant = {f"{norm}.{part}" for norm in folded
                for part in ("weight", "running_mean", "running_var", "num_batches_tracked")}
    varying = {f"{norm}.bias" for norm in folded} if biases_vary else set()
    floats = {key: value for key, value in model.state_dict().items() if key not in coded}
    data = sum(_stored_bytes(_numpy(value), str(value.dtype).removeprefix("torch."), float32, key in varying)
               for key, value in floats.items() if key not in constant)
    return 8 * (CONTAINER_BYTES + header_allowance(len(coded), len(floats), label_chars) + data)


@dataclass
class CompressCache:
    """What a budgeted :func:`compress` computed before choosing codes (calibration statistics, every layer's
    candidate search), kept so that a second call on the same model, data and settings, with only the target
    changed, starts from them: :func:`cbdnet.format.fit.compress_encoded`'s retry after the file overshot its
    target. A call whose layers or settings differ computes everything again."""

    key: tuple | None = None
    calib: _Calibration | None = None
    searches: dict[str, LayerSearch] = field(default_factory=dict)

    def close(self) -> None:
        """Close the temporary file the statistics' second moments were moved to (the cache is done)."""
        if self.calib is not None:
            self.calib.close()


def _cache_key(config, settings: CalibrationConfig, layers, calibration, float32: bool, fold_bn: bool) -> tuple:
    fields = tuple(sorted((k, str(v)) for k, v in config.to_dict().items() if k != "target_bits"))
    return (fields, str(settings.to_dict()), tuple((name, tuple(coded_weight(m).shape)) for name, m in layers),
            id(calibration), float32, fold_bn)


def _check_reachable(config: BudgetConfig, originals: dict, overhead_bits: int) -> None:
    """Refuse, before any candidate is computed, a target below a lower bound of every candidate's size."""
    params = sum(weight.size for weight in originals.values())
    floor = overhead_bits + sum(min_layer_bits(weight.shape) for weight in originals.values())
    if floor > config.target_bits * params:
        raise CBDError(f"target_bits {config.target_bits}: the budget is below the cheapest setting (at least "
                       f"{floor / params:.3f} bits/weight: the float tensors, header and steps alone take "
                       f"{floor:,} bits)")


def _budget_encoder(config: BudgetConfig, originals: dict, calib: _Calibration, gptq: bool,
                    overhead_bits: int = 0, half: bool = False, searches: dict | None = None,
                    progress: bool = False, uncorrected_bits: int | None = None) -> tuple[Encoder, dict]:
    """The budget's encoder and choices. ``uncorrected_bits``: the file's overhead where no folded BatchNorm's
    constant bias is made to vary (bias correction not kept), tried where ``overhead_bits`` leaves too little:
    the summary then says ``"bias_correction": False``."""
    _check_reachable(config, originals, overhead_bits if uncorrected_bits is None else uncorrected_bits)
    searches = {} if searches is None else searches
    with single_thread(), stage_bar(len(originals), "budget: screen", progress) as bar:
        for name, weight in originals.items():
            bar.set_postfix_str(name, refresh=False)
            if name not in searches:
                check_finite(weight, name)
                searches[name] = LayerSearch(np.asarray(weight, np.float32), calib.stats.get(name), gptq,
                                             config.rtn_bits, config.composite_planes, config.levels, half,
                                             config.weighted_levels, config.sensitivity_exponents)
            searches[name].estimates()
            bar.update()
    params = sum(weight.size for weight in originals.values())
    stage = "budget: gptq" if gptq else "budget: code"
    try:  # the whole file: the layers get what the header, float tensors and container leave
        with single_thread(), stage_bar(len(originals), stage, progress) as bar:
            def refined(name: str, new: int) -> None:
                bar.set_postfix_str(f"{name} (+{new})", refresh=False)
                bar.update(0 if bar.n >= bar.total else 1)
            try:
                chosen = choose_refined(searches, config.target_bits * params - overhead_bits, progress=refined)
                room = True
            except ValueError:
                if uncorrected_bits is None or uncorrected_bits >= overhead_bits:
                    raise
                overhead_bits, room = uncorrected_bits, False  # no room for the biases bias correction makes
                chosen = choose_refined(searches, config.target_bits * params - overhead_bits, progress=refined)
        for search in searches.values():  # d x d floats per layer: not held through refit
            search.release()
    except ValueError as exc:
        raise CBDError(f"target_bits {config.target_bits}: {exc}") from None
    summary = {"chosen": {name: c.label for name, c in chosen.items()}, "overhead_bits": overhead_bits,
               "predicted_loss_increase": sum(c.loss for c in chosen.values()),
               "exact_candidates": sum(sum(e is not None for e in s.exact) for s in searches.values()),
               "candidate_families": sum(len(s.plans) for s in searches.values())}
    if not room:
        summary["bias_correction"] = False
    return (lambda name, weight: chosen[name].code), summary


def _encoder(config: CompressConfig, originals: dict, calib: _Calibration, gptq: bool,
             overhead_bits: int = 0, half: bool = False, searches: dict | None = None,
             progress: bool = False, uncorrected_bits: int | None = None) -> tuple[Encoder, dict]:
    """The per-layer encoder of ``config`` (and the budget's choices); ``half``: grid steps in float16;
    ``searches``: the budget's per-layer candidate searches so far (filled in)."""
    if isinstance(config, BudgetConfig):
        return _budget_encoder(config, originals, calib, gptq, overhead_bits, half, searches, progress,
                               uncorrected_bits)
    if isinstance(config, RTNConfig):
        return _rtn_encoder(config, originals, calib, gptq, half), {}
    if isinstance(config, UniformConfig):
        return (lambda name, weight: encode_uniform(weight, config.planes, name)), {}
    if config.granularity == "channel":
        return _checked(lambda name, weight: encode_composite_grouped(weight, config.planes, config.bottleneck,
                                                                      config.granularity)), {}
    fallback = config.fallback
    assert fallback is not None  # CBDConfig sets it wherever granularity is "tensor"
    return (lambda name, weight: encode_weight(weight, config.planes, config.bottleneck, name=name,
                                               fallback=fallback)), {}


def _correct(model: nn.Module, originals: dict, calib: _Calibration, settings: CalibrationConfig,
             loss_compressed: float | None = None) -> dict:
    """Corrections applied to the compressed model, and the calibration figures for the report
    (``loss_compressed``: the model's calibration loss as it is now, where the caller already has it)."""
    data = calib.data
    assert data is not None, "corrections without calibration data"  # the caller corrects only with data
    if loss_compressed is None:
        loss_compressed = calibration_loss(model, data)
    corrected = []
    if settings.bias_correction == "auto":
        corrected = bias_correct_if_better(model, originals, calib.stats, data, loss_compressed)
    elif settings.bias_correction:
        corrected = bias_correct(model, originals, calib.stats)
    bns = reestimate_bn(model, data) if settings.bn_reestimate else 0
    return {"spec": data.name, "images": len(data), "pseudo_labels": data.pseudo_labels,
            "seconds_stats": round(calib.seconds, 2), "loss_compressed": loss_compressed,
            "bias_corrected_layers": len(corrected), "bn_reestimated": bns, "loss_before": calib.loss_before,
            "loss_after": calibration_loss(model, data)}


def round_floats(model: nn.Module) -> int:
    """Round, in place, every float tensor the file stores (BatchNorm, biases) to float16 where that keeps
    float16's full precision (:func:`cbdnet.codec.floats.as_float16`): the model then holds exactly what the
    file will. Returns how many tensors were rounded."""
    rounded = 0
    with torch.no_grad():
        for value in float_state(model).values():
            dtype = str(value.dtype).removeprefix("torch.")
            half = as_float16(_numpy(value), dtype)
            if half is not None:
                value.copy_(torch.from_numpy(half.astype(np.float32)).to(value.dtype))
                rounded += 1
    return rounded


def round_steps(model: nn.Module) -> int:
    """Round, in place, the per-group steps of every grid-coded layer to float16 where that keeps float16's
    full precision (:func:`cbdnet.codec.grid.half_steps`; a folded BatchNorm's scale moved them off float16's
    values): the file then stores them in 2 bytes each. A weight shared by several layers keeps its steps (one
    code, coded once; rounding it per layer would untie it). Returns how many layers' steps changed."""
    changed = 0
    own_code = owns_its_code(model)
    for module in model.modules():
        code = getattr(module, "code", None)
        if isinstance(code, GridCode) and own_code(module):
            steps = half_steps(code.scales())
            if not np.array_equal(steps, code.scales()):
                replace_steps(module, steps)
                changed += 1
    return changed


def _recount_coded_bits(model: nn.Module, report: Report) -> None:
    """The report's stored sizes after the steps changed width (the levels' coding is unchanged)."""
    modules = dict(model.named_modules())
    for layer in report.layers:
        code = getattr(modules.get(layer.name), "code", None)
        if code is not None:
            layer.coded_bits = code.coded_bits()
            layer.coded_bits_per_weight = layer.coded_bits / code.numel


def _refine_if_better(model: nn.Module, float_model: nn.Module, names: list[str], calib: _Calibration,
                      steps: int):
    """:func:`refine_rounding`, undone unless it lowers the whole model's calibration loss (block errors can
    fall while the task loss rises: on ResNet-20 at 2.5 bits the reported loss went 0.577 -> 0.604)."""
    data = calib.data
    assert data is not None, "learned rounding without calibration data"  # the caller refines only with data
    codes = {name: _code(model, name) for name in names}
    loss_before = calibration_loss(model, data)
    rounding = refine_rounding(model, float_model, names, data, steps)
    rounding.loss = (loss_before, calibration_loss(model, data) if rounding.layers_changed else loss_before)
    if rounding.loss[1] >= rounding.loss[0] and rounding.layers_changed:
        for name in rounding.layers_changed:
            _cbd_module(model, name).set_code(codes[name])
        rounding.undone = True
    return rounding


def _refresh_layers(model: nn.Module, report: Report, originals: dict, names: list[str]) -> None:
    """The report's entries of the layers whose levels changed after the walk (learned rounding)."""
    changed = set(names)
    for index, old in enumerate(report.layers):
        if old.name in changed:
            report.layers[index] = layer_report(old.name, model.get_submodule(old.name), _code(model, old.name),
                                                originals[old.name].astype(np.float64), old.seconds,
                                                old.output_positions)


def _cbd_module(model: nn.Module, name: str) -> CBDModule:
    module = model.get_submodule(name)
    if not isinstance(module, CBDModule):
        raise TypeError(f"layer {name} is not a compressed layer")
    return module


def _code(model: nn.Module, name: str) -> LayerCode:
    """The code of the compressed layer ``name`` (every layer the walk compressed carries one)."""
    code = _cbd_module(model, name).code
    assert code is not None, f"layer {name} carries no code"  # set_code gave it one
    return code


def _check_config(config) -> CompressConfig:
    if config is None:
        return CBDConfig()
    if not isinstance(config, (CBDConfig, UniformConfig, RTNConfig, BudgetConfig)):
        raise CBDError(f"config must be a CBDConfig, UniformConfig, RTNConfig or BudgetConfig, got "
                       f"{type(config).__name__}")
    return config


def _device_of(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def compress(model: nn.Module, config: CompressConfig | None = None, *, calibration: Iterable | None = None,
             calibration_config: CalibrationConfig | None = None, skip: Iterable[str] = (), progress: bool = True,
             workers: int | None = None, input_shape: tuple[int, ...] | None = None, float32: bool = False,
             fold_bn: bool = True, cache: CompressCache | None = None) -> tuple[nn.Module, Report]:
    """Compress every Conv2d/ConvTranspose2d/Linear (and the packed ``in_proj_weight`` of every
    ``nn.MultiheadAttention``) of ``model`` in place; returns ``(model, report)``.

    ``config``: :class:`CBDConfig` (default: the paper's code, J=5, bottleneck 0.3), :class:`UniformConfig`,
    :class:`RTNConfig` or :class:`BudgetConfig`. ``calibration``: any iterable of image batches or
    ``(images, labels)`` pairs (a ``DataLoader``, a list of tensors; training images, never test images), used
    as ``calibration_config`` says. ``skip`` names layers to keep in float (each must be a layer of the model).
    ``workers`` layers are encoded at once in threads; the result does not depend on it. ``input_shape`` adds
    per-sample operation counts to the report. The model remembers the config, so :func:`cbdnet.save` records
    it in the file. The float tensors the file stores (BatchNorm, biases) are rounded to float16 where that keeps
    float16's full precision, as the file stores them (``float32=True``: kept as they are, and so saved).
    ``fold_bn``: fold each BatchNorm that follows a layer coded with per-channel steps into those steps
    (:mod:`cbdnet.nn.fold`), so that the file stores only its shift. ``cache``: a :class:`CompressCache` that
    keeps the calibration statistics and the budget's candidates for a second call with another target. With
    calibration data the model is moved to ``calibration_config.device`` for the calibration (forward/backward
    passes, statistics, refit) and back to its own device afterwards.
    """
    settings = calibration_config or CalibrationConfig()
    if not isinstance(settings, CalibrationConfig):
        raise CBDError(f"calibration_config must be a CalibrationConfig, got {type(settings).__name__}")
    home = _device_of(model)
    device = resolve_device(settings.device) if calibration is not None else home
    if device == home:
        return _compress(model, config, calibration, settings, skip, progress, workers, input_shape, float32, fold_bn,
                         cache)
    model.to(device)  # the calibration runs where it was asked to; the model goes back where it was
    try:
        return _compress(model, config, calibration, settings, skip, progress, workers, input_shape, float32,
                         fold_bn, cache)
    finally:
        model.to(home)


def _original(weight: torch.Tensor) -> np.ndarray:
    """A layer's weight as the budget and the corrections read it: float32 where that holds it exactly (float32,
    float16 and bfloat16 weights; the searches share the array, no copy), float64 otherwise. Every use widens it
    to float64 where it computes in float64 (``W_hat - W``), so the values are those of a float64 copy."""
    exact = weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
    # a copy: the model's own parameter may change in place later (a restore), the originals must not
    return weight.detach().to("cpu", torch.float32 if exact else torch.float64, copy=True).numpy()


def _compress(model: nn.Module, config, calibration, settings: CalibrationConfig, skip, progress: bool, workers,
              input_shape, float32: bool, fold_bn: bool, cache: CompressCache | None) -> tuple[nn.Module, Report]:
    start = time.perf_counter()
    config = _check_config(config)
    skip = check_skip(model, skip)
    layers = compressible_layers(model, skip)
    originals = {name: _original(coded_weight(m)) for name, m in layers}
    key = _cache_key(config, settings, layers, calibration, float32, fold_bn)
    if cache is not None and cache.key == key and cache.calib is not None:
        calib = cache.calib
        calib.restore_second_moments()  # a retry: the statistics of the first try, read back
    else:
        calib = _calibrate(model, layers, calibration, settings)
        if cache is not None:
            cache.key, cache.calib, cache.searches = key, calib, {}
    gptq = bool(settings.gptq and calib.stats)
    refit = settings.refit and gptq and (isinstance(config, BudgetConfig)
                                         or isinstance(config, RTNConfig) and config.granularity == "channel")
    float_model = copy.deepcopy(model) if (settings.adaround or refit) and calib.data is not None else None
    overhead, uncorrected = 0, None
    if isinstance(config, BudgetConfig):  # every candidate is a per-channel grid: the pairs found now will fold
        folds = foldable_norms(model, {name for name, _ in layers}) if fold_bn else []
        labels = candidate_labels(config.rtn_bits, config.composite_planes, config.levels, config.weighted_levels,
                                  config.sensitivity_exponents)
        coded = {coded_key(name, m) for name, m in layers}
        longest = max(map(len, labels), default=0)
        overhead = file_overhead_bits(model, coded, float32, folds, longest)
        if settings.bias_correction == "auto" and calib.data is not None:  # "auto" may do without, if it must
            uncorrected = file_overhead_bits(model, coded, float32, folds, longest, biases_vary=False)
    encoder, chosen = _encoder(config, originals, calib, gptq, overhead, half=not float32,
                               searches=None if cache is None else cache.searches, progress=progress,
                               uncorrected_bits=uncorrected)
    calib.release_second_moments(keep=cache is not None)  # every code is chosen (the walk only looks them up)
    if chosen.get("bias_correction") is False:  # the layers took the room a corrected bias would need
        overhead = chosen["overhead_bits"]
        settings = dataclasses.replace(settings, bias_correction=False)
    recorded = {**config.to_dict(), "skip": skip, "fold_bn": fold_bn, "float32": float32}
    if calib.data is not None:
        recorded["calibration"] = {**settings.to_dict(), "gptq": gptq}
    model, report = compress_layers(model, encoder, skip=skip, config=recorded, progress=progress, workers=workers,
                                    input_shape=input_shape)
    rounding = refitted = None
    if refit and float_model is not None:  # (refit needs statistics, so calibration data: float_model is there)
        spare = None
        if isinstance(config, BudgetConfig):  # refit may spend what the budget left, never more
            params = sum(weight.size for weight in originals.values())
            used = sum(_code(model, name).coded_bits() for name, _ in layers)
            spare = config.target_bits * params - overhead - used
        refitted = refit_levels(model, float_model, [name for name, _ in layers], calib.data, spare_bits=spare)
        _refresh_layers(model, report, originals, [] if refitted.undone else refitted.layers_changed)
    if float_model is not None and settings.adaround:
        rounding = _refine_if_better(model, float_model, [name for name, _ in layers], calib, settings.adaround)
        _refresh_layers(model, report, originals, rounding.layers_changed)
    del float_model
    if calib.data is not None:
        loss_now = None if rounding is None else rounding.loss[0] if rounding.undone else rounding.loss[1]
        report.extra["calibration"] = {**_correct(model, originals, calib, settings, loss_now), **chosen}
        if rounding is not None:
            report.extra["calibration"]["adaround"] = rounding.to_dict()
        if refitted is not None:
            report.extra["calibration"]["refit"] = refitted.to_dict()
    elif chosen:
        report.extra["budget"] = chosen
    if fold_bn:
        report.extra["folded_batchnorm"] = fold_batchnorm(model)
    if not float32:
        report.extra["float16_tensors"] = round_floats(model)
        report.extra["float16_steps"] = round_steps(model)
        _recount_coded_bits(model, report)
    report.float_tensors = {key: 8 * stored_float_bytes(_numpy(value), str(value.dtype).removeprefix("torch."), True)
                            for key, value in float_state(model).items()}  # as the file will store them
    report.seconds = time.perf_counter() - start
    record(model, config=recorded)
    return model, report
