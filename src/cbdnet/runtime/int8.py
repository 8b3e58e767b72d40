"""The int8 runtime: a compressed model on PyTorch's int8 CPU kernels, its weights exactly the stored codes.

Every code cbdnet writes is "signed integer levels times a float32 step" (:meth:`cbdnet.codec.LayerCode.levels`,
the step per tensor or per output channel). :func:`to_int8` builds a ``torch.ao`` FX graph-mode quantized model
(x86 backend: fbgemm/oneDNN kernels; no kernel of our own) and then replaces each converted Conv2d/Linear's
packed weight by a per-channel ``qint8`` tensor whose ``int_repr()`` *is* the levels and whose scales *are* the
steps (zero points 0): the weights are not quantized a second time. The default weight observers only serve to
get through ``convert_fx``.

Fused BatchNorm: where FX folds an eval BatchNorm ``y = a * conv(x) + b`` (``a = gamma / sqrt(var + eps)``,
per channel) into the convolution, the folded weight of channel ``c`` is ``levels_c * step_c * a_c``. The int8
weight keeps the levels and moves the factor into the scale: ``scale_c = float32(step_c * |a_c|)`` and
``levels_c -> levels_c * sign(a_c)`` (a negative factor flips the channel's levels; ``a_c = 0`` or a level of
-128 that a flip would take to +128 keeps the layer in float). ``int_repr()`` is then ``levels * sign(a)``.

Activations are quantized (uint8, the x86 default: histogram observers, ``reduce_range``) with scales
calibrated on the given images. A layer stays float, and the report says why, when it has no code (not
compressed), its levels do not fit int8 (e.g. a 9-bit or wider code), it is a ConvTranspose2d or uses a
non-zero padding mode, or the backend left it float.

``torch.ao.quantization`` is deprecated in favour of torchao's PT2E flow, but it is still PyTorch's maintained
eager/FX path in torch 2.x; torchao's PT2E x86 quantizer fails on common torchvision models (a ReLU module used
twice, as in ResNet-18), so FX is used here.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..calib import CalibrationConfig, as_calibration_set
from ..errors import CBDError
from ..nn import CBDConv2d, CBDConvTranspose2d, CBDLinear, CBDModule
from ..nn.state import record, recorded

__all__ = ["to_int8", "Int8Report", "Int8Layer", "model_bytes", "INT8_MIN", "INT8_MAX"]

INT8_MIN, INT8_MAX = -128, 127
BACKEND = "x86"
_PLAIN: dict[type, type] = {CBDConv2d: nn.Conv2d, CBDLinear: nn.Linear, CBDConvTranspose2d: nn.ConvTranspose2d}
_CODE_ATTRIBUTES = ("_code", "code_source", "_coded_weight")  # what a CBD module keeps beside nn.Module's state
_QPARAM_BYTES = 16  # per output channel: a float64 scale and an int64 zero point, as torch stores them


@dataclass
class Int8Layer:
    """One weight layer of the int8 model."""

    name: str
    runtime: str  # "int8" or "float"
    reason: str
    params: int
    weight_bytes: int  # bytes of this layer's weight in the runtime (int8: 1 per weight + per-channel qparams)
    bn_folded: bool = False


@dataclass
class Int8Report:
    """Which layers run in int8, why the others stay float, and the weight bytes."""

    layers: list[Int8Layer]
    backend: str = BACKEND
    calibration_images: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def int8_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.runtime == "int8"]

    @property
    def float_layers(self) -> list[str]:
        return [layer.name for layer in self.layers if layer.runtime == "float"]

    @property
    def weight_bytes(self) -> int:
        return sum(layer.weight_bytes for layer in self.layers)

    @property
    def fp32_weight_bytes(self) -> int:
        return sum(4 * layer.params for layer in self.layers)

    def to_dict(self) -> dict:
        return {**asdict(self), "weight_bytes": self.weight_bytes, "fp32_weight_bytes": self.fp32_weight_bytes}

    def __str__(self) -> str:
        lines = [f"int8 runtime ({self.backend}): {len(self.int8_layers)}/{len(self.layers)} layers int8, weights "
                 f"{self.weight_bytes / 2**20:.2f} MiB vs {self.fp32_weight_bytes / 2**20:.2f} MiB FP32"]
        lines += [f"  {layer.name:40s} {layer.runtime:5s} {layer.reason}" for layer in self.layers]
        return "\n".join(lines)


@dataclass
class _Plan:
    levels: np.ndarray  # integer, the weight's shape
    steps: np.ndarray  # float32 [out]


# ---------------------------------------------------------------- which layers can run in int8

def _float_reason(module: nn.Module, levels: np.ndarray) -> str:
    if isinstance(module, nn.ConvTranspose2d):
        return "ConvTranspose2d: no int8 path used here (x86 FX)"
    if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r}: no int8 kernel"
    low, high = int(levels.min(initial=0)), int(levels.max(initial=0))
    if low < INT8_MIN or high > INT8_MAX:
        return f"levels [{low}, {high}] exceed int8 [{INT8_MIN}, {INT8_MAX}]"
    return ""


def _plan(model: nn.Module) -> tuple[list[Int8Layer], dict[str, _Plan]]:
    """Per weight layer: int8 (with its levels and per-channel steps) or float with a reason."""
    layers, plans = [], {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            continue
        params = module.weight.numel()
        code = module.code if isinstance(module, CBDModule) else None
        if code is None:
            layers.append(Int8Layer(name, "float", "not compressed (no code)", params, 4 * params))
            continue
        levels, steps = code.levels()
        reason = _float_reason(module, levels)
        layers.append(Int8Layer(name, "float", reason, params, 4 * params))
        if not reason:
            steps = np.broadcast_to(np.asarray(steps, np.float32).reshape(-1), (levels.shape[0],)).copy()
            plans[name] = _Plan(levels, steps)
    return layers, plans


def _plain_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose CBD modules are plain Conv2d/Linear/ConvTranspose2d with the decoded weights
    (FX matches module types exactly), without copying the codes."""
    memo: dict[int, object] = {}
    for module in model.modules():
        if isinstance(module, CBDModule):
            for attribute in _CODE_ATTRIBUTES:
                if module.__dict__.get(attribute) is not None:
                    memo[id(module.__dict__[attribute])] = None
    plain = copy.deepcopy(model, memo).eval()
    for module in plain.modules():
        if type(module) in _PLAIN:
            module.__class__ = _PLAIN[type(module)]
            for attribute in _CODE_ATTRIBUTES:
                module.__dict__.pop(attribute, None)
    return plain


