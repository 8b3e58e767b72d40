"""Checks both ``.cbd`` readers share (format 1's :mod:`.cbdfile`, format 2's :mod:`.v2`): a failed check is
one :class:`~cbdnet.errors.FormatError`, and a layer entry's common fields (name, shape, mode, planes,
exponents) are checked here once for both."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

import numpy as np

from ..codec import CODE_TYPES, MAX_PLANES, LayerCode
from ..errors import FormatError

__all__ = ["need", "is_int", "strict_json", "layer_fields", "exponents_of", "check_scales", "check_finite_floats",
           "named", "MAX_NUMEL", "MAX_EXPONENT"]

MAX_NUMEL = 1 << 34
MAX_EXPONENT = 320  # |plane exponent|; float32 ratios need at most ~277, and 2.0**320 cannot overflow

IntCheck = Callable[[object, str, int, int], int]  # (value, what, low, high) -> the value, or FormatError


def need(condition: bool, message: str) -> None:
    if not condition:
        raise FormatError(message)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def strict_json(text: bytes | str, what: str):
    """Parse JSON, turning every parser failure (bad UTF-8, syntax, nesting too deep, a 5,000-digit
    integer, duplicate keys) into one ``corrupt {what}: ...`` FormatError."""
    def no_duplicates(pairs: list) -> dict:
        out = dict(pairs)
        need(len(out) == len(pairs), f"corrupt {what}: duplicate keys")
        return out

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except FormatError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FormatError(f"corrupt {what}: {str(exc)[:200]}") from None


def named(layer, exc: FormatError) -> FormatError:
    """``exc`` about a layer entry, its message naming the layer (the hot checks format no name: a header may
    hold 40,000 layers)."""
    name = layer.get("name") if isinstance(layer, dict) else None
    text = str(exc)
    if not isinstance(name, str) or text.startswith("layer "):
        return exc
    return FormatError(f"layer {name[:80]}: {text}")


def layer_fields(layer, as_int: IntCheck) -> tuple[str, tuple[int, ...], type[LayerCode], int]:
    """A layer entry's ``(name, shape, code class, planes)``, each checked (``as_int``: the reader's integer
    check, which words its own error)."""
    if not (isinstance(layer, dict) and isinstance(layer.get("name"), str)):
        raise FormatError("corrupt layer entry")
    name = layer["name"]
    shape = layer.get("shape")
    if not (isinstance(shape, list) and len(shape) in (2, 4)):
        raise FormatError(f"layer {name}: bad shape {shape!r}"[:200])
    shape = tuple(as_int(s, "shape", 1, 1 << 31) for s in shape)
    if math.prod(shape) > MAX_NUMEL:
        raise FormatError(f"layer {name}: shape {shape} too large")
    mode = layer.get("mode")
    kind = CODE_TYPES.get(mode) if isinstance(mode, str) else None
    if kind is None:
        raise FormatError(f"layer {name}: unknown mode {mode!r}"[:200])
    return name, shape, kind, as_int(layer.get("planes"), "planes", 1, MAX_PLANES)


def exponents_of(values: list, name: str, as_int: IntCheck) -> tuple[int, ...]:
    """A layer's plane exponents, each an integer within +-``MAX_EXPONENT``."""
    return tuple(as_int(e, "exponent", -MAX_EXPONENT, MAX_EXPONENT) for e in values)


def check_scales(name: str, mode: str, scales: np.ndarray, num_planes: int) -> None:
    """The stored scales of a layer as its writer makes them, for both readers (format 1 and 2): finite, and
    for ``cbd`` ``[wmax > 0, 0 < a <= 1, c > 0]``, for ``uniform`` ``[wmax > 0, 0 <= a <= 1, 1 / (2^J - 1)]``, for
    ``zero`` three zeros; a ``grid`` layer's steps may have either sign (a folded BatchNorm's scale may be
    negative or zero), finite. Anything else decodes to a model no writer made: refused."""
    values = np.asarray(scales, dtype=np.float32)
    if not bool(np.isfinite(values).all()):
        raise FormatError(f"layer {name}: non-finite scales")
    if mode == "grid":
        return
    wmax, scale, step = (float(v) for v in values)
    if mode == "zero":
        if not wmax == scale == step == 0.0:
            raise FormatError(f"layer {name}: an all-zero layer with non-zero scales")
        return
    problem = None
    if wmax <= 0.0:
        problem = f"maximum weight {wmax!r} is not positive"
    elif mode == "cbd" and not 0.0 < scale <= 1.0:
        problem = f"composite scale a = {scale!r} is not in (0, 1]"
    elif mode == "cbd" and step <= 0.0:
        problem = f"composite step c = {step!r} is not positive"
    elif mode == "uniform" and not 0.0 <= scale <= 1.0:
        problem = f"scale a = {scale!r} is not in [0, 1]"
    elif mode == "uniform" and step != float(np.float32(1.0 / ((1 << num_planes) - 1))):
        problem = f"uniform step {step!r} is not 1/(2^{num_planes} - 1)"
    if problem:
        raise FormatError(f"layer {name}: {problem} (no writer stores that)")


def check_finite_floats(floats: dict[str, np.ndarray]) -> list[str]:
    """The float tensors (BatchNorm statistics, biases) holding NaN or Inf, which no writer stores."""
    return [key for key, array in floats.items() if not _all_finite(array)]


def _all_finite(array: np.ndarray) -> bool:
    """No NaN/Inf, without a temporary the size of ``array`` (a declared constant may be a broadcast view of one
    value over billions of entries): the smallest and largest entries are finite exactly when all are."""
    if array.dtype.kind != "f" or array.size == 0:
        return True
    if not any(array.strides):
        return bool(np.isfinite(array.flat[0]))
    return bool(np.isfinite(array.min()) and np.isfinite(array.max()))
