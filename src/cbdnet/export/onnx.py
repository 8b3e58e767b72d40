"""Export a loaded compressed model as a QDQ ONNX file whose weights are the stored integer codes.

Every compressed layer (a module carrying ``.code``) has ``weight == levels * steps`` with integer ``levels``
(:meth:`cbdnet.codec.LayerCode.levels`). Its weight becomes an **int8 initializer holding exactly those levels**,
followed by ``DequantizeLinear`` whose scale is the code's float32 step (per output channel, ``axis`` 0, or per
tensor) and whose zero point is 0: no second quantization.

BatchNorm folding: a ``BatchNormalization`` that alone consumes a compressed ``Conv`` is folded into that
layer's DequantizeLinear scale and a float bias, ``scale_c = step_c * gamma_c / sqrt(var_c + eps)``. A scale must
be positive, so **a channel whose BN factor is negative stores its levels negated** (``-levels``, still exact
integers; a level of -128 cannot be negated, and such a layer keeps its BN unfolded). So the int8 initializer
equals the code's levels times ``sign(gamma_c)`` per output channel.

With ``int8=True`` the float activations around the quantized nodes (and around Add, pooling, Flatten, ... as
ONNX Runtime's own QDQ quantizer places them) get QuantizeLinear -> DequantizeLinear pairs with
calibrated scales; biases become int32 with scale ``x_scale * w_scale``; a Relu after a quantized node is
absorbed into the asymmetric (uint8 by default) output quantization. Each activation's range is the one
whose quantization has the least squared error over the calibration set (``"mse"``, default; ``"minmax"``: the
observed extremes). ONNX Runtime then fuses the graph into
integer kernels (QLinearConv, QLinearAdd, QGemm...). uint8 activations are the default because on AVX2 CPUs ORT
fuses every Conv with them, but only some with int8 activations.

Opset 17: per-axis DequantizeLinear needs opset >= 13; 17 is the newest opset that torch's TorchScript exporter,
ONNX Runtime's QDQ fusions and the common other runtimes all handle, and opsets 19-21 only add float8/int4/
blocked quantization, which these codes do not need.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from .._version import __version__
from ..errors import CBDError
from ..format import atomic_write, check_writable

__all__ = ["ExportReport", "LayerExport", "export_onnx", "OPSET", "build_proto", "CALIBRATION_METHODS"]

OPSET = 17
_WEIGHT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# float tensors that ORT's QDQ quantizer puts Q/DQ on (inputs and outputs of these ops)
_ACT_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "MaxPool", "AveragePool",
            "GlobalAveragePool", "Flatten", "Reshape", "Pad", "Slice", "Concat", "Transpose", "Squeeze",
            "Unsqueeze", "Resize", "Split", "Relu", "Clip"}
_SAME_AS_INPUT = {"Slice", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "MaxPool", "Pad"}
_RELU_ABSORBERS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"}
_ACT_RANGE = {"uint8": (0, 255, np.uint8), "int8": (-128, 127, np.int8)}
CALIBRATION_METHODS = ("mse", "minmax")
# x86 u8s8 kernels without VNNI (VPMADDUBSW, which ONNX Runtime uses on AVX2/AVX-512) add two u8*s8 products in
# int16 with saturation: 255 * (|w1| + |w2|) > 32767 once a weight level exceeds 64 in magnitude. Such a layer's
# input gets the 7-bit range 0..127 (127 * 256 <= 32767), as torch.ao's x86 ``reduce_range`` does everywhere.
_SATURATING_LEVEL = 64
_NARROW_QMAX = 127


# ------------------------------------------------------------------------------------------- report

@dataclass
class LayerExport:
    name: str
    runs_as: str  # "int8" (int8 levels + DequantizeLinear) or "float"
    reason: str = ""
    bn_folded: bool = False
    negated_channels: int = 0  # channels stored as -levels (negative BN factor)


@dataclass
class ExportReport:
    path: str
    bytes: int
    opset: int
    int8_activations: bool
    activations_quantized: int
    layers: list[LayerExport] = field(default_factory=list)
    activation_calibration: str = ""  # "mse" or "minmax" under int8
    narrow_activations: list[str] = field(default_factory=list)  # quantized to 0..127 (see _SATURATING_LEVEL)

    def to_dict(self) -> dict:
        return {"path": self.path, "bytes": self.bytes, "opset": self.opset,
                "int8_activations": self.int8_activations, "activations_quantized": self.activations_quantized,
                "activation_calibration": self.activation_calibration,
                "narrow_activations": list(self.narrow_activations),
                "layers": [vars(layer) for layer in self.layers],
                "float_layers": [layer.name for layer in self.layers if layer.runs_as == "float"]}


# ------------------------------------------------------------------------------------------- codes

@dataclass
class _Code:
    levels: np.ndarray  # int64, the weight's shape
    steps: np.ndarray  # float32 [1] or [shape[0]]


def _codes(model: nn.Module, report: list[LayerExport], int8: bool) -> dict[str, _Code]:
    """The int8-able codes of ``model``'s compressed layers; the others are reported as float (an error under
    ``int8``)."""
    codes: dict[str, _Code] = {}
    for name, module in model.named_modules():
        code = getattr(module, "code", None)
        if code is None or not hasattr(code, "levels"):
            continue
        if isinstance(module, nn.MultiheadAttention):  # the graph slices in_proj_weight into q/k/v: kept float
            why = "attention in_proj_weight: the exporter keeps it in float"
            if int8:
                raise CBDError(f"layer {name}: {why}; --int8 needs every compressed layer in int8 (export "
                               f"without --int8 keeps it in float)")
            report.append(LayerExport(name, "float", why))
            continue
        levels, steps = code.levels()
        levels = np.asarray(levels).astype(np.int64)
        steps = np.asarray(steps, np.float32).reshape(-1)
        lo, hi = int(levels.min(initial=0)), int(levels.max(initial=0))
        if lo < -128 or hi > 127:
            why = f"levels span [{lo}, {hi}], wider than int8"
            if int8:
                raise CBDError(f"layer {name}: {why}; --int8 needs every compressed layer in int8 "
                               f"(export without --int8 keeps it in float)")
            report.append(LayerExport(name, "float", why))
            continue
        _check_weight(name, module, levels, steps)
        codes[name] = _Code(levels, steps)
    if not codes and not report:
        raise CBDError("the model has no compressed layers (load a .cbd file first)")
    return codes


def _check_weight(name: str, module: nn.Module, levels: np.ndarray, steps: np.ndarray) -> None:
    assert isinstance(module.weight, torch.Tensor)
    weight = module.weight.detach().cpu().float().numpy()
    if levels.shape != weight.shape or steps.size not in (1, weight.shape[0]):
        raise CBDError(f"layer {name}: its code ({levels.shape}, {steps.size} steps) does not fit its weight "
                       f"{weight.shape}")
    expect = levels.astype(np.float32) * steps.reshape((-1,) + (1,) * (levels.ndim - 1))
    worst = float(np.abs(expect - weight).max(initial=0.0))
    if worst > 1e-5 * float(np.abs(expect).max(initial=0.0)) + 1e-12:
        raise CBDError(f"layer {name}: its weight is no longer levels * steps (max difference {worst:.3g}); "
                       f"was it edited after loading?")


# ------------------------------------------------------------------------------------------- graph helpers

class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self._count = 0

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}__{self._count}"

    def consumers(self, tensor: str) -> list[onnx.NodeProto]:
        return [n for n in self.g.node if tensor in n.input]

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return next((n for n in self.g.node if tensor in n.output), None)

    def const(self, name: str) -> np.ndarray | None:
        tensor = self.inits.get(name)
        return None if tensor is None else numpy_helper.to_array(tensor)

    def add_init(self, name: str, array: np.ndarray | np.generic) -> str:
        tensor = numpy_helper.from_array(np.array(array, order="C", copy=True), name)
        if name in self.inits:
            self.g.initializer.remove(self.inits[name])
        self.g.initializer.append(tensor)
        self.inits[name] = tensor
        return name

    def outputs(self) -> set[str]:
        return {o.name for o in self.g.output}

    def rename_input(self, old: str, new: str) -> None:
        for node in self.g.node:
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new

    def prune(self) -> None:
        used = {i for n in self.g.node for i in n.input} | self.outputs()
        for name in [k for k in self.inits if k not in used]:
            self.g.initializer.remove(self.inits.pop(name))


def _fold_constants(gr: _Graph) -> None:
    """Constant nodes -> initializers; nodes whose inputs are all constant (shape arithmetic) are evaluated."""
    from onnx.reference import ReferenceEvaluator

    keep = []
    for node in list(gr.g.node):
        names = [i for i in node.input if i]
        standard = node.domain in ("", "ai.onnx")
        if standard and node.op_type == "Constant":
            attr = {a.name: a for a in node.attribute}
            if "value" in attr:
                value = numpy_helper.to_array(attr["value"].t)
            else:
                outputs = ReferenceEvaluator(node).run(None, {})
                assert isinstance(outputs, list)  # a list of outputs (a dict only with intermediate=True)
                value = outputs[0]
            gr.add_init(node.output[0], np.asarray(value))
        elif standard and names and all(i in gr.inits for i in names) and "Quantize" not in node.op_type:
            values = ReferenceEvaluator(node).run(None, {i: gr.const(i) for i in names})
            for name, value in zip(node.output, values, strict=True):
                gr.add_init(name, np.asarray(value))
        elif node.op_type == "Identity" and node.input[0] in gr.inits and node.output[0] not in gr.outputs():
            gr.rename_input(node.output[0], node.input[0])
        else:
            keep.append(node)
    del gr.g.node[:]
    gr.g.node.extend(keep)


def _fold_bn(gr: _Graph, conv: onnx.NodeProto, levels: np.ndarray, scale: np.ndarray):
    """Fold the inference BatchNormalization that alone consumes ``conv`` into (levels, scale, bias), or None.
    Channels with a negative BN factor get negated levels so that every DequantizeLinear scale is positive."""
    out = conv.output[0]
    users = gr.consumers(out)
    if conv.op_type != "Conv" or len(users) != 1 or users[0].op_type != "BatchNormalization" or out in gr.outputs():
        return None
    bn = users[0]
    params = [p for p in (gr.const(i) for i in bn.input[1:5]) if p is not None]
    if len(params) != 4 or len(bn.output) != 1:
        return None
    gamma, beta, mean, var = (p.astype(np.float64) for p in params)
    eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
    factor = gamma / np.sqrt(var + eps)
    if levels.shape[0] != factor.size:
        return None
    folded = np.broadcast_to(scale.astype(np.float64), factor.shape) * factor
    sign = np.where(folded < 0, -1, 1).reshape((-1,) + (1,) * (levels.ndim - 1))
    levels = levels * sign
    if levels.max(initial=0) > 127:  # a negated -128
        return None
    bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
    bias = gr.const(bias_name) if bias_name else np.zeros(factor.size)
    if bias is None:  # a bias computed in the graph, not a constant: left unfolded
        return None
    bias = bias.astype(np.float64)
    conv.output[0] = bn.output[0]
    gr.g.node.remove(bn)
    return levels, np.abs(folded).astype(np.float32), ((bias - mean) * factor + beta).astype(np.float32)


def _positive_steps(levels: np.ndarray, scale: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Every channel whose step is 0 (a folded BatchNorm with gamma 0: the channel's weights decode to 0)
    gets level 0 and step 1, which decode to the same zeros: a zero weight scale would give its bias the
    scale ``x_scale * 0``, which no int32 bias can use (the bias was lost, and numpy divided by zero)."""
    scale = np.asarray(scale, np.float32).reshape(-1)
    zero = scale == 0
    if not zero.any():
        return levels, scale
    shape = [1] * levels.ndim
    shape[axis] = -1  # the steps' axis: output channels (axis 1 where a Linear's weight is transposed)
    rows = np.broadcast_to(zero, (levels.shape[axis],)).reshape(shape)
    return np.where(rows, 0, levels).astype(levels.dtype), np.where(zero, np.float32(1), scale)