def _bn_factors(model: nn.Module) -> dict[str, np.ndarray]:
    """Conv name -> ``a = gamma / sqrt(var + eps)`` of the BatchNorm2d that FX fuses into it (the conv's output
    feeds only that BatchNorm)."""
    import torch.fx

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # untraceable: prepare_fx reports it
        return {}
    modules = dict(model.named_modules())
    factors: dict[str, np.ndarray] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0]
        if isinstance(source, torch.fx.Node) and source.op == "call_module" and len(source.users) == 1 \
                and type(modules.get(source.target)) is nn.Conv2d:
            bn = modules[node.target]
            weight = bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)
            factor = weight.double() * torch.rsqrt(bn.running_var.double() + bn.eps)
            factors[str(source.target)] = factor.float().numpy()
    return factors


# ---------------------------------------------------------------- building the int8 model

class _NoLabels(nn.Module):
    """Stands in for a model when unlabelled calibration batches are materialised: labels are not used here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros(x.shape[0], 1)


def _calibration_images(calibration, config: CalibrationConfig | None) -> torch.Tensor:
    if calibration is None:
        raise CBDError("the int8 runtime needs calibration images (training images, never test images) to set "
                       "the activation scales: pass calibration=...")
    if config is not None and not isinstance(config, CalibrationConfig):
        raise CBDError(f"calibration_config must be a CalibrationConfig, got {type(config).__name__}")
    limit = None if config is None else config.images
    return as_calibration_set(calibration, _NoLabels(), limit=limit).images


def _prepare(plain: nn.Module, float_names: list[str], example: torch.Tensor) -> torch.fx.GraphModule:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    mapping = get_default_qconfig_mapping(BACKEND)
    for name in float_names:
        mapping.set_module_name(name, None)
    try:
        return prepare_fx(plain, mapping, (example,))
    except Exception as exc:  # torch.fx tracing errors come in many types
        message = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CBDError(f"the int8 runtime cannot trace this model with torch.fx: {message}") from None


def _qweight(levels: np.ndarray, scales: np.ndarray) -> torch.Tensor:
    """A per-channel qint8 tensor with exactly these integer values and (float32) scales, zero points 0."""
    ints = torch.from_numpy(np.ascontiguousarray(levels, dtype=np.int8))
    scales64 = torch.from_numpy(np.asarray(scales, dtype=np.float32).astype(np.float64))
    return torch._make_per_channel_quantized_tensor(ints, scales64, torch.zeros(len(scales64), dtype=torch.int64), 0)


def _bn_reason(plan: _Plan, factor: np.ndarray) -> str:
    """Why a conv with this fused BatchNorm factor cannot keep exact levels in int8 ("" if it can)."""
    if np.any(factor == 0) or not np.all(np.isfinite(factor)):
        return "BatchNorm factor 0 or non-finite in a channel"
    flipped = plan.levels[factor < 0]
    if flipped.size and int(flipped.min()) == INT8_MIN:
        return "level -128 under a negative BatchNorm factor would be +128: no int8"
    return ""


def _set_exact(name: str, qmodule: Any, plan: _Plan, factor: np.ndarray | None) -> None:
    # qmodule: a torch.ao quantized module, where weight() and bias() are methods (not typed as such by torch)
    """Replace the converted module's weight by the levels (sign-flipped and rescaled by a fused BatchNorm)."""
    levels, scales = plan.levels, plan.steps
    if factor is not None:
        levels = levels * np.where(factor < 0, -1, 1).reshape((-1,) + (1,) * (levels.ndim - 1))
        scales = (plan.steps * np.abs(factor)).astype(np.float32)
    exact = _qweight(levels, scales)
    observed = qmodule.weight()  # the backend's own rounding of the same (folded) float weight
    tolerance = float(scales.max()) + float(observed.q_per_channel_scales().max())
    if not torch.allclose(observed.dequantize(), exact.dequantize(), rtol=0, atol=tolerance):
        raise RuntimeError(f"int8 runtime: layer {name}: the converted weight is not levels * steps (BatchNorm "
                           "folding not recognised)")
    qmodule.set_weight_bias(exact, qmodule.bias())
    packed = qmodule.weight()
    if not (torch.equal(packed.int_repr(), exact.int_repr())
            and torch.equal(packed.q_per_channel_scales(), exact.q_per_channel_scales())):
        raise RuntimeError(f"int8 runtime: layer {name}: the packed weight differs from the levels")


