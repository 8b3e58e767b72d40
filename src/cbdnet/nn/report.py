"""Per-layer and total accounting of a compressed model: what each layer stores, its error and its operation
counts (:class:`LayerReport`), and the totals (:class:`Report`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
from torch import nn

from ..codec import LayerCode
from .ops import layer_ops, plane_popcounts

__all__ = ["LayerReport", "Report", "layer_report", "BudgetChoice", "CalibrationSummary", "layer_table", "totals_lines",
           "plane_coding", "gf2_ranks"]


@dataclass
class LayerReport:
    """One compressed layer: one row of :meth:`Report.table`, one entry of the JSON report's ``layers``.

    The fields users read most (the others are documented beside them):

    Attributes:
        name: The layer's module name in the model (``"layer1.0.conv1"``).
        shape: The weight's shape.
        params: The layer's weights.
        code: The code chosen for the layer, e.g. ``"cbd J=5"``, ``"rtn4/ch"``, ``"uniform J=5"``.
        reason: Why that code (the fallback rule's or the budget's reason; may be empty).
        bits_per_weight: Bits per weight as the paper counts them (fixed-length planes, or GF(2) factors).
        coded_bits_per_weight: Bits per weight as the file stores the layer (entropy-coded, scales included).
        rel_error: ``||W_decoded - W|| / ||W||``.
    """

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
    width the file stores them) to ``weight_bits``.

    Typed views of ``extra`` (the JSON report's other entries): :attr:`codes`, :attr:`chosen` and
    :attr:`budget` (the budget's choice), :attr:`calibration` (:class:`CalibrationSummary`) and
    :attr:`folded_batchnorm`; :meth:`layer` finds a layer's row (:class:`LayerReport`)."""

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

    # Typed views of ``extra`` (the JSON report's top-level entries, which stay as they are).

    def layer(self, name: str) -> LayerReport:
        """The row of layer ``name``; a ``KeyError`` when no compressed layer has that name."""
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    @property
    def codes(self) -> dict[str, str]:
        """Every compressed layer's code, by layer name (e.g. ``{"conv1": "rtn4/ch"}``)."""
        return {layer.name: layer.code or layer.mode for layer in self.layers}

    @property
    def budget(self) -> BudgetChoice | None:
        """What the per-layer budget chose (``None`` unless the config was a :class:`~cbdnet.BudgetConfig`)."""
        return BudgetChoice.from_extra(self.extra)

    @property
    def chosen(self) -> dict[str, str]:
        """The budget's winning candidate per layer (e.g. ``{"conv1": "w5e0.5"}``); empty without a budget.
        The same as the JSON's ``calibration.chosen`` (or ``budget.chosen`` without calibration data)."""
        budget = self.budget
        return dict(budget.chosen) if budget is not None else {}

    @property
    def calibration(self) -> CalibrationSummary | None:
        """What calibration data did (``None`` when none was given): the JSON's ``calibration`` entry."""
        return CalibrationSummary.from_extra(self.extra)

    @property
    def folded_batchnorm(self) -> list[str]:
        """The BatchNorms folded into the coded layer before them (their scale lives in its steps)."""
        return list(self.extra.get("folded_batchnorm") or [])

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
        """A fixed-width per-layer table (:func:`layer_table`) with the totals, led by the whole file's bits per
        weight (:func:`totals_lines`)."""
        rows = [{"name": layer.name, "shape": layer.shape, "h": layer.h, "w": layer.w,
                 "code": layer.code or layer.mode, "scale": layer.scale, "planes": len(layer.plane_storage),
                 "coding": layer.coding, "plane_coding": layer.plane_coding,
                 "coded_bits_per_weight": layer.coded_bits_per_weight, "bits_per_weight": layer.bits_per_weight,
                 "rel_error": layer.rel_error} for layer in self.layers]
        lines = layer_table(rows)
        lines += totals_lines(self.file_bytes, self.params, self.coded_bits_per_weight, self.bits_per_weight,
                              len(self.layers), self.float_bits, self.seconds)
        for name, owner in self.tied.items():
            lines.append(f"tied: {name} shares the weight of {owner} (coded and counted once)")
        return "\n".join(lines)


def gf2_ranks(plane_coding: list[str]) -> str:
    """The GF(2) ranks of the planes the file stores factored, e.g. ``"29"`` or ``"1,14"`` (``-``: none)."""
    ranks = [part.split()[2].rstrip(",") for part in plane_coding if part.startswith("gf2 rank ")]
    return ",".join(ranks) or "-"


def layer_table(rows: list[dict]) -> list[str]:
    """The per-layer table that ``compress`` and ``info`` both print, from the same fields: shape, h x w, the
    code and its scale ``a``, planes J, how the file codes the levels (and the GF(2) ranks of the planes it
    stores factored), the layer's coded bits per weight in the file, the paper's fixed-length count, and the
    relative error (None: not known, e.g. read from a file)."""
    head = (f"{'layer':<28} {'shape':<16} {'h x w':>11} {'code':<12} {'a':>6} {'J':>2} {'file coding':<11} "
            f"{'gf2 ranks':<12} {'coded b/w':>9} {'paper b/w':>9} {'rel.err':>7}")
    lines = [head, "-" * len(head)]
    for row in rows:
        error = "-" if row.get("rel_error") is None else f"{row['rel_error']:.4f}"
        hw = f"{row['h']}x{row['w']}"
        scale = f"{row['scale']:.3f}" if row["scale"] > 0 else ""
        lines.append(
            f"{_clip(row['name'], 28):<28} {'x'.join(map(str, row['shape'])):<16} {hw:>11} "
            f"{_clip(row['code'], 12):<12} {scale:>6} {row['planes']:>2} {_clip(row['coding'], 11):<11} "
            f"{_clip(gf2_ranks(row['plane_coding']), 12):<12} {row['coded_bits_per_weight']:>9.3f} "
            f"{row['bits_per_weight']:>9.3f} {error:>7}")
    lines.append("-" * len(head))
    return lines