def _weight_init(gr: _Graph, model: nn.Module, name: str) -> str:
    pname = f"{name}.weight"
    if pname in gr.inits:
        return pname
    weight = dict(model.named_modules())[name].weight.detach().cpu().float().numpy()
    matches = [k for k, t in gr.inits.items()
               if tuple(t.dims) == weight.shape and np.array_equal(numpy_helper.to_array(t), weight)]
    if len(matches) != 1:
        raise CBDError(f"layer {name}: its weight could not be found in the exported graph")
    return matches[0]


def _weight_node(gr: _Graph, name: str, init: str, levels: np.ndarray) -> tuple[onnx.NodeProto, np.ndarray, int]:
    """The node that consumes the weight ``init`` (input 1), with the levels in that node's layout and the
    DequantizeLinear axis of the steps."""
    users = gr.consumers(init)
    if len(users) != 1:
        raise CBDError(f"layer {name}: its weight feeds {len(users)} nodes; expected one Conv/Gemm/MatMul")
    node, axis = users[0], 0
    if node.op_type == "Transpose" and levels.ndim == 2:  # Linear on N-d input: Transpose(W) -> MatMul
        after = gr.consumers(node.output[0])
        if len(after) != 1 or after[0].op_type != "MatMul":
            raise CBDError(f"layer {name}: unsupported use of its weight ({node.op_type})")
        gr.rename_input(node.output[0], init)
        gr.g.node.remove(node)
        node, levels, axis = after[0], levels.T, 1
    if node.op_type not in _WEIGHT_OPS or list(node.input).index(init) != 1:
        raise CBDError(f"layer {name}: its weight feeds {node.op_type}, not Conv/Gemm/MatMul")
    if node.op_type == "Gemm" and not any(a.name == "transB" and a.i == 1 for a in node.attribute):
        levels, axis = levels.T, 1
    return node, levels, axis


