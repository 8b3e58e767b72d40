"""One layer's stored code: one class per kind of code, each knowing its size, its decoding and how it is
stored and checked.

Every code is a sign plane and bit planes of integer magnitudes in the 2-D arrangement of
:func:`cbdnet.codec.planes.to_matrix`, plus a few float32 scales:

- :class:`CompositeCode` (``cbd``): the paper's composite code, ``wmax * sign * sum_i P_i * c * 2^i``;
- :class:`UniformCode` (``uniform``): the plain J-bit code, ``wmax * sign * q / (2^J - 1)``;
- :class:`GridCode` (``grid``): per-group steps, ``sign * q * step[g]`` (RTN and the per-channel composite code);
- :class:`ZeroCode` (``zero``): an all-zero weight, nothing stored but three zero floats.

All of them are "signed integer levels times a step" (:meth:`LayerCode.levels`), which is what integer
runtimes and exporters consume. :data:`CODE_TYPES` maps the ``mode`` string the file stores to the class; the
file reader looks the class up and lets it validate its own parts (:meth:`LayerCode.from_stored`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from .bits import PlaneCode, unpack_bits
from .floats import exact_float16
from .planes import composite_decode, from_matrix, uniform_decode
from .stream import Stream, encode_stream

__all__ = ["LayerCode", "CompositeCode", "UniformCode", "GridCode", "ZeroCode", "CODE_TYPES", "register_code",
           "MAX_PLANES", "CodeError", "row_steps", "stored_scales"]

MAX_PLANES = 16
CODE_TYPES: dict[str, type[LayerCode]] = {}


class CodeError(ValueError):
    """Stored parts that do not make a valid code of their kind (the file reader reports it as corrupt)."""


def register_code(cls: type[LayerCode]) -> type[LayerCode]:
    """Class decorator: make a code kind known to the file reader under ``cls.kind``."""
    CODE_TYPES[cls.kind] = cls
    return cls


def row_steps(shape: tuple[int, ...], steps: np.ndarray) -> np.ndarray:
    """The step of every output channel (``[out]``), broadcasting a per-tensor step."""
    steps = np.asarray(steps, dtype=np.float32).reshape(-1)
    return np.broadcast_to(steps, (int(shape[0]),)) if steps.size == 1 else steps


def stored_scales(scales: np.ndarray) -> np.ndarray:
    """A layer's scales as format 2 stores them: float16 where float16 holds every one exactly, else float32."""
    half = exact_float16(np.asarray(scales, np.float32), "float32")
    return half if half is not None else np.asarray(scales, np.float32)


