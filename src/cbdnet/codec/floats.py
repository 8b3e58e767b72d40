"""Float tensors (BatchNorm, biases) in float16.

:func:`cbdnet.compress` rounds each float tensor to float16 where that keeps float16's full (normal-range)
precision (:func:`as_float16`); the file writer then stores as float16 exactly the tensors whose every value
float16 holds exactly (:func:`exact_float16`), so saving never changes a model: ``load(save(m))`` equals ``m``.
A tensor whose values are all equal (a folded BatchNorm's unit scale, zero mean) is stored as that one value
(:func:`constant_value`). The bit budget counts the bytes the file will hold (:func:`stored_float_bytes`)."""

from __future__ import annotations

import numpy as np

__all__ = ["as_float16", "exact_float16", "constant_value", "stored_float_bytes", "FLOAT16_MAX_REL_ERROR", "FLOATING"]

FLOAT16_MAX_REL_ERROR = 2.0**-11  # float16's rounding error in its normal range: tensors that need more stay raw
FLOATING = ("float32", "float64", "bfloat16")  # state-dict dtypes that may be stored as float16


def as_float16(array: np.ndarray, dtype: str) -> np.ndarray | None:
    """``array`` as float16 where every value is finite and within float16's normal-range rounding
    (relative error <= 2^-11), else None (also for non-float dtypes and empty tensors)."""
    if dtype not in FLOATING or array.size == 0:
        return None
    wide = np.asarray(array, dtype=np.float64)
    if not np.isfinite(wide).all():
        return None
    with np.errstate(over="ignore", invalid="ignore"):
        back = wide.astype(np.float16).astype(np.float64)
    if not np.isfinite(back).all():
        return None
    scale = np.maximum(np.abs(wide), np.finfo(np.float16).tiny)
    if float(np.max(np.abs(back - wide) / scale)) > FLOAT16_MAX_REL_ERROR:
        return None
    return wide.astype(np.float16)


def exact_float16(array: np.ndarray, dtype: str) -> np.ndarray | None:
    """``array`` as float16 where float16 holds every value exactly (the writer's test), else None."""
    if dtype not in FLOATING or array.size == 0:
        return None
    wide = np.asarray(array, dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        half = wide.astype(np.float16)
    return half if np.array_equal(half.astype(np.float64), wide) else None


def constant_value(array: np.ndarray) -> float | int | bool | None:
    """The one value of a non-empty tensor whose entries are all equal (and finite), as a JSON number that
    converts back to exactly that value; else None."""
    flat = np.asarray(array).reshape(-1)
    if flat.size == 0 or not np.all(flat == flat[0]):
        return None
    first = flat[0]
    if flat.dtype == np.bool_:
        return bool(first)
    if np.issubdtype(flat.dtype, np.integer):
        return int(first)
    if not np.isfinite(first) or (first == 0 and np.signbit(first)):  # -0.0 would come back as +0.0 from JSON
        return None
    return float(first)


def stored_float_bytes(array: np.ndarray, dtype: str, float32: bool = False) -> int:
    """Bytes the file will store for a float tensor of state-dict ``dtype``: none for a constant tensor (its
    value is in the header), 2 per value where it is (or, unless ``float32``, will be rounded to) float16, else
    its own width (bfloat16 is stored as float32)."""
    if constant_value(array) is not None:
        return 0
    fits = exact_float16(array, dtype) if float32 else as_float16(array, dtype)
    if fits is not None:
        return 2 * int(array.size)
    itemsize = 4 if dtype == "bfloat16" else np.dtype(array.dtype).itemsize
    return itemsize * int(array.size)