def totals_lines(file_bytes: int | None, params: int, coded_bpw: float, paper_bpw: float, layers: int,
                 float_bits: int | None, seconds: float | None = None) -> list[str]:
    """The totals, one number first: the whole file's bits per compressed weight (header, float tensors and
    checksum included), then the layers as the file codes them, then the paper's fixed-length count, labelled."""
    if file_bytes is not None and params:
        first = (f"whole file: {8 * file_bytes / params:.3f} bits/weight ({file_bytes:,} bytes for {params:,} "
                 "compressed weights; header, float tensors and checksum included)")
    else:
        first = f"whole file: not written yet ({params:,} compressed weights)"
    timing = "" if seconds is None else f", {seconds:.1f} s"
    floats = "" if float_bits is None else f"float tensors {float_bits / 8 / 1024:.1f} KiB, "
    return [first,
            f"layers: {layers}, entropy-coded {coded_bpw:.3f} bits/weight ({coded_bpw * params / 8 / 1024:.1f} KiB), "
            f"{floats}fp32 {4 * params / 1024:.1f} KiB{timing}",
            f"paper's code count: {paper_bpw:.3f} bits/weight (fixed-length sign and planes or their GF(2) "
            f"factors, plus scales: the paper's accounting, not the file)"]


def plane_coding(code: LayerCode) -> list[str]:
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
        coding=code.stream().coding, plane_coding=plane_coding(code), coded_bits=code.coded_bits(),
        coded_bits_per_weight=code.coded_bits() / code.numel,
        rank_calls=code.rank_calls, seconds=seconds, plane_popcounts=popcounts,
        code=code.label, **layer_ops(code, popcounts, positions))


@dataclass(frozen=True)
class BudgetChoice:
    """What a :class:`~cbdnet.BudgetConfig`'s budget chose (:attr:`Report.budget`).

    Attributes:
        chosen: The winning candidate per layer name (e.g. ``"w5e0.5"``, ``"rtn4"``).
        overhead_bits: Bits set aside for what the file stores beside the coded layers (header, float tensors).
        predicted_loss_increase: The sum of the chosen candidates' predicted loss increases.
        retries: How often the whole file was compressed again because it overshot the target (0: never).
    """

    chosen: dict[str, str]
    overhead_bits: int
    predicted_loss_increase: float
    retries: int = 0

    @classmethod
    def from_extra(cls, extra: dict) -> BudgetChoice | None:
        """The budget's entry of a report's ``extra`` (under ``calibration`` where data was given), or None."""
        entry = extra.get("calibration") if "chosen" in (extra.get("calibration") or {}) else extra.get("budget")
        if not entry:
            return None
        return cls(chosen=dict(entry["chosen"]), overhead_bits=int(entry.get("overhead_bits", 0)),
                   predicted_loss_increase=float(entry.get("predicted_loss_increase", 0.0)),
                   retries=int(extra.get("budget_retries", 0)))


@dataclass(frozen=True)
class CalibrationSummary:
    """What calibration data did (:attr:`Report.calibration`). Losses are the mean cross-entropy on the
    calibration images (against their labels, or the float model's predictions where ``pseudo_labels``).

    Attributes:
        spec: The calibration data's name.
        images: How many calibration images were used.
        pseudo_labels: Whether the labels were the float model's own predictions.
        seconds_stats: Seconds spent collecting per-layer statistics.
        loss_before: The float model's calibration loss.
        loss_compressed: The compressed model's loss before the corrections.
        loss_after: The compressed model's loss after the corrections (what the model now has).
        bias_corrected_layers: Layers whose mean output shift was removed.
        bn_reestimated: BatchNorms whose statistics were recomputed.
        adaround: Learned rounding's figures (:mod:`cbdnet.calib.reconstruct`), or None where it did not run.
        refit: The re-rounding's figures (:mod:`cbdnet.calib.refit`), or None where it did not run.
    """

    spec: str
    images: int
    pseudo_labels: bool
    seconds_stats: float
    loss_before: float | None
    loss_compressed: float | None
    loss_after: float | None
    bias_corrected_layers: int
    bn_reestimated: int
    adaround: dict | None = None
    refit: dict | None = None

    @classmethod
    def from_extra(cls, extra: dict) -> CalibrationSummary | None:
        """The ``calibration`` entry of a report's ``extra``, or None."""
        entry = extra.get("calibration")
        if not entry:
            return None
        return cls(spec=entry.get("spec"), images=entry.get("images"), pseudo_labels=entry.get("pseudo_labels"),
                   seconds_stats=entry.get("seconds_stats"), loss_before=entry.get("loss_before"),
                   loss_compressed=entry.get("loss_compressed"), loss_after=entry.get("loss_after"),
                   bias_corrected_layers=entry.get("bias_corrected_layers", 0),
                   bn_reestimated=entry.get("bn_reestimated", 0), adaround=entry.get("adaround"),
                   refit=entry.get("refit"))
