"""Checks both ``.cbd`` readers share (format 1's :mod:`.cbdfile`, format 2's :mod:`.v2`): a failed check is
one :class:`~cbdnet.errors.FormatError`, and a layer entry's common fields (name, shape, mode, planes,
exponents) are checked here once for both."""

from __future__ import annotations

import json
import math
from collections.abc import Callable

from ..codec import CODE_TYPES, MAX_PLANES, LayerCode
from ..errors import FormatError

__all__ = ["need", "is_int", "strict_json", "layer_fields", "exponents_of", "MAX_NUMEL", "MAX_EXPONENT"]

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
        keys = [key for key, _ in pairs]
        need(len(set(keys)) == len(keys), f"corrupt {what}: duplicate keys")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=no_duplicates)
    except FormatError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FormatError(f"corrupt {what}: {str(exc)[:200]}") from None


def layer_fields(layer, as_int: IntCheck) -> tuple[str, tuple[int, ...], type[LayerCode], int]:
    """A layer entry's ``(name, shape, code class, planes)``, each checked (``as_int``: the reader's integer
    check, which words its own error)."""
    need(isinstance(layer, dict) and isinstance(layer.get("name"), str), "corrupt layer entry")
    name = layer["name"]
    shape = layer.get("shape")
    need(isinstance(shape, list) and len(shape) in (2, 4), f"layer {name}: bad shape {shape!r}"[:200])
    shape = tuple(as_int(s, f"{name}.shape", 1, 1 << 31) for s in shape)
    need(math.prod(shape) <= MAX_NUMEL, f"layer {name}: shape {shape} too large")
    kind = CODE_TYPES.get(layer.get("mode")) if isinstance(layer.get("mode"), str) else None
    need(kind is not None, f"layer {name}: unknown mode {layer.get('mode')!r}"[:200])
    return name, shape, kind, as_int(layer.get("planes"), f"{name}.planes", 1, MAX_PLANES)


def exponents_of(values: list, name: str, as_int: IntCheck) -> tuple[int, ...]:
    """A layer's plane exponents, each an integer within +-``MAX_EXPONENT``."""
    return tuple(as_int(e, f"{name}.exponent", -MAX_EXPONENT, MAX_EXPONENT) for e in values)