def _quantize_weights(gr: _Graph, model: nn.Module, codes: dict[str, _Code],
                      report: list[LayerExport]) -> dict[str, onnx.NodeProto]:
    """Replace each coded float weight by int8 levels -> DequantizeLinear. Returns {layer: weight node}."""
    done: dict[str, onnx.NodeProto] = {}
    for name, code in codes.items():
        init = _weight_init(gr, model, name)
        node, levels, axis = _weight_node(gr, name, init, code.levels)
        scale, bias, entry = code.steps, None, LayerExport(name, "int8")
        folded = _fold_bn(gr, node, levels, scale) if axis == 0 else None
        if folded is not None:
            entry.negated_channels = int((folded[0] != levels).any(axis=tuple(range(1, levels.ndim))).sum())
            levels, scale, bias = folded
            entry.bn_folded = True
        levels, scale = _positive_steps(levels, scale, axis)
        per_channel = scale.size > 1
        q = gr.add_init(f"{name}.weight_quantized", levels.astype(np.int8))
        s = gr.add_init(f"{name}.weight_scale", scale if per_channel else np.float32(scale.reshape(())))
        z = gr.add_init(f"{name}.weight_zero_point", np.zeros(scale.size, np.int8) if per_channel else np.int8(0))
        axis_attr: dict[str, Any] = {"axis": axis} if per_channel else {}
        dq = helper.make_node("DequantizeLinear", [q, s, z], [f"{name}.weight_dequantized"],
                              name=f"{name}.weight_DQ", **axis_attr)
        gr.g.node.insert(list(gr.g.node).index(node), dq)
        node.input[1] = dq.output[0]
        if bias is not None:
            b = gr.add_init(f"{name}.bias_folded", bias)
            if len(node.input) > 2:
                node.input[2] = b
            else:
                node.input.append(b)
        if not node.name or sum(n.name == node.name for n in gr.g.node) > 1:
            node.name = gr.fresh(f"{name}.{node.op_type}")
        done[name] = node
        report.append(entry)
    gr.prune()
    return done


