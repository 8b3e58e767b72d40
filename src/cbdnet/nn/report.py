"""Per-layer and total accounting of a compressed model: what each layer stores, its error and its operation
counts (:class:`LayerReport`), and the totals (:class:`Report`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from torch import nn

from ..codec import LayerCode
from .ops import layer_ops, plane_popcounts

__all__ = ["LayerReport", "Report", "layer_report"]


@dataclass
class LayerReport:
    name: str
    kind: str  # conv / conv_transpose / linear / attention_in_proj (a MultiheadAttention's packed q/k/v weight)
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
    # operation counts (see cbdnet.nn.ops): a factored plane saves storage, not arithmetic on float inputs
    plane_popcounts: list[int] = field(default_factory=list)  # 1s per plane
    macs_per_position: int = 0  # dense conv/linear on the decoded weight: h * w
    bitserial_adds_per_position: int = 0  # signed adds over the 0/1 planes: sum of plane_popcounts
    bitserial_mults_per_position: int = 0  # one scale per plane and output channel
    output_positions: int | None = None  # output pixels per sample (needs compress(..., input_shape=...))
    dense_macs: int | None = None  # per sample
    bitserial_adds: int | None = None  # per sample
    bitserial_mults: int | None = None  # per sample
    code: str = ""  # the code chosen for this layer, e.g. "cbd J=5", "rtn4/ch", "uniform J=5"
    # how the file (format 2) stores the levels: "ans" (entropy-coded signed levels, one static table),
    # "ans-kernel" (the same, with per-kernel-position contexts), "gf2+ans" (GF(2)-factored high planes plus
    # entropy-coded remainder and signs) or "none" (all-zero)
    coding: str = ""
    plane_coding: list[str] = field(default_factory=list)  # per plane: "ans" or "gf2 rank R, N B"
    # what the file (format 2) stores for this layer: the coded levels and the scales (float16 or float32);
    # ``bits`` above keeps the paper's count (fixed-length sign and planes, or their GF(2) factors, plus the scales)
    coded_bits: int = 0
    coded_bits_per_weight: float = 0.0


@dataclass
class Report:
    """Per-layer and total accounting, in three numbers:

    - ``bits_per_weight``: the compressed layers' bits / their weights, counted as the paper counts them
      (fixed-length sign and bit planes, or their GF(2) factors, plus the float32 scales);
    - ``coded_bits_per_weight``: the same layers as the file stores them (entropy-coded levels, see
      :mod:`cbdnet.codec.stream`), scales included;
    - ``file_bits_per_weight``: the honest number, the whole file's bytes * 8 / the compressed weights (header,
      float tensors and checksum included; known once the file is encoded).

    ``total_bits`` adds every float tensor the file stores (biases, BatchNorm, uncompressed layers, at the
    width the file stores them) to ``weight_bits``."""

    config: dict
    layers: list[LayerReport] = field(default_factory=list)
    float_tensors: dict[str, int] = field(default_factory=dict)  # name -> bits stored as float
    file_bytes: int | None = None
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)
    float_layers: list[dict] = field(default_factory=list)  # modules whose own parameters stay float, and why
    tied: dict[str, str] = field(default_factory=dict)  # layer -> the layer whose (shared) weight it reuses

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
    def coded_weight_bits(self) -> int:
        return sum(layer.coded_bits for layer in self.layers)

    @property
    def coded_bits_per_weight(self) -> float:
        return self.coded_weight_bits / self.params if self.params else 0.0

    @property
    def float_bits(self) -> int:
        return sum(self.float_tensors.values())

    @property
    def total_bits(self) -> int:
        return self.weight_bits + self.float_bits

    @property
    def file_bits_per_weight(self) -> float | None:
        """The whole file (header, float tensors, checksum included) in bits per compressed weight."""
        return 8 * self.file_bytes / self.params if self.file_bytes is not None and self.params else None

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
            "coded_bits_per_weight": self.coded_bits_per_weight,
            "file_bits_per_weight": self.file_bits_per_weight,
            "params": self.params,
            "weight_bits": self.weight_bits,
            "coded_weight_bits": self.coded_weight_bits,
            "float_params_bits": self.float_bits,
            "total_bits": self.total_bits,
            "fp32_bytes": 4 * self.params + self.float_bits // 8,
            "file_bytes": self.file_bytes,
            "seconds": self.seconds,
            "layers": [asdict(layer) for layer in self.layers],
            "float_layers": self.float_layers,
            "tied": self.tied,
        }

    def table(self) -> str:
        """A fixed-width per-layer table with a totals line."""
        head = (f"{'layer':<28} {'shape':<16} {'h x w':>11} {'code':<12} {'a':>6} {'fact/plain':>10} "
                f"{'ranks':<22} {'bits/w':>6} {'coding':<10} {'coded':>6} {'rel.err':>7}")
        lines = [head, "-" * len(head)]
        for layer in self.layers:
            ranks = ",".join(str(r) for r, s in zip(layer.plane_ranks, layer.plane_storage, strict=True)
                             if s == "factored") or "-"
            lines.append(
                f"{_clip(layer.name, 28):<28} {'x'.join(map(str, layer.shape)):<16} "
                f"{f'{layer.h}x{layer.w}':>11} {_clip(layer.code or layer.mode, 12):<12} "
                f"{f'{layer.scale:.3f}' if layer.scale > 0 else '':>6} "
                f"{f'{layer.planes_factored}/{layer.planes_plain}':>10} {_clip(ranks, 22):<22} "
                f"{layer.bits_per_weight:>6.3f} {layer.coding:<10} {layer.coded_bits_per_weight:>6.3f} "
                f"{layer.rel_error:>7.4f}")
        lines.append("-" * len(head))
        if self.file_bits_per_weight is not None:
            lines.append(f"file: {self.file_bytes:,} bytes = {self.file_bits_per_weight:.3f} bits per compressed "
                         "weight (header, float tensors and checksum included)")
        lines.append(f"total: {len(self.layers)} layers, {self.params:,} weights, "
                     f"{self.bits_per_weight:.3f} bits/weight ({self.weight_bits / 8 / 1024:.1f} KiB), "
                     f"entropy-coded {self.coded_bits_per_weight:.3f} ({self.coded_weight_bits / 8 / 1024:.1f} KiB), "
                     f"float tensors {self.float_bits / 8 / 1024:.1f} KiB, "
                     f"fp32 {4 * self.params / 1024:.1f} KiB, {self.seconds:.1f} s")
        for name, owner in self.tied.items():
            lines.append(f"tied: {name} shares the weight of {owner} (coded and counted once)")
        return "\n".join(lines)


def _plane_coding(code: LayerCode) -> list[str]:
    factored = {plane.index: plane for plane in code.stream().factored}
    return [f"gf2 rank {factored[i].rank}, {factored[i].nbytes} B" if i in factored else "ans"
            for i in range(len(code.planes))]


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _kind(module: nn.Module) -> str:
    if isinstance(module, nn.MultiheadAttention):
        return "attention_in_proj"
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
        coding=code.stream().coding, plane_coding=_plane_coding(code), coded_bits=code.coded_bits(),
        coded_bits_per_weight=code.coded_bits() / code.numel,
        rank_calls=code.rank_calls, seconds=seconds, plane_popcounts=popcounts,
        code=code.label, **layer_ops(code, popcounts, positions))