@dataclass
class LayerCode:
    """What the file stores for one layer, common to every kind of code."""

    kind: ClassVar[str] = ""
    stores_sign: ClassVar[bool] = True

    shape: tuple[int, ...]
    num_planes: int
    exponents: tuple[int, ...]
    sign: np.ndarray  # packed bits of W < 0 in the 2-D arrangement
    planes: list[PlaneCode]
    reason: str = ""
    scale: float = 0.0  # the composite scale a where a scale search ran, else 0
    bound: int = 0  # the GF(2) rank bound of that search
    mask_rank: int = 0
    rank_calls: int = 0
    extra: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ what every code answers

    @property
    def mode(self) -> str:
        return self.kind

    @property
    def matrix_shape(self) -> tuple[int, int]:
        if len(self.shape) == 2:
            return int(self.shape[0]), int(self.shape[1])
        out_ch, in_ch, kh, kw = self.shape
        return int(out_ch * kh), int(in_ch * kw)

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))

    @property
    def label(self) -> str:
        """A short name of the code for tables: ``cbd J=5``, ``uniform J=5``, ``rtn4/ch``, ``zero``."""
        return self.extra.get("label") or f"{self.kind} J={self.num_planes}"

    @property
    def factored_planes(self) -> int:
        return sum(plane.storage == "factored" for plane in self.planes)

    def scales(self) -> np.ndarray:
        """The float32 scales the file stores for this layer."""
        raise NotImplementedError

    def meta(self) -> dict:
        """Metadata of this kind beyond the common fields (JSON-serialisable)."""
        return {}

    def tensors(self) -> dict[str, np.ndarray]:
        """The arrays the file stores for this layer, by short name."""
        out: dict[str, np.ndarray] = {"scales": self.scales()}
        if self.stores_sign:
            out["sign"] = self.sign
        for index, plane in enumerate(self.planes):
            for key, value in plane.tensors.items():
                out[f"p{index}.{key}"] = value
        return out

    def bits(self) -> int:
        """Every stored bit: sign, planes (plain or factors, byte-padded) and the float32 scales."""
        return sum(t.nbytes for t in self.tensors().values()) * 8

    def stream(self) -> Stream:
        """The levels as the file (format 2) stores them: entropy-coded, or factored high planes plus an
        entropy-coded remainder, whichever is smaller (computed once; a code is not changed after encoding)."""
        cached = self.__dict__.get("_stream")
        if cached is None:
            cached = encode_stream(self.signed_magnitudes(), self.exponents, self.planes, tuple(self.shape))
            self.__dict__["_stream"] = cached
        return cached

    def coded_bits(self) -> int:
        """Every bit the file (format 2) stores for this layer's weight: the coded levels and the scales
        (float16 where float16 holds them all exactly, else float32; the file's header and float tensors are
        counted by the file, not here)."""
        return 8 * (self.stream().nbytes + stored_scales(self.scales()).nbytes)

    def decode_planes(self) -> list[np.ndarray]:
        h, w = self.matrix_shape
        return [plane.decode(h, w) for plane in self.planes]

    def remember_stream(self, stream: Stream) -> None:
        """Keep ``stream`` (what a format-2 file stored for this code, read and checked) as :meth:`stream`, so
        that sizes and re-saving use the stored bytes instead of coding the levels again."""
        self.__dict__["_stream"] = stream

    def remember_levels(self, signed: np.ndarray) -> None:
        """Keep ``signed`` (what :meth:`signed_magnitudes` computes from the planes, e.g. as a file decoder had
        it before splitting it into planes) so that decoding need not rebuild it."""
        if tuple(signed.shape) != self.matrix_shape:
            raise ValueError(f"levels of shape {signed.shape} for a {self.matrix_shape} code")
        self.__dict__["_signed"] = signed

    def level_matrix(self) -> np.ndarray:
        """:meth:`signed_magnitudes` in whatever integer type holds it (the remembered narrow levels where a
        file decoder left them: no int64 copy of a large layer)."""
        remembered = self.__dict__.get("_signed")
        return remembered if remembered is not None else self.signed_magnitudes()

    def signed_magnitudes(self) -> np.ndarray:
        """The integer ``sign * sum_i P_i * 2^(e_i - e_min)`` as an int64 ``h x w`` matrix."""
        remembered = self.__dict__.get("_signed")
        if remembered is not None:
            return remembered.astype(np.int64)
        h, w = self.matrix_shape
        low = min(self.exponents, default=0)
        span = max((e - low for e in self.exponents), default=0)
        small = np.int16 if span < 14 else np.int32 if span < 30 else np.int64  # the work in a narrow type: fast
        q = np.zeros((h, w), dtype=small)
        for plane, exponent in zip(self.decode_planes(), self.exponents, strict=True):
            q |= np.left_shift(plane.view(np.uint8).astype(small), small(exponent - low))
        if self.stores_sign:
            np.negative(q, out=q, where=unpack_bits(self.sign, (h, w)))
        return q.astype(np.int64)

    def levels(self) -> tuple[np.ndarray, np.ndarray]:
        """``(levels, steps)``: signed integer levels in the weight's shape and float32 steps (``[1]`` per tensor
        or ``[out]`` per output channel) with ``levels * steps`` equal to :meth:`decode` up to float rounding."""
        return from_matrix(self.signed_magnitudes(), self.shape), self.level_steps()

    def level_steps(self) -> np.ndarray:
        raise NotImplementedError

    def decode(self) -> np.ndarray:
        """The reconstructed float32 weight, in the layer's original shape."""
        raise NotImplementedError

    # ------------------------------------------------------------------ reading back

    @classmethod
    def scale_count(cls, shape: tuple[int, ...], meta: dict) -> int:
        """How many float32 scales a stored code of this kind has."""
        return 3

    @classmethod
    def expected_planes(cls, num_planes: int) -> int:
        return num_planes

    @classmethod
    def check_exponents(cls, num_planes: int, exponents: tuple[int, ...]) -> None:
        if exponents != tuple(range(num_planes - 1, -1, -1)):
            raise CodeError(f"bad {cls.kind} exponents {list(exponents)[:8]}")

    @classmethod
    def from_stored(cls, common: dict, scales: np.ndarray, meta: dict) -> LayerCode:
        """Rebuild a code from the file's parts (``common``: the constructor's common fields)."""
        cls.check_exponents(common["num_planes"], common["exponents"])
        wmax, scale, step = (float(v) for v in scales)  # the kinds with these three scales (not grid codes)
        return cls(**{**common, "scale": scale, "wmax": wmax, "step": step})


