"""The model walker: swap every Conv2d/ConvTranspose2d/Linear for its CBD twin and report what each layer costs.

``compress(model, planes=5, bottleneck=0.3)`` works in place (like ``optimum.quanto.quantize``) and returns
the model with a :class:`Report`. Bits are counted exactly as :func:`cbdnet.save` stores them.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .codec import FALLBACK_RULES, LayerCode, encode_weight
from .nn import COMPRESSIBLE, CBDModule, from_module
from .ops import layer_ops, output_positions, plane_popcounts

__all__ = ["LayerReport", "Report", "compress", "compressible_layers", "layer_report", "float_state",
           "default_workers"]


@dataclass
class LayerReport:
    name: str
    kind: str  # conv / conv_transpose / linear
    shape: list[int]
    h: int
    w: int
    params: int
    mode: str  # cbd / uniform / zero
    reason: str
    scale: float  # a
    bound: int
    mask_rank: int
    exponents: list[int]
    plane_ranks: list[int]  # per plane: GF(2) rank (-1 where not computed)
    plane_storage: list[str]  # per plane: factored / packed
    planes_factored: int
    planes_plain: int
    bits: int
    bits_per_weight: float
    rel_error: float
    rank_calls: int
    seconds: float
    # operation counts (see cbdnet.ops): a factored plane saves storage, not arithmetic on float inputs
    plane_popcounts: list[int] = field(default_factory=list)  # 1s per plane
    macs_per_position: int = 0  # dense conv/linear on the decoded weight: h * w
    bitserial_adds_per_position: int = 0  # signed adds over the 0/1 planes: sum of plane_popcounts
    bitserial_mults_per_position: int = 0  # one scale per plane and output channel
    output_positions: int | None = None  # output pixels per sample (needs compress(..., input_shape=...))
    dense_macs: int | None = None  # per sample
    bitserial_adds: int | None = None  # per sample
    bitserial_mults: int | None = None  # per sample


@dataclass
class Report:
    """Per-layer and total accounting. ``bits_per_weight`` covers the compressed layers' weights only;
    ``total_bits`` adds every float tensor the file also stores (biases, BatchNorm, uncompressed layers)."""

    config: dict
    layers: list[LayerReport] = field(default_factory=list)
    float_tensors: dict[str, int] = field(default_factory=dict)  # name -> bits stored as float
    file_bytes: int | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    float_layers: list[dict] = field(default_factory=list)  # modules whose own parameters stay float, and why

    @property
    def params(self) -> int:
        return sum(layer.params for layer in self.layers)

    @property
    def weight_bits(self) -> int:
        return sum(layer.bits for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        return self.weight_bits / self.params if self.params else 0.0

    @property
    def float_bits(self) -> int:
        return sum(self.float_tensors.values())

    @property
    def total_bits(self) -> int:
        return self.weight_bits + self.float_bits

    def ops(self) -> dict:
        """Totals of the storage and of the operations a deployment performs (per sample, where known)."""
        def total(key: str) -> int | None:
            values = [getattr(layer, key) for layer in self.layers]
            return None if any(v is None for v in values) else int(sum(values))

        return {
            "storage_bits": self.weight_bits,
            "fp32_storage_bits": 32 * self.params,
            "macs_per_position": total("macs_per_position"),
            "dense_macs": total("dense_macs"),
            "bitserial_adds": total("bitserial_adds"),
            "bitserial_mults": total("bitserial_mults"),
            "note": "GF(2) factors save storage only: a float activation meets the decoded plane, so a "
                    "deployment runs dense_macs multiply-adds (as FP32) or bitserial_adds + bitserial_mults",
        }

    def to_dict(self) -> dict:
        return {
            **self.extra,
            "ops": self.ops(),
            "config": self.config,
            "bits_per_weight": self.bits_per_weight,
            "params": self.params,
            "weight_bits": self.weight_bits,
            "float_params_bits": self.float_bits,
            "total_bits": self.total_bits,
            "fp32_bytes": 4 * self.params + self.float_bits // 8,
            "file_bytes": self.file_bytes,
            "seconds": self.seconds,
            "layers": [asdict(layer) for layer in self.layers],
            "float_layers": self.float_layers,
        }

    def table(self) -> str:
        """A fixed-width per-layer table with a totals line."""
        head = (f"{'layer':<28} {'shape':<16} {'h x w':>11} {'mode':<7} {'a':>6} {'fact/plain':>10} "
                f"{'ranks':<22} {'bits/w':>6} {'rel.err':>7}")
        lines = [head, "-" * len(head)]
        for layer in self.layers:
            ranks = ",".join(str(r) for r, s in zip(layer.plane_ranks, layer.plane_storage, strict=True)
                             if s == "factored") or "-"
            lines.append(
                f"{_clip(layer.name, 28):<28} {'x'.join(map(str, layer.shape)):<16} "
                f"{f'{layer.h}x{layer.w}':>11} {layer.mode:<7} {layer.scale:>6.3f} "
                f"{f'{layer.planes_factored}/{layer.planes_plain}':>10} {_clip(ranks, 22):<22} "
                f"{layer.bits_per_weight:>6.3f} {layer.rel_error:>7.4f}")
        lines.append("-" * len(head))
        lines.append(f"total: {len(self.layers)} layers, {self.params:,} weights, "
                     f"{self.bits_per_weight:.3f} bits/weight ({self.weight_bits / 8 / 1024:.1f} KiB), "
                     f"float tensors {self.float_bits / 8 / 1024:.1f} KiB, "
                     f"fp32 {4 * self.params / 1024:.1f} KiB")
        return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def compressible_layers(model: nn.Module, skip: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs that compress: every Conv2d, ConvTranspose2d and Linear not named in ``skip``."""
    skipped = set(skip)
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, COMPRESSIBLE) and not isinstance(module, CBDModule) and name not in skipped]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.Conv2d):
        return "conv"
    return "conv_transpose" if isinstance(module, nn.ConvTranspose2d) else "linear"