def _strip_string_annotations(qmodel: nn.Module) -> None:
    """``from __future__ import annotations`` in a model's file reaches the generated forward as string types,
    which ``torch.jit.script`` cannot resolve: drop them."""
    if not isinstance(qmodel, torch.fx.GraphModule):
        return
    graph = qmodel.graph
    if any(isinstance(node.type, str) for node in graph.nodes):
        for node in graph.nodes:
            if isinstance(node.type, str):
                node.type = None
        qmodel.recompile()


def to_int8(model: nn.Module, calibration: Iterable, *, example_input: torch.Tensor | None = None,
            calibration_config: CalibrationConfig | None = None) -> tuple[nn.Module, Int8Report]:
    """An int8 copy of a compressed ``model`` (its CBD modules carry ``.code``) whose Conv2d/Linear weights are
    exactly the stored integer levels with the stored steps as per-channel scales; ``model`` is not changed.

    ``calibration``: any iterable of image batches or ``(images, labels)`` pairs that
    :func:`cbdnet.calib.as_calibration_set` accepts (training images), used to set the activation scales
    (``calibration_config.images`` limits how many). ``example_input`` (default: the first calibration image)
    is what FX traces with. Returns ``(qmodel, report)``; the model runs on the CPU and is scriptable.
    """
    if not any(isinstance(m, CBDModule) for m in model.modules()):
        raise CBDError("the int8 runtime runs a compressed model: run cbdnet.compress(model) or cbdnet.load(path) "
                       "first")
    if BACKEND not in torch.backends.quantized.supported_engines:
        raise CBDError(f"this PyTorch build has no {BACKEND} quantized engine "
                       f"({torch.backends.quantized.supported_engines})")
    images = _calibration_images(calibration, calibration_config)
    example = images[:1] if example_input is None else example_input
    layers, plans = _plan(model)
    plain = _plain_copy(model)
    factors = _bn_factors(plain)
    for layer in layers:
        reason = _bn_reason(plans[layer.name], factors[layer.name]) if layer.name in plans and layer.name in factors \
            else ""
        if reason:
            layer.reason = reason
            del plans[layer.name]
    torch.backends.quantized.engine = BACKEND
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qmodel = _convert(plain, [layer.name for layer in layers if layer.name not in plans], images, example)
    del plain
    qmodules = dict(qmodel.named_modules())
    for layer in layers:
        if layer.name in plans:
            _finish_layer(layer, qmodules.get(layer.name), plans[layer.name], factors.get(layer.name))
    _strip_string_annotations(qmodel)
    qmodel.eval()
    if recorded(model, "arch") is not None:
        record(qmodel, arch=recorded(model, "arch"), arch_kwargs=recorded(model, "arch_kwargs", {}))
    notes = sorted({f"{w.category.__name__}: {str(w.message).strip().splitlines()[0][:160]}" for w in caught})
    return qmodel, Int8Report(layers, BACKEND, int(images.shape[0]), notes)


