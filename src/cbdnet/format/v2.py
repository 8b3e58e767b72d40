"""The payload of a format-2 ``.cbd`` file: a zlib-compressed JSON header and the coded layers.

Payload layout (inside the container of :mod:`.cbdfile`: magic, version 2, flags, length ... SHA-256)::

    u32          length H of the compressed header
    H bytes      zlib(JSON): architecture, config, and per layer its code's fields (mode, shape, planes,
                 exponents, ...) plus ``stream``: coding, blob sizes, factored planes [index, rank, CRC-32],
                 ``paper_bits`` (the layer's size counted as the paper counts it, for reports) and
                 ``scales16`` where its scales are stored as float16 (each one exactly; else float32);
                 per float tensor its key, state-dict dtype, shape and ``stored`` (float16 or raw)
    data         per layer: its scales, then its stream parts (see :mod:`cbdnet.codec.stream`);
                 then every float tensor (little-endian), in header order

Every size is derived from the header, and together they must tile the data exactly. Decoding rebuilds the
layer's sign and bit planes (packed, or the stored GF(2) factors) in the shape format 1 stores them, so the
checks of :mod:`.cbdfile` that follow are the same for both versions. Memory is bounded before anything is
decoded: the header inflates to at most ``MAX_HEADER_BYTES``, the layers may not claim more weights than
``MAX_LEVELS_PER_BYTE`` times the file's bytes (or ``MIN_LEVELS_BOUND``), and no stream may be larger than a
writer's for its layer. Reading is two passes: :func:`scan_payload` checks every header field and size against
the bytes without decoding a level (linear in the number of layers; ``cbdnet info`` stops there), then
:func:`decode_layer` decodes one layer at a time, either after the caller has checked every declared shape
against a model (``load``), or, without a model, only for a layer whose stream is not implausibly small for its
size (:func:`check_decodable_alone`). A constant float tensor is a read-only broadcast view of its one value.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from ..codec import CodeError, LayerCode
from ..codec.bits import pack_bits, packed_digest
from ..codec.code import stored_scales
from ..codec.entropy import narrowest_signed
from ..codec.floats import FLOATING, constant_value, exact_float16
from ..codec.stream import CODINGS, FactoredPlane, Stream, StreamError, decode_stream, factor_sizes
from ..errors import FormatError
from .entries import exponents_of, is_int, layer_fields, named, need, strict_json

__all__ = ["encode_payload", "decode_payload", "scan_payload", "header_of", "declared_data_size", "decode_layer",
           "check_decodable_alone",
           "float_tensor", "Scan", "LayerSpan",
           "FloatSpan", "MAX_HEADER_BYTES"]

MAX_HEADER_BYTES = 16 << 20
MAX_LEVELS_PER_BYTE = 4096  # 1/512 bit per weight: far below any code's rate
MIN_LEVELS_BOUND = 1 << 26
MAX_BLOB_BYTES_PER_LEVEL = 4
# decoding one layer without a model to bound it (``info --verify``): at most this many levels per byte of its
# own stream (a writer's densest stream, one level at probability 1023/1024, is ~5,700 levels per byte only on
# a whole layer of nearly one level; a 7-byte constant stream could claim 10^9), or the floor
MAX_VERIFY_LEVELS_PER_BYTE = 4096
MIN_VERIFY_LEVELS = 1 << 24
MAX_BLOB_OVERHEAD = 1 << 16
_LAYOUTS: dict[int, tuple[dict, list]] = {}  # id(header) -> (header, its layouts), from the size pass to the scan
_U32 = struct.Struct("<I")
_RAW = {"float32": "<f4", "float16": "<f2", "bfloat16": "<f4", "float64": "<f8", "int64": "<i8", "int32": "<i4",
        "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "?"}



# ---------------------------------------------------------------- writing

def encode_payload(meta: dict, codes: list[tuple[str, LayerCode]], floats: list[tuple[str, np.ndarray]]) -> bytes:
    """The format-2 payload for ``meta`` (the writer's metadata; its ``layers`` and ``floats`` are rewritten
    here), the layer codes and the float tensors (float16 where float16 holds every value exactly: lossless)."""
    data: list[bytes | memoryview] = []
    layers = []
    for entry, (_name, code) in zip(meta["layers"], codes, strict=True):
        stream = code.stream()
        layer = {k: v for k, v in entry.items() if k != "plane_codes"}
        layer["paper_bits"] = code.bits()  # the paper's fixed-length count, for reports (``info``)
        layer["stream"] = {"coding": stream.coding, "blob_bytes": [len(b) for b in stream.blobs],
                           "factored": [[f.index, f.rank, f.crc] for f in stream.factored]}
        scales = stored_scales(code.scales())
        if scales.dtype == np.float16:
            layer["scales16"] = True  # absent: float32
        layers.append(layer)
        data.append(scales.astype(scales.dtype.newbyteorder("<")).tobytes())
        data.extend(stream.parts())
    float_entries = []
    for (_key, array), entry in zip(floats, meta["floats"], strict=True):
        value = constant_value(array)
        if value is not None:  # e.g. a folded BatchNorm's unit scale and zero mean: the value, not the tensor
            float_entries.append({**entry, "stored": "constant", "value": value})
            continue
        half = exact_float16(array, entry["dtype"])
        stored = half if half is not None else np.asarray(array, dtype=_RAW[entry["dtype"]])
        float_entries.append({**entry, "stored": "float16" if half is not None else "raw"})
        data.append(np.ascontiguousarray(stored).astype(stored.dtype.newbyteorder("<")).tobytes())
    header = zlib.compress(json.dumps({**meta, "layers": layers, "floats": float_entries},
                                      separators=(",", ":"), sort_keys=True).encode(), 9)
    return _U32.pack(len(header)) + header + b"".join(data)


# ---------------------------------------------------------------- reading

def header_of(payload: bytes | memoryview) -> tuple[dict, int]:
    """The checked JSON header at the start of a format-2 payload (which may be cut after the header) and the
    offset of the data after it."""
    return _header(payload)


def _header(payload: bytes | memoryview) -> tuple[dict, int]:
    need(len(payload) >= _U32.size, "corrupt payload: no header")
    length = _U32.unpack_from(payload)[0]
    need(length <= len(payload) - _U32.size, f"corrupt payload: header length {length}")
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(payload[_U32.size:_U32.size + length], MAX_HEADER_BYTES)
    except zlib.error as exc:
        raise FormatError(f"corrupt header: {exc}") from None
    need(inflater.eof and not inflater.unconsumed_tail and not inflater.unused_data,
          f"corrupt header: not one zlib stream of at most {MAX_HEADER_BYTES} bytes")
    meta = strict_json(text, "header")
    need(isinstance(meta, dict) and meta.get("format") == "cbdnet", "corrupt header: not cbdnet metadata")
    need(isinstance(meta.get("layers"), list) and isinstance(meta.get("floats"), list), "corrupt header: no layers")
    return meta, _U32.size + length



def _int(value, what: str, low: int, high: int) -> int:
    if not (is_int(value) and low <= value <= high):  # (no message formatted on the hot path: 40k-layer headers)
        raise FormatError(f"corrupt header: {what} = {value!r}"[:200])
    return value


class _Cursor:
    def __init__(self, data: memoryview, start: int) -> None:
        self.data, self.pos = data, start

    def take(self, size: int, what: str) -> memoryview:
        if not 0 <= size <= len(self.data) - self.pos:
            raise FormatError(f"truncated payload: {what} needs {size} bytes"[:200])
        self.pos += size
        return self.data[self.pos - size:self.pos]


def _layer_shape(layer: dict) -> tuple[str, tuple[int, ...], type[LayerCode], tuple[int, ...]]:
    name, shape, kind, planes = layer_fields(layer, _int)
    exponents = layer.get("exponents")
    if not (isinstance(exponents, list) and len(exponents) == kind.expected_planes(planes)):
        raise FormatError(f"layer {name}: wrong number of exponents")
    exponents = exponents_of(exponents, name, _int)
    low = min(exponents, default=0)
    if [e - low for e in exponents] != list(range(len(exponents) - 1, -1, -1)):
        raise FormatError(f"layer {name}: exponents are not consecutive and descending")
    return name, shape, kind, exponents


def _stream_entry(layer: dict, name: str, h: int, w: int, nplanes: int) -> tuple[str, list[int], list]:
    stream = layer.get("stream")
    if not isinstance(stream, dict):
        raise FormatError(f"layer {name}: no stream entry")
    coding, sizes, factored = stream.get("coding"), stream.get("blob_bytes"), stream.get("factored")
    blobs = CODINGS.get(coding) if isinstance(coding, str) else None
    if isinstance(coding, str) and coding not in CODINGS and len(coding) <= 40:  # a long string is just corrupt
        raise FormatError(f"layer {name}: coding {coding!r} is not one this cbdnet reads (written by a newer "
                          "version?)"[:200])
    if not isinstance(coding, str) or blobs is None or (coding == "none") != (nplanes == 0):
        raise FormatError(f"layer {name}: bad coding {coding!r}"[:200])
    if not (isinstance(sizes, list) and len(sizes) == blobs):
        raise FormatError(f"layer {name}: bad blob sizes")
    sizes = [_int(s, "blob_bytes", 6, 1 << 40) for s in sizes]
    if not (isinstance(factored, list) and (coding == "gf2+ans" or not factored) and len(factored) <= nplanes):
        raise FormatError(f"layer {name}: bad factored-plane list")
    checked = []
    for entry in factored:
        need(isinstance(entry, list) and len(entry) == 3, f"layer {name}: bad factored plane")
        index = _int(entry[0], f"{name}.factored.index", 0, nplanes - 1)
        rank = _int(entry[1], f"{name}.factored.rank", 0, min(h, w))
        checked.append((index, rank, _int(entry[2], f"{name}.factored.crc", 0, (1 << 32) - 1)))
    if len({e[0] for e in checked}) != len(checked):
        raise FormatError(f"layer {name}: a plane is factored twice")
    return coding, sizes, checked


def _check_budget(layouts: list[_Layout], floats: list, payload_size: int) -> None:
    """Bound what a file may decode to by its size: coded weights and constant tensors (stored as one value)."""
    total = sum(math.prod(layout.shape) for layout in layouts if layout.exponents)
    bound = max(MIN_LEVELS_BOUND, MAX_LEVELS_PER_BYTE * payload_size)
    need(total <= bound, f"the layers claim {total} coded weights, more than this file's size allows ({bound})")
    constants = 0
    for entry in floats:
        if isinstance(entry, dict) and entry.get("stored") == "constant" and isinstance(entry.get("shape"), list):
            need(len(entry["shape"]) <= 8 and all(is_int(d) and 0 <= d <= 1 << 40 for d in entry["shape"]),
                  "corrupt header: bad constant tensor shape")
            constants += math.prod(entry["shape"])
    need(constants <= bound, f"the constant tensors claim {constants} values, more than this file's size allows")


@dataclass
class LayerSpan:
    """One layer as the file holds it, checked but not decoded: its header entry, its scales and the byte
    ranges of its stream parts (views into the payload)."""

    layer: dict
    name: str
    shape: tuple[int, ...]
    kind: type[LayerCode]
    num_planes: int
    exponents: tuple[int, ...]
    scales: np.ndarray  # float32
    half: bool  # the scales are stored as float16
    coding: str
    sizes: list[int]
    factored: list[tuple[int, int, int]]
    parts: list[memoryview]

    @property
    def matrix_shape(self) -> tuple[int, int]:
        shape = self.shape
        return (shape[0], shape[1]) if len(shape) == 2 else (shape[0] * shape[2], shape[1] * shape[3])

    @property
    def stream_bytes(self) -> int:
        return sum(len(part) for part in self.parts)


@dataclass
class FloatSpan:
    """One float tensor as the file holds it: its checked entry and its bytes (None for a constant)."""

    entry: dict
    key: str
    shape: tuple[int, ...]
    raw: memoryview | None


@dataclass
class Scan:
    """A format-2 payload checked from end to end without decoding any level: the header, every layer's scales
    and part sizes, every float tensor's place; sizes tile the payload exactly."""

    meta: dict
    layers: list[LayerSpan]
    floats: list[FloatSpan]


