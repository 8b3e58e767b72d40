"""Hostile format-2 files that are valid containers (SHA-256 and CRC-32s right) but whose header asks for more than
the model justifies: many-layer headers, level streams and constant tensors declaring huge sizes, out-of-contract
values. Used by tests/format/test_format_bounds.py and bench/fuzz_campaign.py."""

from __future__ import annotations

import copy
import json
import struct
import zlib

from cbd_mutations import payload_of, sign, v2_header_of

LEVELS_VERSION, CONST = 1, 1


def const_blob(count: int, value: int = 1) -> bytes:
    """A 7-byte levels blob (mode CONST) that decodes to ``count`` copies of ``value`` (|value| < 64)."""
    body = bytes([LEVELS_VERSION, CONST, (value << 1) ^ (value >> 63) if value >= 0 else (-value << 1) - 1])
    crc = zlib.crc32(body, zlib.crc32(struct.pack("<Q", count)))
    return body + struct.pack("<I", crc)


def _split(good: bytes) -> tuple[dict, bytes]:
    """The header and the data after it of a format-2 file."""
    payload = payload_of(good)
    length = struct.unpack_from("<I", payload)[0]
    return v2_header_of(good), payload[4 + length:]


def _layer_offsets(header: dict) -> list[tuple[int, int]]:
    """Per layer, the ``(start, end)`` of its scales and stream parts in the data after the header."""
    spans, pos = [], 0
    for layer in header["layers"]:
        count = layer.get("groups", 3) if layer["mode"] == "grid" else 3
        size = count * (2 if layer.get("scales16") else 4) + sum(layer["stream"]["blob_bytes"])
        h, w = _matrix(layer["shape"])
        for _, rank, _ in layer["stream"]["factored"]:
            size += (h * rank + 7) // 8 + (rank * w + 7) // 8
        spans.append((pos, pos + size))
        pos += size
    return spans


def _matrix(shape: list[int]) -> tuple[int, int]:
    return (shape[0], shape[1]) if len(shape) == 2 else (shape[0] * shape[2], shape[1] * shape[3])


def many_layers(good: bytes, count: int) -> bytes:
    """``good`` with ``count`` extra consistent all-zero 1x1 layers (12 zero bytes of scales each)."""
    header, data = _split(good)
    header = copy.deepcopy(header)
    spans = _layer_offsets(header)
    extra = [{"name": f"z{i}", "shape": [1, 1], "mode": "zero", "planes": 1, "exponents": [], "bound": 0,
              "mask_rank": 0, "reason": "", "dtype": "float32", "paper_bits": 96,
              "stream": {"coding": "none", "blob_bytes": [], "factored": []}} for i in range(count)]
    layers_end = spans[-1][1]
    header["layers"] = header["layers"] + extra
    return _rebuild(header, data[:layers_end] + bytes(12 * count) + data[layers_end:])


def _rebuild(header: dict, data: bytes) -> bytes:
    raw = zlib.compress(json.dumps(header).encode())
    return sign(struct.pack("<I", len(raw)) + raw + data, version=2)


def padded(good: bytes, pad_bytes: int) -> bytes:
    """``good`` with one more float tensor ``pad`` of ``pad_bytes`` zero bytes (raw float32): a larger file, so
    that size budgets (levels per file byte) let a bomb through to the checks behind them."""
    header, data = _split(good)
    header = copy.deepcopy(header)
    count = pad_bytes // 4
    header["floats"].append({"key": "pad", "dtype": "float32", "shape": [count], "stored": "raw"})
    return _rebuild(header, data + bytes(4 * count))


def level_bomb(good: bytes, levels: int, layer_index: int = 1) -> bytes:
    """``good`` with one composite/uniform layer's shape declared as ``[levels, 1]`` and its stream replaced by a
    7-byte CONST blob of that many levels (every CRC right)."""
    header, data = _split(good)
    header = copy.deepcopy(header)
    spans = _layer_offsets(header)
    layer = header["layers"][layer_index]
    start, end = spans[layer_index]
    scales = data[start:start + 3 * (2 if layer.get("scales16") else 4)]
    layer["shape"] = [levels, 1]
    layer["stream"] = {"coding": "ans", "blob_bytes": [7], "factored": []}
    layer.update(paper_bits=0, bound=0, mask_rank=0)
    return _rebuild(header, data[:start] + scales + const_blob(levels) + data[end:])


def constant_bomb(good: bytes, shape: tuple[int, ...] = (20000, 20000), dtype: str = "float64") -> bytes:
    """``good`` with one more float tensor, stored as one constant value but declared ``shape``."""
    header, data = _split(good)
    header = copy.deepcopy(header)
    header["floats"].append({"key": "bomb.weight", "dtype": dtype, "shape": list(shape), "stored": "constant",
                             "value": 0.5})
    return _rebuild(header, data)


def with_layer_edit(good: bytes, edit, scales: list[float] | None = None, layer_mode: str = "cbd") -> bytes:
    """``good`` whose first layer of ``layer_mode`` has its header entry changed by ``edit(layer)`` and, with
    ``scales``, its stored scales replaced (float32, the ``scales16`` flag dropped)."""
    import numpy as np

    header, data = _split(good)
    header = copy.deepcopy(header)
    spans = _layer_offsets(header)
    modes = [layer["mode"] for layer in header["layers"]]
    index = modes.index(layer_mode) if layer_mode in modes else next(i for i, m in enumerate(modes)
                                                                     if m in ("cbd", "uniform"))
    layer = header["layers"][index]
    start, end = spans[index]
    old = 3 * (2 if layer.get("scales16") else 4) if layer["mode"] != "grid" else \
        layer.get("groups", 3) * (2 if layer.get("scales16") else 4)
    stored = data[start:start + old]
    if scales is not None:
        layer.pop("scales16", None)
        stored = np.asarray(scales, "<f4").tobytes()
    edit(layer)
    return _rebuild(header, data[:start] + stored + data[start + old:])


def with_header_edit(good: bytes, edit) -> bytes:
    """``good`` whose header dict is changed by ``edit(header)`` (the data stay as they are)."""
    header, data = _split(good)
    header = copy.deepcopy(header)
    edit(header)
    return _rebuild(header, data)


_RAW = {"float32": "<f4", "float16": "<f2", "bfloat16": "<f4", "float64": "<f8"}


def with_float_value(good: bytes, key_suffix: str, value: float) -> bytes:
    """``good`` whose first stored (not constant) float tensor with a key ending in ``key_suffix`` has its first
    entry set to ``value`` (NaN or Inf: what no writer stores)."""
    import numpy as np

    header, data = _split(good)
    pos = _layer_offsets(header)[-1][1]
    for entry in header["floats"]:
        numel = int(np.prod(entry["shape"]))
        if entry["stored"] == "constant":
            continue
        dtype = np.dtype("<f2" if entry["stored"] == "float16" else _RAW[entry["dtype"]])
        if entry["key"].endswith(key_suffix):
            patched = bytearray(data)
            patched[pos:pos + dtype.itemsize] = np.asarray([value], dtype).tobytes()
            return _rebuild(header, bytes(patched))
        pos += numel * dtype.itemsize
    raise ValueError(f"no stored float tensor ending in {key_suffix}")