# ------------------------------------------------------------------------------------------- activations

def _float_tensors(model: onnx.ModelProto) -> set[str]:
    g = onnx.shape_inference.infer_shapes(model).graph
    return {v.name for v in [*g.value_info, *g.input, *g.output] if v.type.tensor_type.elem_type == TensorProto.FLOAT}


def _activation_tensors(gr: _Graph, weight_nodes: set[int], floats: set[str]) -> list[str]:
    """The float activations to quantize, in graph order: around quantized weight nodes and the ops ORT's
    quantizer covers; never a graph output (the logits stay float)."""
    chosen: list[str] = []
    for node in gr.g.node:
        if node.op_type not in _ACT_OPS or (node.op_type in _WEIGHT_OPS and id(node) not in weight_nodes):
            continue
        names = [node.input[0]] if node.op_type in _WEIGHT_OPS else list(node.input)
        for name in [*names, *node.output]:
            if name and name in floats and name not in gr.inits and name not in chosen:
                chosen.append(name)
    outputs = gr.outputs()
    return [t for t in chosen if t not in outputs]


def _absorb_relus(gr: _Graph, weight_nodes: set[int]) -> None:
    """Drop a Relu that alone follows a quantized node: the asymmetric Q after it clamps at zero instead."""
    outputs = gr.outputs()
    for relu in [n for n in gr.g.node if n.op_type == "Relu"]:
        src = relu.input[0]
        prod = gr.producer(src)
        if (prod is None or prod.op_type not in _RELU_ABSORBERS or src in outputs or relu.output[0] in outputs
                or (prod.op_type in _WEIGHT_OPS and id(prod) not in weight_nodes) or len(gr.consumers(src)) != 1):
            continue
        prod.output[list(prod.output).index(src)] = relu.output[0]
        gr.g.node.remove(relu)