@dataclass
class _Layout:
    """What a layer's header entry says it stores, checked: sizes of its scales and of its stream parts."""

    name: str
    shape: tuple[int, ...]
    kind: type[LayerCode]
    num_planes: int
    exponents: tuple[int, ...]
    scale_count: int
    half: bool
    coding: str
    sizes: list[int]
    factored: list[tuple[int, int, int]]
    part_sizes: list[int]

    @property
    def nbytes(self) -> int:
        return self.scale_count * (2 if self.half else 4) + sum(self.part_sizes)


def _layout(layer: dict) -> _Layout:
    try:
        return _checked_layout(layer)
    except FormatError as exc:
        raise named(layer, exc) from None


def _checked_layout(layer: dict) -> _Layout:
    name, shape, kind, exponents = _layer_shape(layer)
    num_planes = layer["planes"]  # checked by _layer_shape
    h, w = (shape[0], shape[1]) if len(shape) == 2 else (shape[0] * shape[2], shape[1] * shape[3])
    try:
        count = kind.scale_count(shape, layer)
    except CodeError as exc:
        raise FormatError(f"layer {name}: {exc}") from None
    half = layer.get("scales16", False)
    if half is not True and half is not False:
        raise FormatError(f"layer {name}: bad scales16 flag")
    coding, sizes, factored = _stream_entry(layer, name, h, w, len(exponents))
    # a writer's blob is never larger than the levels packed at their width (<= 17 bits here) plus a few bytes
    if sum(sizes) > MAX_BLOB_BYTES_PER_LEVEL * h * w + MAX_BLOB_OVERHEAD:
        raise FormatError(f"layer {name}: {sum(sizes)} stream bytes for {h * w} levels: more than any writer stores")
    part_sizes = list(sizes)
    for _index, rank, _crc in factored:
        part_sizes += list(factor_sizes(h, w, rank))
    _int(layer.get("paper_bits"), "paper_bits", 0, 64 * math.prod(shape) + (1 << 20))
    return _Layout(name, shape, kind, num_planes, exponents, count, half, coding, sizes, factored, part_sizes)