def _decode_sign_magnitude(code: CompositeCode | UniformCode, magnitude_of) -> np.ndarray:
    """``wmax * sign * magnitude_of(planes)`` in float32, in the weight's shape.

    ``magnitude_of`` maps a list of bool planes to float32 magnitudes elementwise. It is applied once, to the
    planes of every magnitude ``0 .. 2^J - 1`` (``J <= MAX_PLANES``: at most 65,536 of them), and the weight is
    one gather from that table by the signed levels (the remembered ones where a file decoder left them): the
    same float32 operations per entry as decoding the planes of the whole weight (so bitwise the same values,
    except that a zero level decodes to +0), in one pass instead of several per plane."""
    low = min(code.exponents)
    top = (1 << (max(code.exponents) - low + 1)) - 1
    every = np.arange(top + 1)
    magnitudes = magnitude_of([((every >> (e - low)) & 1).astype(bool) for e in code.exponents])
    # entry q for levels 0 .. top, entry -q (from the end, as numpy indexes) for the negative levels
    signed = np.concatenate([np.float32(code.wmax) * np.float32(1.0) * magnitudes,
                             np.float32(code.wmax) * np.float32(-1.0) * magnitudes[:0:-1]])
    return np.ascontiguousarray(from_matrix(signed[code.level_matrix()], code.shape))


@register_code
@dataclass
class CompositeCode(LayerCode):
    """The paper's composite code: planes ``P_i`` at exponents ``a_s .. a_i`` of the step ``c`` (per tensor)."""

    kind: ClassVar[str] = "cbd"
    wmax: float = 0.0
    step: float = 0.0  # c

    def scales(self) -> np.ndarray:
        return np.array([self.wmax, self.scale, self.step], dtype=np.float32)

    def decode(self) -> np.ndarray:
        return _decode_sign_magnitude(self, lambda planes: composite_decode(planes, self.step, self.exponents))

    def level_steps(self) -> np.ndarray:
        return np.array([self.wmax * self.step * 2.0 ** min(self.exponents)], dtype=np.float32)

    @classmethod
    def check_exponents(cls, num_planes: int, exponents: tuple[int, ...]) -> None:
        if exponents != tuple(range(exponents[0], exponents[0] - num_planes, -1)):
            raise CodeError("composite exponents are not consecutive")


@register_code
@dataclass
class UniformCode(LayerCode):
    """The plain J-bit magnitude code: ``q / (2^J - 1)`` of ``wmax``."""

    kind: ClassVar[str] = "uniform"
    wmax: float = 0.0
    step: float = 0.0  # 1 / (2^J - 1)

    def scales(self) -> np.ndarray:
        return np.array([self.wmax, self.scale, self.step], dtype=np.float32)

    def decode(self) -> np.ndarray:
        return _decode_sign_magnitude(self, uniform_decode)

    def level_steps(self) -> np.ndarray:
        return np.array([self.wmax / ((1 << self.num_planes) - 1)], dtype=np.float32)