def _calibrate(model: onnx.ModelProto, tensors: list[str], calibration: Iterable, dtype: str = "uint8",
               method: str = "mse", narrow: frozenset[str] = frozenset()) -> dict[str, tuple[float, float]]:
    """Each tensor's clip range ``(lo, hi)`` over the calibration batches, run in ONNX Runtime on the
    float-activation graph. ``minmax``: the observed extremes. ``mse``: the range whose ``dtype`` quantization
    has the least squared error over the calibration values (torch.ao's ``HistogramObserver``: a 2048-bin
    histogram of all batches, then a search over clipped bin ranges; the chooser the PyTorch int8 runtime uses
    too), so a few outliers no longer coarsen the step of the whole tensor. ``narrow`` tensors are chosen for
    the 7-bit range 0..127."""
    import onnxruntime as ort

    if method not in CALIBRATION_METHODS:
        raise CBDError(f"activation calibration must be one of {list(CALIBRATION_METHODS)}, got {method!r}")
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None)
                              for t in tensors if t not in existing)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    observers = {t: _observer(dtype, method, t in narrow) for t in tensors}
    batches = 0
    for batch in calibration:
        x = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        for t, v in zip(tensors, session.run(tensors, {input_name: x.astype(np.float32)}), strict=True):
            observers[t](torch.from_numpy(np.ascontiguousarray(v)))
        batches += 1
    if not batches:
        raise CBDError("the calibration set gave no images")
    return {t: _clip_range(observer) for t, observer in observers.items()}


def _observer(dtype: str, method: str, narrow: bool = False):
    from torch.ao.quantization.observer import HistogramObserver, MinMaxObserver

    kind = HistogramObserver if method == "mse" else MinMaxObserver
    qmin, qmax, _ = _ACT_RANGE[dtype]
    return kind(dtype=torch.quint8 if dtype == "uint8" else torch.qint8, qscheme=torch.per_tensor_affine,
                quant_min=qmin, quant_max=_NARROW_QMAX if narrow else qmax)


def _narrow_inputs(weight_nodes: dict[str, onnx.NodeProto], codes: dict[str, _Code], dtype: str) -> frozenset[str]:
    """The inputs of quantized layers whose levels could saturate a uint8 x int8 kernel (see _SATURATING_LEVEL)."""
    if dtype != "uint8":
        return frozenset()
    return frozenset(node.input[0] for name, node in weight_nodes.items()
                     if int(np.abs(codes[name].levels).max(initial=0)) > _SATURATING_LEVEL)


def _clip_range(observer) -> tuple[float, float]:
    """The float range an observer's affine (scale, zero point) represents: the tensor's clip range."""
    if not torch.isfinite(observer.min_val) or not torch.isfinite(observer.max_val):
        return 0.0, 0.0
    scale, zero = (float(v) for v in observer.calculate_qparams())
    return (observer.quant_min - zero) * scale, (observer.quant_max - zero) * scale