def _scan_layer(layer: dict, out: _Layout, cursor: _Cursor) -> LayerSpan:
    width, raw = (2, "<f2") if out.half else (4, "<f4")
    scales = np.frombuffer(cursor.take(width * out.scale_count, "layer scales"), raw).astype(np.float32)
    parts = [cursor.take(size, "layer stream part") for size in out.part_sizes]
    return LayerSpan(layer, out.name, out.shape, out.kind, out.num_planes, out.exponents, scales, out.half,
                     out.coding, out.sizes, out.factored, parts)


def declared_data_size(meta: dict) -> int:
    """The bytes a format-2 header says follow it (every layer's scales and stream parts, every stored float
    tensor), from the header alone: a file of any other size is refused before the rest of it is read. (The
    layers' checked layouts are kept in ``meta`` for :func:`scan_payload`.)"""
    layouts = [_layout(layer) for layer in meta["layers"]]
    total = sum(layout.nbytes for layout in layouts)
    _LAYOUTS[id(meta)] = (meta, layouts)
    for entry in meta["floats"]:
        need(isinstance(entry, dict), "corrupt float entry")
        _key, shape, numpy_dtype = _float_layout(entry)
        total += 0 if numpy_dtype is None else math.prod(shape) * numpy_dtype.itemsize
    return total