def _convert(plain: nn.Module, float_names: list[str], images: torch.Tensor,
             example: torch.Tensor) -> torch.fx.GraphModule:
    from torch.ao.quantization.quantize_fx import convert_fx

    prepared = _prepare(plain, float_names, example)
    batch = max(1, min(32, 32 * 32 * 32 * 32 // max(1, int(np.prod(images.shape[-2:])))))
    with torch.no_grad():
        for start in range(0, images.shape[0], batch):
            prepared(images[start:start + batch])
    qmodel = convert_fx(prepared)
    _forget_traced_models(qmodel)
    return qmodel


def _forget_traced_models(qmodel: torch.fx.GraphModule) -> None:
    """Drop what ties the int8 model to the float one. Each graph node's ``target_dtype_info`` (used by
    prepare/convert only) holds observer constructors whose closures reference the float modules, and torch.ao
    memoises ``assert_and_get_unique_device(module)`` in an unbounded ``lru_cache``: either would keep the
    observed float model (FP32 weights, histogram observers) alive as long as the int8 model."""
    for node in qmodel.graph.nodes:
        node.meta.pop("target_dtype_info", None)
    try:
        from torch.ao.quantization.fx import utils as fx_utils

        fx_utils.assert_and_get_unique_device.cache_clear()
    except (ImportError, AttributeError):  # a torch without that cache: nothing held
        pass


def _finish_layer(layer: Int8Layer, qmodule: Any, plan: _Plan, factor: np.ndarray | None) -> None:
    if qmodule is None or not hasattr(qmodule, "set_weight_bias"):
        layer.reason = f"the backend left it float ({type(qmodule).__name__})"
        return
    _set_exact(layer.name, qmodule, plan, factor)
    layer.runtime = "int8"
    layer.bn_folded = factor is not None
    layer.reason = "exact levels; BatchNorm folded into the scales" if factor is not None else "exact levels"
    layer.weight_bytes = _quantized_bytes(qmodule.weight())


# ---------------------------------------------------------------- memory accounting

def _quantized_bytes(tensor: torch.Tensor) -> int:
    size = tensor.numel() * tensor.element_size()
    if tensor.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return size + _QPARAM_BYTES * tensor.q_per_channel_scales().numel()
    return size + _QPARAM_BYTES


def _tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return _quantized_bytes(value) if value.is_quantized else value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_tensor_bytes(item) for item in value)
    return 0


def model_bytes(model: nn.Module) -> int:
    """Bytes of a model's state: parameters, buffers and (int8) packed weights and biases, each tensor once.
    (A ``cbdnet.load`` model's layer codes are plain arrays beside this: count ``code.tensors()`` for them.)"""
    seen: set = set()
    total = 0
    for value in model.state_dict(keep_vars=True).values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if not isinstance(item, torch.Tensor):
                continue
            key = id(item) if item.is_quantized else (item.untyped_storage().data_ptr(), item.data_ptr(),
                                                      item.numel())
            if key not in seen:
                seen.add(key)
                total += _tensor_bytes(item)
    return total