def _qparams(lo: float, hi: float, dtype: str, narrow: bool = False) -> tuple[np.float32, int]:
    """Asymmetric scale and zero point of a range that always contains 0 (``narrow``: onto 0..127)."""
    qmin, qmax, _ = _ACT_RANGE[dtype]
    qmax = _NARROW_QMAX if narrow else qmax
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if not np.isfinite(hi - lo) or hi - lo <= 0:
        return np.float32(1.0), 0 if dtype == "int8" else 0
    scale = np.float32((hi - lo) / (qmax - qmin))
    return scale, int(np.clip(np.round(qmin - lo / float(scale)), qmin, qmax))


def _insert_qdq(gr: _Graph, tensors: list[str], ranges: dict[str, tuple[float, float]], dtype: str,
                narrow: frozenset[str] = frozenset()) -> dict:
    """A QuantizeLinear -> DequantizeLinear pair after each tensor; returns {tensor: scale}."""
    ranges = dict(ranges)
    chosen = set(tensors)
    for node in gr.g.node:  # data movement reuses its input's parameters (ORT then drops its Q/DQ)
        if node.op_type in _SAME_AS_INPUT and node.input[0] in chosen and node.output[0] in chosen \
                and (node.input[0] in narrow) == (node.output[0] in narrow):
            ranges[node.output[0]] = ranges[node.input[0]]
    position = {o: i for i, node in enumerate(gr.g.node) for o in node.output}
    pairs: dict[int, list[onnx.NodeProto]] = {}
    scales: dict[str, float] = {}
    for t in tensors:
        scale, zp = _qparams(*ranges[t], dtype, t in narrow)
        scales[t] = float(scale)
        s = gr.add_init(f"{t}_scale", np.float32(scale))
        z = gr.add_init(f"{t}_zero_point", np.array(zp, dtype=_ACT_RANGE[dtype][2]))
        gr.rename_input(t, f"{t}_dequantized")
        pairs.setdefault(position.get(t, -1), []).extend([
            helper.make_node("QuantizeLinear", [t, s, z], [f"{t}_quantized"], name=f"{t}_Q"),
            helper.make_node("DequantizeLinear", [f"{t}_quantized", s, z], [f"{t}_dequantized"], name=f"{t}_DQ")])
    nodes = list(pairs.get(-1, []))
    for i, node in enumerate(gr.g.node):
        nodes.append(node)
        nodes.extend(pairs.get(i, []))
    del gr.g.node[:]
    gr.g.node.extend(nodes)
    return scales


def _quantize_biases(gr: _Graph, weight_nodes: dict[str, onnx.NodeProto], act_scales: dict[str, float]) -> None:
    """Conv/Gemm biases as int32 at scale ``x_scale * w_scale`` (what QLinearConv consumes)."""
    for name, node in weight_nodes.items():
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.input) < 3 or not node.input[2]:
            continue
        bias = gr.const(node.input[2])
        x = node.input[0].removesuffix("_dequantized")
        dq = gr.producer(node.input[1])
        if bias is None or x not in act_scales or dq is None or dq.op_type != "DequantizeLinear":
            continue
        w_const = gr.const(dq.input[1])
        if w_const is None:
            continue
        w_scale = w_const.astype(np.float64).reshape(-1)
        if w_scale.size not in (1, bias.size):  # ConvTranspose steps per *input* channel: the bias stays float
            continue
        b_scale = act_scales[x] * np.broadcast_to(w_scale, bias.shape)
        q = np.clip(np.round(bias.astype(np.float64) / b_scale), -2**31, 2**31 - 1).astype(np.int32)
        inputs = [gr.add_init(f"{name}.bias_quantized", q),
                  gr.add_init(f"{name}.bias_scale", b_scale.astype(np.float32)),
                  gr.add_init(f"{name}.bias_zero_point", np.zeros(bias.shape, np.int32))]
        bdq = helper.make_node("DequantizeLinear", inputs, [f"{name}.bias_dequantized"], name=f"{name}.bias_DQ", axis=0)
        gr.g.node.insert(list(gr.g.node).index(node), bdq)
        node.input[2] = bdq.output[0]
    gr.prune()


# ------------------------------------------------------------------------------------------- export