def check_decodable_alone(span: LayerSpan) -> None:
    """Refuse to decode, without a model to bound it, a layer whose stream is far smaller than any writer's
    stream of its size (see :data:`MAX_VERIFY_LEVELS_PER_BYTE`)."""
    levels = math.prod(span.shape) if span.coding != "none" else 0
    limit = max(MIN_VERIFY_LEVELS, MAX_VERIFY_LEVELS_PER_BYTE * span.stream_bytes)
    need(levels <= limit, f"layer {span.name}: {levels:,} levels claimed from {span.stream_bytes:,} stream bytes "
                          f"(more than {MAX_VERIFY_LEVELS_PER_BYTE} per byte): not decoded without a model that has "
                          "that layer (cbdnet eval/load check it against the model first)"[:300])


def decode_layer(span: LayerSpan) -> tuple[dict, dict[str, np.ndarray], np.ndarray | None, Stream]:
    """One layer's entry in format 1's shape (``plane_codes`` with digests), its tensors by format-1 name, its
    signed levels (``h x w``, narrow integers; None for an all-zero layer), which the planes were made from, and
    the stream the file stored for them. Memory: this layer's levels and planes, nothing else."""
    name, exponents, kind, coding = span.name, span.exponents, span.kind, span.coding
    h, w = span.matrix_shape
    prefix = f"cbd/{name}/"
    tensors = {prefix + "scales": span.scales}
    entry = {k: v for k, v in span.layer.items() if k not in ("stream", "scales16")}
    entry["plane_codes"] = []
    if coding == "none":
        return entry, tensors, None, Stream("none")
    parts, factored = span.parts, span.factored
    try:
        q, stored = decode_stream(coding, parts, factored, h, w, exponents, span.shape)
    except StreamError as exc:
        raise FormatError(f"layer {name}: {exc}") from None
    planes = []
    for index, rank, crc in factored:
        plane = stored[index]
        if plane is None:  # decode_stream builds every plane it is given factors for: a bug, not a corrupt file
            raise AssertionError(f"layer {name}: factored plane {index} was not decoded")
        planes.append(FactoredPlane(index, rank, crc, plane.tensors["B"], plane.tensors["C"]))
    stream = Stream(coding, [bytes(part) for part in parts[:len(span.sizes)]], planes)
    if kind.stores_sign:
        tensors[prefix + "sign"] = pack_bits(q < 0)
    # the narrowest type that holds 2^J - 1: fast bit tests, and a small copy for the code to decode from
    narrow = narrowest_signed(0, (1 << len(exponents)) - 1)
    q = q.astype(narrow, copy=False)
    magnitude = np.abs(q)
    shifts = [e - min(exponents) for e in exponents]
    for index, (exponent, shift) in enumerate(zip(exponents, shifts, strict=True)):
        packed = pack_bits(magnitude & (1 << shift))  # packbits sets a bit for every non-zero entry
        plane = stored[index]
        if plane is None:
            tensors[f"{prefix}p{index}.bits"] = packed
            entry["plane_codes"].append({"exponent": exponent, "storage": "packed", "rank": -1,
                                         "sha256": packed_digest(packed)})
        else:
            tensors[f"{prefix}p{index}.B"], tensors[f"{prefix}p{index}.C"] = plane.tensors["B"], plane.tensors["C"]
            entry["plane_codes"].append({"exponent": exponent, "storage": "factored", "rank": plane.rank,
                                         "sha256": packed_digest(packed)})
    return entry, tensors, q, stream