def layer_report(name: str, module: nn.Module, code: LayerCode, original: np.ndarray, seconds: float,
                 positions: int | None = None) -> LayerReport:
    decoded = code.decode()
    popcounts = plane_popcounts(code)
    norm = float(np.linalg.norm(original))
    error = float(np.linalg.norm(decoded - original) / norm) if norm > 0 else 0.0
    h, w = code.matrix_shape
    return LayerReport(
        name=name, kind=_kind(module), shape=list(code.shape),
        h=h, w=w, params=code.numel, mode=code.mode, reason=code.reason, scale=code.scale, bound=code.bound,
        mask_rank=code.mask_rank, exponents=list(code.exponents),
        plane_ranks=[p.rank for p in code.planes], plane_storage=[p.storage for p in code.planes],
        planes_factored=code.factored_planes, planes_plain=len(code.planes) - code.factored_planes,
        bits=code.bits(), bits_per_weight=code.bits() / code.numel, rel_error=error,
        rank_calls=code.rank_calls, seconds=seconds, plane_popcounts=popcounts,
        **layer_ops(code, popcounts, positions))


_FLOAT_REASONS: tuple[tuple[type, str], ...] = (
    (nn.modules.batchnorm._NormBase, "normalisation layer: per-channel affine/statistics, kept in float"),
    (nn.GroupNorm, "normalisation layer: per-channel affine, kept in float"),
    (nn.LayerNorm, "normalisation layer: per-channel affine, kept in float"),
    (nn.modules.conv._ConvTransposeNd, "1-D/3-D transposed convolution: no CBD twin, kept in float"),
    (nn.modules.conv._ConvNd, "1-D/3-D convolution: no CBD twin, kept in float"),
    (nn.Embedding, "embedding table: not a Conv2d/Linear, kept in float"),
)