def _max_unpool2d_symbolic(g, x, indices, output_size):
    """``aten::max_unpool2d`` as ONNX ``MaxUnpool`` (the TorchScript exporter has no symbolic for it).

    PyTorch's pooling indices, as the exporter's ``max_pool2d_with_indices`` returns them, are flat over each
    (n, c) plane's H*W; ONNX MaxUnpool scatters with indices flat over the whole N*C*H*W output. So the plane
    offsets ``(n*C + c) * H*W`` (H, W: ``output_size``, the pre-pooling size) are added, computed from the
    input's shape at run time (the batch stays dynamic), and the full output shape is passed as
    ``output_shape``. kernel/strides only matter to ONNX when no ``output_shape`` is given: the size ratio."""
    from torch.onnx._internal.torchscript_exporter import symbolic_helper

    def i64(value):
        return g.op("Constant", value_t=torch.tensor(value, dtype=torch.int64))

    size = symbolic_helper._maybe_get_const(output_size, "is")
    hw = i64([int(s) for s in size]) if isinstance(size, (list, tuple)) else g.op("Cast", output_size, to_i=7)
    nc = g.op("Slice", g.op("Shape", x), i64([0]), i64([2]))
    planes = g.op("Range", i64(0), g.op("ReduceProd", nc, keepdims_i=0), i64(1))
    offsets = g.op("Mul", g.op("Reshape", planes, g.op("Concat", nc, i64([1, 1]), axis_i=0)),
                   g.op("ReduceProd", hw, keepdims_i=1))
    known = symbolic_helper._get_tensor_sizes(x) or []
    ratio = [1, 1]
    if isinstance(size, (list, tuple)) and len(known) == 4 and all(isinstance(k, int) and k for k in known[2:]):
        ratio = [max(1, int(s) // int(k)) for s, k in zip(size, known[2:], strict=True)]
    return g.op("MaxUnpool", x, g.op("Add", indices, offsets), g.op("Concat", nc, hw, axis_i=0),
                kernel_shape_i=ratio, strides_i=ratio)


def _registered(name: str, opset: int) -> bool:
    """Whether torch's TorchScript exporter already has a symbolic for ``name`` at ``opset``."""
    try:
        from torch.onnx._internal.torchscript_exporter.registration import registry
    except ImportError:  # another torch layout: assume nothing is registered
        return False
    return bool(registry.is_registered_op(name, opset))


@contextmanager
def _export_symbolics(opset: int):
    """Our symbolics for ops the TorchScript exporter lacks, registered for this export only (an existing
    registration, e.g. a user's or a later torch's, is left alone)."""
    added = []
    for name, fn in (("aten::max_unpool2d", _max_unpool2d_symbolic),):
        if not _registered(name, opset):
            torch.onnx.register_custom_op_symbolic(name, fn, opset)
            added.append(name)
    try:
        yield
    finally:
        for name in added:
            torch.onnx.unregister_custom_op_symbolic(name, opset)


def _trace(model: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """torch's TorchScript exporter, parameters under their state-dict names, BN kept separate (no constant
    folding), a dynamic batch axis. Any failure is the architecture's: one CBDError line."""
    buffer = io.BytesIO()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = model(example)
            if isinstance(out, dict) and "out" in out:
                raise CBDError("dict outputs (torchvision segmentation models) are not supported by the exporter")
            if not isinstance(out, torch.Tensor):
                raise CBDError(f"the model returns {type(out).__name__}, not one tensor")
            with _export_symbolics(opset):
                # the TorchScript exporter (dynamo=False) writes to a file object too; torch's stub says paths only
                torch.onnx.export(model, (example,), buffer,  # type: ignore[arg-type]
                                  dynamo=False, opset_version=opset, do_constant_folding=False,
                                  input_names=["input"], output_names=["output"],
                                  dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    except CBDError as exc:
        raise CBDError(f"cannot export this architecture to ONNX: {exc}") from None
    except Exception as exc:  # the tracer's many failure types: the model cannot be traced
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CBDError(f"cannot export this architecture to ONNX ({type(exc).__name__}: {first})") from None
    return onnx.load_from_string(buffer.getvalue())


def build_proto(model: nn.Module, example: torch.Tensor, *, int8: bool = False, calibration: Iterable | None = None,
                activation_dtype: str = "uint8", opset: int = OPSET,
                activation_calibration: str = "mse") -> tuple[onnx.ModelProto, ExportReport]:
    """The QDQ ONNX model of a loaded compressed ``model`` (nothing written); see the module docstring."""
    if int8 and calibration is None:
        raise CBDError("int8 activations need calibration images")
    if activation_dtype not in _ACT_RANGE:
        raise CBDError(f"activation type must be one of {sorted(_ACT_RANGE)}")
    if activation_calibration not in CALIBRATION_METHODS:
        raise CBDError(f"activation calibration must be one of {list(CALIBRATION_METHODS)}")
    layers: list[LayerExport] = []
    codes = _codes(model, layers, int8)
    was_training = model.training
    model.eval()
    try:
        proto = _trace(model, example, opset)
    finally:
        model.train(was_training)
    gr = _Graph(proto)
    _fold_constants(gr)
    weight_nodes = _quantize_weights(gr, model, codes, layers)
    quantized, narrowed = 0, []
    if int8:
        assert calibration is not None  # checked above
        floats = _float_tensors(proto)
        ids = {id(n) for n in weight_nodes.values()}
        narrow = _narrow_inputs(weight_nodes, codes, activation_dtype)
        ranges = _calibrate(proto, _activation_tensors(gr, ids, floats), calibration, activation_dtype,
                            activation_calibration, narrow)
        _absorb_relus(gr, ids)
        tensors = [t for t in _activation_tensors(gr, ids, floats) if t in ranges]
        scales = _insert_qdq(gr, tensors, ranges, activation_dtype, narrow)
        by_name = {n.name: n for n in gr.g.node}  # the node list was rebuilt: look the nodes up again
        _quantize_biases(gr, {k: by_name[v.name] for k, v in weight_nodes.items()}, scales)
        quantized = len(tensors)
        narrowed = [t for t in tensors if t in narrow]
    gr.prune()
    proto.producer_name, proto.producer_version = "cbdnet", __version__
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    layers.sort(key=lambda layer: order.get(layer.name, 0))
    return proto, ExportReport("", 0, opset, int8, quantized, layers, activation_calibration if int8 else "",
                               narrowed)


def export_onnx_bytes(model: nn.Module, *, input_shape: tuple[int, ...], int8: bool = False,
                      calibration: Iterable | None = None, metadata: dict[str, str] | None = None,
                      activation_dtype: str = "uint8", opset: int = OPSET,
                      activation_calibration: str = "mse") -> tuple[bytes, ExportReport]:
    """The bytes of ``model`` (loaded from a ``.cbd`` file: its compressed layers carry ``.code``) as a QDQ ONNX
    file, and the report.

    ``input_shape``: the example input's shape (the batch axis is exported dynamic). ``int8``: quantize
    activations too, with ranges chosen over ``calibration`` (an iterable of normalised image batches) by
    ``activation_calibration``: ``"mse"`` (least quantization squared error, default) or ``"minmax"``.
    ``metadata``: string pairs for the file's metadata_props. The graph passes ``onnx.checker`` (full check).
    Raises CBDError for a code wider than int8 under ``int8``, missing calibration or an untraceable model."""
    example = torch.zeros(input_shape, dtype=next((p.dtype for p in model.parameters()), torch.float32))
    proto, report = build_proto(model, example, int8=int8, calibration=calibration,
                                activation_dtype=activation_dtype, opset=opset,
                                activation_calibration=activation_calibration)
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(key), value if isinstance(value, str) else json.dumps(value)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise CBDError(f"the exported graph fails onnx.checker: {str(exc).splitlines()[0][:200]}") from None
    data = proto.SerializeToString()
    report.bytes = len(data)
    return data, report


def export_onnx(model: nn.Module, path: str | os.PathLike, *, input_shape: tuple[int, ...], int8: bool = False,
                calibration: Iterable | None = None, metadata: dict[str, str] | None = None,
                activation_dtype: str = "uint8", overwrite: bool = True, opset: int = OPSET,
                activation_calibration: str = "mse") -> ExportReport:
    """:func:`export_onnx_bytes`, written atomically to ``path`` (on any error nothing is left there and an
    existing file is untouched)."""
    check_writable(path, overwrite=overwrite)
    data, report = export_onnx_bytes(model, input_shape=input_shape, int8=int8, calibration=calibration,
                                     metadata=metadata, activation_dtype=activation_dtype, opset=opset,
                                     activation_calibration=activation_calibration)
    atomic_write(path, data, overwrite=overwrite)
    report.path = str(path)
    return report