def _float_layout(entry) -> tuple[str, tuple[int, ...], np.dtype | None]:
    """A float entry's key, shape and stored dtype (None: a constant, its value checked here), checked."""
    need(isinstance(entry, dict) and isinstance(entry.get("key"), str), "corrupt float entry")
    key, dtype, shape, stored = entry["key"], entry.get("dtype"), entry.get("shape"), entry.get("stored")
    need(isinstance(dtype, str) and dtype in _RAW, f"float tensor {key}: unsupported dtype {dtype!r}"[:200])
    need(isinstance(shape, list) and len(shape) <= 8 and all(is_int(d) and 0 <= d <= 1 << 40 for d in shape),
          f"float tensor {key}: bad shape"[:200])
    if stored == "constant":
        _constant_value(entry, key, _target(dtype))
        return key, tuple(shape), None
    need(stored == "raw" or (stored == "float16" and dtype in FLOATING), f"float tensor {key}: bad storage"[:200])
    return key, tuple(shape), np.dtype("<f2" if stored == "float16" else _RAW[dtype])


def _scan_float(entry, cursor: _Cursor) -> FloatSpan:
    key, shape, numpy_dtype = _float_layout(entry)
    if numpy_dtype is None:
        return FloatSpan(entry, key, shape, None)
    raw = cursor.take(math.prod(shape) * numpy_dtype.itemsize, f"float tensor {key}"[:100])
    return FloatSpan(entry, key, shape, raw)