def float_layers(model: nn.Module, skip: Iterable[str] = ()) -> list[dict]:
    """Every module that holds parameters of its own which are not a CBD code (biases of CBD layers aside):
    its name, type, parameter names and count, and why it stays float."""
    skipped = set(skip)
    rows = []
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, CBDModule):
            continue
        if not own:
            continue
        if name in skipped:
            reason = "skipped on request (--skip)"
        else:
            reason = next((text for kind, text in _FLOAT_REASONS if isinstance(module, kind)),
                          f"{type(module).__name__} parameters ({', '.join(own)}): not a Conv2d/Linear weight, "
                          "kept in float")
        rows.append({"name": name, "type": type(module).__name__, "tensors": sorted(own),
                     "params": sum(p.numel() for p in own.values()), "reason": reason})
    return rows


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state-dict tensor the file stores as-is: all but the weights of CBD modules."""
    coded = {f"{name}.weight" if name else "weight" for name, m in model.named_modules()
             if isinstance(m, CBDModule)}
    return {key: value for key, value in model.state_dict().items() if key not in coded}


def default_workers() -> int:
    """Layers encoded at once: ``CBDNET_WORKERS`` if set, else 1 (two threads showed no gain on a loaded
    2-core machine and double the peak memory of the largest layers)."""
    value = os.environ.get("CBDNET_WORKERS")
    return max(1, int(value)) if value else 1


def _encode_layer(name: str, module: nn.Module, planes: int, bottleneck: float, mode: str, fallback: str,
                  positions: int | None, encoder=None) -> tuple[LayerCode, LayerReport]:
    start = time.perf_counter()
    original = module.weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    code = encoder(name, original) if encoder is not None else \
        encode_weight(original, planes=planes, bottleneck=bottleneck, name=name, mode=mode, fallback=fallback)
    return code, layer_report(name, module, code, original, time.perf_counter() - start, positions)


def _finish(model: nn.Module, report: Report, bar, name: str, module: nn.Module, job) -> None:
    code, layer = job.result()
    _set_submodule(model, name, from_module(module, code))
    report.layers.append(layer)
    bar.set_postfix_str(name)
    bar.update(1)


def compress(model: nn.Module, planes: int = 5, bottleneck: float = 0.3, *, skip: Iterable[str] = (),
             mode: str = "auto", fallback: str = "distortion", progress: bool = True, workers: int | None = None,
             input_shape: tuple[int, ...] | None = None,
             encoder: Callable[[str, np.ndarray], LayerCode] | None = None) -> tuple[nn.Module, Report]:
    """Compress every Conv2d/ConvTranspose2d/Linear of ``model`` in place; returns ``(model, report)``.

    ``planes`` is J, the number of magnitude bit planes; ``bottleneck`` bounds the GF(2) rank of the mask of
    large entries by ``bottleneck * min(h, w)``; ``skip`` names layers to keep in float; ``mode='uniform'``
    stores every layer with the plain uniform code (the honest baseline at the same bits); ``fallback`` is the
    rule that keeps a layer's composite code or stores it uniform (``distortion``, the default, or the paper's
    ``size``; see :func:`cbdnet.codec.encode_weight`). ``workers`` layers
    are encoded at once in threads (the GF(2) kernels release the GIL; default :func:`default_workers`); the
    result does not depend on it, layers are swapped in model order. With ``input_shape`` (e.g.
    ``(1, 3, 224, 224)``) the report also counts the operations per sample (see :mod:`cbdnet.ops`).
    ``encoder``, when given, replaces :func:`encode_weight`: ``encoder(name, weight) -> LayerCode`` (RTN, grouped
    composite codes, calibrated or per-layer budgeted codes; see :mod:`cbdnet.grid`, :mod:`cbdnet.budget`); it
    must be safe to call from threads.
    """
    start = time.perf_counter()
    if fallback not in FALLBACK_RULES:  # before any layer is encoded
        raise ValueError(f"fallback must be one of {', '.join(FALLBACK_RULES)}, got {fallback!r}")
    report = Report(config={"planes": planes, "bottleneck": bottleneck, "mode": mode, "skip": sorted(skip)})
    if encoder is None and mode == "auto":  # the rule only applies to the per-tensor composite code
        report.config["fallback"] = fallback
    layers = compressible_layers(model, skip)
    positions = output_positions(model, input_shape) if input_shape is not None else {}
    workers = default_workers() if workers is None else max(1, int(workers))
    bar = tqdm(total=len(layers), desc="compress", unit="layer", disable=None if progress else True, leave=False)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # at most `workers` layers in flight, so a failing layer stops the run without encoding the rest
        jobs: deque = deque()
        pending = iter(layers)
        for name, module in pending:
            jobs.append((name, module, pool.submit(_encode_layer, name, module, planes, bottleneck, mode,
                                                   fallback, positions.get(name), encoder)))
            if len(jobs) >= workers:
                _finish(model, report, bar, *jobs.popleft())
        while jobs:
            _finish(model, report, bar, *jobs.popleft())
    bar.close()
    report.float_tensors = {key: value.numel() * value.element_size() * 8
                            for key, value in float_state(model).items()}
    report.float_layers = float_layers(model, skip)
    report.seconds = time.perf_counter() - start
    return model, report