@register_code
@dataclass
class ZeroCode(LayerCode):
    """An all-zero weight: no sign, no planes, three zero floats."""

    kind: ClassVar[str] = "zero"
    stores_sign: ClassVar[bool] = False
    wmax: float = 0.0
    step: float = 0.0

    @property
    def label(self) -> str:
        return "zero"

    def scales(self) -> np.ndarray:
        return np.zeros(3, dtype=np.float32)

    def decode(self) -> np.ndarray:
        return np.zeros(self.shape, dtype=np.float32)

    def levels(self) -> tuple[np.ndarray, np.ndarray]:
        return np.zeros(self.shape, dtype=np.int64), self.level_steps()

    def level_steps(self) -> np.ndarray:
        return np.ones(1, dtype=np.float32)

    @classmethod
    def expected_planes(cls, num_planes: int) -> int:
        return 0

    @classmethod
    def check_exponents(cls, num_planes: int, exponents: tuple[int, ...]) -> None:
        if exponents:
            raise CodeError("an all-zero layer stores no planes")


@register_code
@dataclass
class GridCode(LayerCode):
    """``sign * q * step[g]``: integer magnitudes ``q`` (binary digits, high first) on one float32 step per
    group ``g`` of output channels (``steps`` of size 1 or ``out``)."""

    kind: ClassVar[str] = "grid"
    steps: np.ndarray = field(default_factory=lambda: np.ones(1, np.float32))
    wmax: float = 0.0  # the largest decoded magnitude (reported only)

    @property
    def step(self) -> float:
        return 0.0

    def scales(self) -> np.ndarray:
        return np.asarray(self.steps, dtype=np.float32).reshape(-1)

    def meta(self) -> dict:
        return {"groups": int(self.scales().size)}

    def level_steps(self) -> np.ndarray:
        return self.scales().copy()

    def levels(self) -> tuple[np.ndarray, np.ndarray]:
        """As :meth:`LayerCode.levels`, with every step positive: a negative step (a BatchNorm with a negative
        scale folded into it, see :mod:`cbdnet.nn.fold`) becomes its channel's levels negated."""
        levels, steps = super().levels()
        negative = steps < 0
        if np.any(negative):
            flip = np.where(np.broadcast_to(negative, (levels.shape[0],)), -1, 1)
            levels = levels * flip.reshape((-1,) + (1,) * (levels.ndim - 1))
            steps = np.abs(steps)
        return levels, steps

    def decode(self) -> np.ndarray:
        levels = from_matrix(self.level_matrix(), self.shape)
        per_out = row_steps(self.shape, self.steps).astype(np.float32).reshape((-1,) + (1,) * (len(self.shape) - 1))
        out = np.empty(self.shape, dtype=np.float32)  # one pass: integer level * float32 step, C order
        np.multiply(levels, per_out, out=out, dtype=np.float32, casting="unsafe")
        return out

    @classmethod
    def scale_count(cls, shape: tuple[int, ...], meta: dict) -> int:
        groups = meta.get("groups")
        if not isinstance(groups, int) or isinstance(groups, bool) or groups not in (1, shape[0]):
            raise CodeError(f"{groups!r} steps for {shape[0]} output channels")
        return groups

    @classmethod
    def check_exponents(cls, num_planes: int, exponents: tuple[int, ...]) -> None:
        if exponents != tuple(range(num_planes - 1, -1, -1)):
            raise CodeError("bad grid plane order")

    @classmethod
    def from_stored(cls, common: dict, scales: np.ndarray, meta: dict) -> LayerCode:
        cls.check_exponents(common["num_planes"], common["exponents"])
        return cls(**common, steps=scales)