def _target(dtype: str) -> np.dtype:
    return np.dtype(np.float32) if dtype == "bfloat16" else np.dtype(_RAW[dtype]).newbyteorder("=")


def float_tensor(span: FloatSpan) -> tuple[dict, dict[str, np.ndarray]]:
    """A float tensor's entry (format 1's shape) and its array. A constant is a read-only broadcast view of its
    one value: a declared shape costs no memory until a model that has that shape copies it."""
    entry, key = span.entry, span.key
    target = _target(entry["dtype"])
    if span.raw is None:
        value = _constant_value(entry, key, target)
        return ({k: v for k, v in entry.items() if k not in ("stored", "value")},
                {"float/" + key: np.broadcast_to(value, span.shape)})
    numpy_dtype = np.dtype("<f2" if entry["stored"] == "float16" else _RAW[entry["dtype"]])
    array = np.frombuffer(span.raw, numpy_dtype).reshape(span.shape)
    return {k: v for k, v in entry.items() if k != "stored"}, {"float/" + key: array.astype(target)}


def _constant_value(entry: dict, key: str, kind: np.dtype) -> np.ndarray:
    """A tensor stored as its one value: the value must be a number that ``kind`` holds exactly (finite)."""
    value = entry.get("value")
    need(isinstance(value, bool) if kind == np.bool_ else
          is_int(value) if np.issubdtype(kind, np.integer) else isinstance(value, (int, float)) and
          not isinstance(value, bool), f"float tensor {key}: bad constant {value!r}"[:200])
    with np.errstate(over="ignore", invalid="ignore"):
        try:
            cast = np.asarray(value).astype(kind)
        except (OverflowError, ValueError):
            cast = None
    if cast is None or not (bool(np.isfinite(cast) if kind.kind == "f" else True) and cast == value):
        raise FormatError(f"float tensor {key}: constant {value!r} does not fit {kind}"[:200])
    return cast


def scan_payload(payload: bytes | memoryview, header: tuple[dict, int] | None = None) -> Scan:
    """Check a format-2 payload without decoding a level: header, budget, every size against the bytes (which
    must be tiled exactly), every layer and float entry. Linear in the number of layers and tensors.
    ``header``: what :func:`header_of` returned for this payload (saves inflating it again)."""
    payload = memoryview(payload)
    meta, start = _header(payload) if header is None else header
    known = _LAYOUTS.pop(id(meta), None)
    layouts = known[1] if known is not None and known[0] is meta else [_layout(layer) for layer in meta["layers"]]
    _check_budget(layouts, meta["floats"], len(payload))
    cursor = _Cursor(payload, start)
    layers = [_scan_layer(layer, out, cursor) for layer, out in zip(meta["layers"], layouts, strict=True)]
    need(len({span.name for span in layers}) == len(layers), "corrupt header: duplicate layer names")
    floats = [_scan_float(entry, cursor) for entry in meta["floats"]]
    need(len({span.key for span in floats}) == len(floats), "corrupt header: duplicate float tensor keys")
    need(cursor.pos == len(payload), f"corrupt payload: {len(payload) - cursor.pos} bytes after the last tensor")
    return Scan(meta, layers, floats)


def decode_payload(payload: bytes | Scan
                   ) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Stream]]:
    """``(meta, tensors, levels, streams)``: meta and tensors in format 1's shape (see the module docstring), and
    per coded layer the signed levels its planes were built from and the stream stored for them; any
    inconsistency -> FormatError. ``payload``: the bytes, or their :func:`scan_payload`."""
    scan = payload if isinstance(payload, Scan) else scan_payload(payload)
    tensors: dict[str, np.ndarray] = {}
    layers, floats, levels, streams = [], [], {}, {}
    for span in scan.layers:
        entry, parts, signed, stream = decode_layer(span)
        layers.append(entry)
        tensors.update(parts)
        streams[entry["name"]] = stream
        if signed is not None:
            levels[entry["name"]] = signed
    for float_span in scan.floats:
        entry, parts = float_tensor(float_span)
        floats.append(entry)
        tensors.update(parts)
    return {**scan.meta, "layers": layers, "floats": floats}, tensors, levels, streams
