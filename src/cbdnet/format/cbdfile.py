"""The ``.cbd`` file: a bounded, checksummed container around a safetensors payload. No pickle anywhere.

Layout (all integers little-endian)::

    0   8 bytes   magic  b"\\x89CBD\\r\\n\\x1a\\n"
    8   u32       format version (2; version 1 is still read)
    12  u32       flags (0)
    16  u64       payload length N
    24  N bytes   payload: version 2, a zlib-compressed JSON header and the entropy-coded layers
                  (:mod:`.v2`); version 1, a safetensors payload whose ``__metadata__`` holds one entry,
                  ``cbdnet``, a JSON document (architecture, config, per-layer plane layout), described below
    24+N 32 bytes SHA-256 of bytes [0, 24+N)

A version-2 payload is decoded into the tensors and metadata a version-1 file holds (sign, planes, scales,
float tensors by name), so every check below applies to both. The rest of this note describes version 1.

Tensors are named ``cbd/<layer>/<part>`` (``scales``, ``sign``, ``p<k>.bits``, ``p<k>.B``, ``p<k>.C``, all
uint8 packed bits except ``scales``, float32 ``[max|w|, a, c]``, or for a ``grid`` layer its per-group steps,
the metadata adding ``groups``) and ``float/<state-dict key>``. Every
tensor's dtype and size is checked against what the metadata implies before anything is decoded, and each
plane's SHA-256 is kept so that ``verify`` can check ``B @ C`` against the plane bit for bit.

Reading a file from a stranger is safe: the file's header must account for its size before the rest is read
(a 2 GiB file with a valid prefix costs one header); the checksum is computed as the bytes are read, into one
buffer, and checked before anything else; every invariant the writers keep is checked for both versions by
one checker (:mod:`.entries`: scales, flags, header version, rank fields; NaN/Inf floats are refused by
``load``); format 2 is decoded only after ``load`` has checked every declared shape against the model
(``read(decode=False)`` decodes nothing, ``verify`` one layer at a time); the safetensors JSON header is
validated here (tensor count, dtypes, shapes, byte ranges that tile the data exactly) before the
safetensors parser allocates anything; JSON failures of every kind become :class:`FormatError`; all-zero
layers (which store no bits) are bounded; ``load`` builds the architecture on the ``meta`` device and checks
it against the file before allocating it; decoded weights must be finite. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar, cast

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from torch import nn

from .._version import __version__
from ..codec import CodeError, LayerCode, PlaneCode, plane_digest
from ..codec.bits import packed_size
from ..codec.stream import FactoredPlane, Stream, factor_sizes
from ..errors import CBDError, FormatError
from ..fileio import OutputSet, escape_name, read_regular_file
from ..nn import CBDModule, from_module
from ..nn.modules import coded_key, coded_weight, is_compressible
from ..nn.state import record, recorded
from ..nn.walk import coded_keys
from . import v2
from .entries import (
    check_finite_floats,
    check_scales,
    exponents_of,
    is_int,
    layer_fields,
    named,
    need,
    strict_json,
)

__all__ = ["save", "load", "read", "parse", "verify", "atomic_write", "check_writable", "check_fits", "CBDFile",
           "release_free_memory",
           "FORMAT_VERSION",
           "MAGIC"]

MAGIC = b"\x89CBD\r\n\x1a\n"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
_PREFIX = struct.Struct("<8sIIQ")
_DIGEST = 32
MAX_FILE_BYTES = 4 << 30  # a whole .cbd file (VGG-16 at 32 bits/weight would be 0.55 GB)
MAX_ARCH_ARG = 100_000  # |numeric architecture argument| a file may carry, e.g. num_classes
MAX_ARCH_KWARGS = 32
MAX_HEADER_BYTES = 16 << 20  # safetensors JSON header (ResNet-110's is ~0.2 MB)
MAX_TENSORS = 200_000
MAX_ZERO_NUMEL = 1 << 28  # all-zero layers store no bits: bound what loading one may allocate
MAX_DIMS = 8
# safetensors dtypes numpy can hold, with their item sizes; anything else is refused before parsing
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "I32": 4, "U32": 4, "F32": 4,
                "I64": 8, "U64": 8, "F64": 8}
# float/<key> tensors: the state-dict dtype named in the metadata -> the numpy dtype stored
_FLOAT_STORED = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32, "float64": np.float64,
                 "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
                 "bool": np.bool_}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


class _HasShape(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...


# What a file's layers are (LayerCode decoded, LayerSummary read with decode=False, _Shaped in a header's view)
# and its float tensors (arrays, or _Shaped in a header's view). Covariant: a file's mappings are built once and
# never assigned to, so a CBDFile[LayerCode, np.ndarray] is a CBDFile[_HasShape, _HasShape] wherever only shapes
# are read (check_fits).
CodeT = TypeVar("CodeT", covariant=True)
FloatT = TypeVar("FloatT", covariant=True)


@dataclass
class CBDFile(Generic[CodeT, FloatT]):
    """A parsed, checksum-verified ``.cbd`` file: the metadata and the layer codes, nothing decoded."""

    meta: dict
    codes: dict[str, CodeT]
    floats: dict[str, FloatT]
    size: int
    version: int = FORMAT_VERSION  # the container's format version
    scan: v2.Scan | None = None  # format 2 read with decode=False: codes are LayerSummary, levels not decoded

    @property
    def decoded(self) -> bool:
        return self.scan is None


@dataclass
class LayerSummary:
    """A format-2 layer as ``read(path, decode=False)`` gives it: what its header and scales say (shape, code,
    plane storage, sizes), checked as the decoding reader checks them, with no level decoded. It answers what
    ``cbdnet info`` asks of a :class:`LayerCode` (``bits``, ``coded_bits``, ``stream().coding``, ``wmax``...)."""

    span: v2.LayerSpan

    @property
    def num_planes(self) -> int:
        return self.span.num_planes

    @property
    def shape(self) -> tuple[int, ...]:
        return self.span.shape

    @property
    def mode(self) -> str:
        return self.span.kind.kind

    @property
    def exponents(self) -> tuple[int, ...]:
        return self.span.exponents

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return self.span.matrix_shape

    @property
    def label(self) -> str:
        """The table's name of the code, as :attr:`LayerCode.label` gives it for a decoded layer."""
        return layer_label(self.span.layer) or ("zero" if self.mode == "zero" else f"{self.mode} J={self.num_planes}")

    @property
    def reason(self) -> str:
        reason = self.span.layer.get("reason", "")
        return reason if isinstance(reason, str) else ""

    @property
    def planes(self) -> list[PlaneCode]:
        """Each plane's exponent, storage and rank (no bits: ``tensors`` is empty)."""
        ranks = {index: rank for index, rank, _crc in self.span.factored}
        return [PlaneCode(e, "factored" if i in ranks else "packed", ranks.get(i, -1), {}, "")
                for i, e in enumerate(self.exponents)]

    @property
    def wmax(self) -> float:
        return float(self.span.scales[0]) if self.mode in ("cbd", "uniform") else 0.0

    @property
    def scale(self) -> float:
        return float(self.span.scales[1]) if self.mode in ("cbd", "uniform") else 0.0

    @property
    def step(self) -> float:
        return float(self.span.scales[2]) if self.mode in ("cbd", "uniform") else 0.0

    def stream(self) -> Stream:
        """The stored stream's coding and part sizes (factored planes as their stored B and C bytes)."""
        count = len(self.span.sizes)
        blobs: list[bytes | memoryview] = list(self.span.parts[:count])  # views of the file's bytes: no copy
        factored = []
        for k, (index, rank, crc) in enumerate(self.span.factored):
            left, right = self.span.parts[count + 2 * k], self.span.parts[count + 2 * k + 1]
            factored.append(FactoredPlane(index, rank, crc, np.frombuffer(left, np.uint8),
                                          np.frombuffer(right, np.uint8)))
        return Stream(self.span.coding, blobs, factored)

    def bits(self) -> int:
        """The paper's fixed-length count, as :meth:`LayerCode.bits` counts it: sign, planes (packed or factors,
        byte-padded), float32 scales."""
        h, w = self.span.matrix_shape
        total = 4 * self.span.scales.size + (packed_size(h * w) if self.span.kind.stores_sign and self.exponents
                                             else 0)
        for plane in self.planes:
            total += packed_size(h * w) if plane.rank < 0 else sum(factor_sizes(h, w, plane.rank))
        return 8 * total

    def coded_bits(self) -> int:
        return 8 * (self.span.stream_bytes + self.span.scales.size * (2 if self.span.half else 4))


StoredCode = LayerCode | LayerSummary  # a layer of a file as read: decoded, or (format 2, decode=False) not
ReadFile = CBDFile[StoredCode, np.ndarray]  # a file as read() gives it
DecodedFile = CBDFile[LayerCode, np.ndarray]
ShapeView = CBDFile[_HasShape, _HasShape]  # as much as check_fits reads


# ---------------------------------------------------------------- writing

def _layer_meta(name: str, code: LayerCode, dtype: torch.dtype) -> dict:
    meta = {
        "name": name, "shape": list(code.shape), "mode": code.mode, "planes": code.num_planes,
        "exponents": list(code.exponents), "bound": code.bound, "mask_rank": code.mask_rank,
        "reason": code.reason, "dtype": str(dtype).removeprefix("torch."),
        "plane_codes": [{"exponent": p.exponent, "storage": p.storage, "rank": p.rank, "sha256": p.digest}
                        for p in code.planes],
    }
    meta.update(code.meta())
    if code.extra.get("label"):  # the code's name in tables (rtn4/ch, w2e0.5/ch ...), so info shows what compress did
        meta["label"] = code.extra["label"]
    return meta


def _float_array(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: store the float32 value (exact)
        tensor = tensor.float()
    return tensor.numpy()


def _model_dtype(model: nn.Module) -> str:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


def _coded_layers(model: nn.Module) -> tuple[list[tuple[str, CBDModule]], list[dict]]:
    """The CBD modules that carry a code of their own, and the tied ones (sharing an earlier module's weight),
    each checked to still hold the weight its code decodes to."""
    owners: dict[int, str] = {}
    coded, tied = [], []
    for name, module in model.named_modules():
        if not isinstance(module, CBDModule):
            continue
        if not module.code_matches_weight():
            raise CBDError(f"layer {name}: its weight was changed after compression, so its stored code no longer "
                           "describes it; compress the model again to store the edit")
        owner = owners.get(id(module.weight))
        if owner is not None:
            tied.append({"name": name, "owner": owner})
        else:
            owners[id(module.weight)] = name
            coded.append((name, module))
    return coded, tied


def _code_of(module: CBDModule) -> LayerCode:
    code = module.code
    assert code is not None, "a CBD module without a code"  # _coded_layers checked each against its weight
    return code


def _no_codes_message(model: nn.Module) -> str:
    """Why a model without compressed layers cannot be saved, and what to do: an int8-runtime model (its
    weights are quantized tensors, the .cbd codes are gone) is not a model that was never compressed."""
    quantized = any(isinstance(t, torch.Tensor) and t.is_quantized for t in model.state_dict().values()) \
        or recorded(model, "int8_report") is not None
    if quantized:
        return ("an int8-runtime model (cbdnet.load(..., runtime='int8')) cannot be saved as a .cbd file: its "
                "layers hold torch int8 kernels, not .cbd codes; keep the .cbd file it was loaded from, or load "
                "that file with runtime='float' (the default) to save it again")
    return "the model has no compressed layers: run cbdnet.compress(model) first"


def encode_file(model: nn.Module, *, arch: str | None = None, arch_kwargs: dict | None = None,
                extra: dict | None = None, version: int = FORMAT_VERSION) -> bytes:
    """The bytes of the ``.cbd`` file for a compressed model. ``extra`` defaults to the config that
    :func:`cbdnet.compress` recorded on the model. Format 2 stores a float tensor as float16 where float16 holds
    it exactly (:func:`cbdnet.compress` rounds them so, unless asked for ``float32``), so saving is lossless;
    ``version=1`` writes the old format."""
    if version not in READ_VERSIONS:
        raise CBDError(f"cannot write .cbd format version {version}; versions: {READ_VERSIONS}")
    tensors: dict[str, np.ndarray] = {}
    layers = []
    coded, tied = _coded_layers(model)
    if not coded:
        raise CBDError(_no_codes_message(model))
    with _codes_held(module for _, module in coded):
        for name, module in coded:
            code = _code_of(module)
            layers.append(_layer_meta(name, code, module.weight.dtype))
            for part, array in code.tensors().items():
                tensors[f"cbd/{name}/{part}"] = np.ascontiguousarray(array)
    skipped = coded_keys(model)
    floats, float_arrays = [], []
    for key, value in model.state_dict().items():
        if key not in skipped:
            tensors[f"float/{key}"] = _float_array(value)
            float_arrays.append((key, tensors[f"float/{key}"]))
            floats.append({"key": key, "dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)})
    if extra is None:
        config = recorded(model, "config")
        extra = {"config": config} if config is not None else {}
    for key in ("weights_sha256", "weights_source"):
        if recorded(model, key) is not None and key not in extra:
            extra = {**extra, key: recorded(model, key)}
    meta = {
        "format": "cbdnet", "format_version": version, "cbdnet_version": __version__,
        "arch": arch if arch is not None else recorded(model, "arch"),
        "arch_kwargs": arch_kwargs if arch_kwargs is not None else recorded(model, "arch_kwargs", {}),
        "dtype": _model_dtype(model), "layers": layers, "floats": floats, "extra": extra,
    }
    if tied:
        meta["tied"] = tied
    if version == 1:
        payload = st_save(tensors, metadata={"cbdnet": json.dumps(meta, sort_keys=True)})
    else:
        payload = v2.encode_payload(meta, [(name, _code_of(module)) for name, module in coded], float_arrays)
    head = _PREFIX.pack(MAGIC, version, 0, len(payload)) + payload
    return head + hashlib.sha256(head).digest()


def atomic_write(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to ``path`` under the output policy (:class:`cbdnet.fileio.OutputSet`): a temporary file
    beside it, then an exclusive link (or, with ``overwrite``, a rename). ``path`` is never half-written; a
    symbolic link, device, FIFO or directory there is refused, and so is an existing file without ``overwrite``."""
    with OutputSet(force=overwrite) as out:
        target = out.add(path, what="output file")
        out.write(target, data)
        out.commit()


def check_writable(path: str | os.PathLike, *, overwrite: bool = True) -> None:
    """Refuse an output path early (before any work), by the rules of :meth:`cbdnet.fileio.OutputSet.add`."""
    OutputSet(force=overwrite).add(path, what="output file")


def save(model: nn.Module, path: str | os.PathLike, *, arch: str | None = None, arch_kwargs: dict | None = None,
         extra: dict | None = None, overwrite: bool = True) -> int:
    """Write a compressed model to ``path`` (atomically, see :func:`atomic_write`: an existing regular file is
    replaced only with ``overwrite``; a symlink, device, FIFO or directory never); returns the file size.
    Saving is lossless: :func:`load` gives back this model's weights and float tensors bit for bit."""
    data = encode_file(model, arch=arch, arch_kwargs=arch_kwargs, extra=extra)
    atomic_write(path, data, overwrite=overwrite)
    return len(data)


# ---------------------------------------------------------------- reading


def _int(value, name: str, low: int, high: int) -> int:
    if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= high):
        raise FormatError(f"corrupt metadata: {name} = {value!r} is not an integer in [{low}, {high}]"[:300])
    return value


def _check_prefix(prefix: bytes | bytearray, size: int) -> tuple[int, int]:
    """The container's version and payload length from its first 24 bytes, checked against the file's size."""
    need(size >= _PREFIX.size + _DIGEST, f"not a .cbd file: {size} bytes is too short")
    magic, version, flags, length = _PREFIX.unpack_from(prefix)
    need(magic == MAGIC, "not a .cbd file (bad magic bytes)")
    need(version <= max(READ_VERSIONS),
          f"this file has .cbd format version {version}; this cbdnet ({__version__}) reads up to "
          f"version {max(READ_VERSIONS)}: upgrade cbdnet")
    need(version in READ_VERSIONS, f"unknown .cbd format version {version}")
    need(flags == 0, f"corrupt .cbd file: flags 0x{flags:08x} (every writer stores 0)")
    need(length == size - _PREFIX.size - _DIGEST,
          f"truncated or padded .cbd file: payload length {length} does not match the file size {size}")
    return version, length


def _split_container(data: bytes | bytearray, digest: bytes | None = None) -> tuple[int, memoryview]:
    """``(version, payload)`` of a container, its SHA-256 checked (``digest``: that of the bytes before the
    trailer, computed by the caller). The payload is a view: no copy of the file."""
    version, _length = _check_prefix(data[:_PREFIX.size], len(data))
    view = memoryview(data)
    body = view[:-_DIGEST]
    digest = hashlib.sha256(body).digest() if digest is None else digest
    need(digest == bytes(view[-_DIGEST:]), "checksum mismatch: the .cbd file is corrupt or was modified")
    payload = body[_PREFIX.size:]
    if version == 1:
        need(len(payload) >= 8, "corrupt payload: no tensor header")
        header_len = struct.unpack_from("<Q", payload)[0]
        need(header_len <= min(MAX_HEADER_BYTES, len(payload) - 8), f"corrupt payload: header length {header_len}")
    return version, payload


def _tensor_header(payload: bytes) -> dict:
    """Check the safetensors JSON header ourselves before the safetensors parser sees (and allocates for) it:
    a bounded tensor count, known dtypes, at most MAX_DIMS non-negative dimensions, and byte ranges that tile
    the data section exactly (so the parser allocates no more than the file holds). Returns the metadata."""
    header_len = struct.unpack_from("<Q", payload)[0]
    raw = payload[8:8 + header_len]
    need(raw.count(b"data_offsets") <= MAX_TENSORS, f"corrupt payload: more than {MAX_TENSORS} tensors")
    header = strict_json(raw, "payload header")
    need(isinstance(header, dict) and len(header) <= MAX_TENSORS + 1, "corrupt payload header")
    data_len = len(payload) - 8 - header_len
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            need(isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values()),
                  "corrupt payload header: __metadata__ is not a string map")
            continue
        need(isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"},
              f"corrupt payload header: entry {name[:80]!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        need(isinstance(dtype, str) and dtype in _ST_ITEMSIZE, f"tensor {name[:80]!r}: unsupported dtype {dtype!r}")
        need(isinstance(shape, list) and len(shape) <= MAX_DIMS and all(is_int(d) and d >= 0 for d in shape),
              f"tensor {name[:80]!r}: bad shape")
        need(isinstance(offsets, list) and len(offsets) == 2 and all(is_int(o) for o in offsets),
              f"tensor {name[:80]!r}: bad data offsets")
        begin, end = offsets
        need(0 <= begin <= end <= data_len and end - begin == math.prod(shape) * _ST_ITEMSIZE[dtype],
              f"tensor {name[:80]!r}: data offsets {offsets} do not fit its shape or the payload")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        need(begin == position, "corrupt payload: tensor data overlaps or leaves gaps")
        position = end
    need(position == data_len, "corrupt payload: tensor data does not fill the payload")
    return header.get("__metadata__") or {}


def _parse_meta(payload: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    st_meta = _tensor_header(payload)
    try:
        tensors = st_load(payload)
    except Exception as exc:  # the safetensors parser: any failure means a malformed payload
        raise FormatError(f"corrupt tensor payload: {str(exc)[:200]}") from None
    raw = st_meta.get("cbdnet")
    if not isinstance(raw, str):
        raise FormatError("no cbdnet metadata in the payload")
    return _check_meta(strict_json(raw, "cbdnet metadata")), tensors


def _check_meta(meta, version: int | None = None) -> dict:
    need(isinstance(meta, dict) and meta.get("format") == "cbdnet", "corrupt cbdnet metadata")
    need(isinstance(meta.get("layers"), list) and isinstance(meta.get("floats"), list),
          "corrupt cbdnet metadata: no layer list")
    need(len(meta["layers"]) > 0, "corrupt cbdnet metadata: no compressed layers")
    if version is not None:  # the writer records the container's version in the header too
        need(meta.get("format_version", version) == version and (version == 1 or "format_version" in meta),
              f"corrupt cbdnet metadata: format_version {meta.get('format_version')!r} in a version-{version} "
              "container"[:200])
    dtype = meta.get("dtype", "float32")
    need(isinstance(dtype, str) and dtype in _DTYPES, f"corrupt cbdnet metadata: dtype {dtype!r}")
    need(meta.get("arch") is None or isinstance(meta.get("arch"), str), "corrupt cbdnet metadata: arch")
    kwargs = meta.get("arch_kwargs") or {}
    need(isinstance(kwargs, dict) and all(isinstance(v, (int, float, str, bool)) for v in kwargs.values()),
          "corrupt cbdnet metadata: arch_kwargs must map names to numbers or strings")
    _check_arch_kwargs(kwargs)
    return meta


def _check_arch_kwargs(kwargs: dict) -> None:
    """Bound the architecture arguments a file may carry, so that it cannot describe a huge model: at most
    :data:`MAX_ARCH_KWARGS` of them, numbers within ``±MAX_ARCH_ARG`` (e.g. ``num_classes``), short strings."""
    need(len(kwargs) <= MAX_ARCH_KWARGS, f"corrupt cbdnet metadata: {len(kwargs)} arch_kwargs (> {MAX_ARCH_KWARGS})")
    for key, value in kwargs.items():
        shown = escape_name(key, max_len=60)
        if isinstance(value, str):
            need(len(value) <= 200, f"arch_kwargs {shown}: a string of {len(value)} characters (limit 200)")
        elif not isinstance(value, bool):
            need(math.isfinite(value) and abs(value) <= MAX_ARCH_ARG,
                  f"arch_kwargs {shown} = {value!r} is out of range (|value| <= {MAX_ARCH_ARG:,}): refusing to build "
                  "the model it describes")


def _expect(tensors: dict, key: str, dtype, size: int) -> np.ndarray:
    array = tensors.get(key)
    if array is None:
        raise FormatError(f"missing tensor {key}")
    if not (array.dtype == dtype and array.ndim == 1 and array.size == size):
        raise FormatError(f"tensor {key} has dtype {array.dtype} and shape {array.shape}; expected "
                          f"{np.dtype(dtype)} [{size}]")
    return array


def _planes(name: str, layer: dict, exponents: tuple[int, ...], h: int, w: int, tensors: dict, used: set
            ) -> list[PlaneCode]:
    planes = []
    for index, (entry, exponent) in enumerate(zip(layer["plane_codes"], exponents, strict=True)):
        need(isinstance(entry, dict) and entry.get("exponent") == exponent, f"layer {name}: bad plane {index}")
        storage, digest = entry.get("storage"), entry.get("sha256")
        need(isinstance(digest, str) and len(digest) == 64, f"layer {name}: plane {index} has no digest")
        rank = _int(entry.get("rank"), f"{name}.plane{index}.rank", -1, min(h, w))
        if storage == "packed":
            parts = {"bits": packed_size(h * w)}
        else:
            need(storage == "factored" and rank >= 0, f"layer {name}: plane {index} storage {storage!r}")
            parts = {"B": packed_size(h * rank), "C": packed_size(rank * w)}
        stored = {}
        for part, size in parts.items():
            key = f"cbd/{name}/p{index}.{part}"
            stored[part] = _expect(tensors, key, np.uint8, size)
            used.add(key)
        planes.append(PlaneCode(exponent, storage, rank, stored, digest))
    return planes


def _layer_common(layer: dict, kind: type[LayerCode], name: str, shape: tuple[int, ...], num_planes: int,
                  exponents: tuple[int, ...], scales: np.ndarray) -> dict:
    """The checks of a layer entry that need no plane (both readers, and format 2 without decoding): dtype,
    exponents of its kind, scales as its writer makes them, rank fields; returns the fields they checked."""
    layer_dtype = layer.get("dtype", "float32")
    if not (isinstance(layer_dtype, str) and layer_dtype in _DTYPES):
        raise FormatError(f"layer {name}: bad dtype {layer_dtype!r}"[:200])
    h, w = (shape[0], shape[1]) if len(shape) == 2 else (shape[0] * shape[2], shape[1] * shape[3])
    try:
        kind.check_exponents(num_planes, exponents)
    except CodeError as exc:
        raise FormatError(f"layer {name}: {exc}") from None
    check_scales(name, kind.kind, scales, num_planes)
    label = layer_label(layer)
    return {"reason": str(layer.get("reason", "")),
            "bound": _int(layer.get("bound", 0), "bound", 0, min(h, w)),
            "mask_rank": _int(layer.get("mask_rank", 0), "mask_rank", 0, min(h, w)),
            **({"extra": {"label": label}} if label else {})}


LABEL = re.compile(r"[A-Za-z0-9 =./_+-]{1,32}")


def layer_label(layer: dict) -> str:
    """A layer's optional ``label`` (the code's name in tables, written since 0.3): short, plain ASCII, or absent;
    anything else is a :class:`FormatError`."""
    label = layer.get("label")
    if label is None:
        return ""
    need(isinstance(label, str) and LABEL.fullmatch(label) is not None, f"layer {layer.get('name')!r}: bad label")
    return label


def _layer_code(layer: dict, tensors: dict, used: set) -> tuple[str, LayerCode]:
    """One layer's code: the common parts checked here, the kind's own parts by its class."""
    try:
        return _checked_layer_code(layer, tensors, used)
    except FormatError as exc:
        raise named(layer, exc) from None


def _checked_layer_code(layer: dict, tensors: dict, used: set) -> tuple[str, LayerCode]:
    name, shape, kind, num_planes = layer_fields(layer, _int)
    plane_meta, listed = layer.get("plane_codes"), layer.get("exponents")
    if not (isinstance(plane_meta, list) and isinstance(listed, list)):
        raise FormatError(f"layer {name}: no plane list")
    need(len(plane_meta) == len(listed) == kind.expected_planes(num_planes),
          f"layer {name}: {len(plane_meta)} planes stored, {kind.expected_planes(num_planes)} expected")
    exponents = exponents_of(listed, name, _int)
    h, w = (shape[0], shape[1]) if len(shape) == 2 else (shape[0] * shape[2], shape[1] * shape[3])
    prefix = f"cbd/{name}/"
    try:
        scales = _expect(tensors, prefix + "scales", np.float32, kind.scale_count(shape, layer))
        checked = _layer_common(layer, kind, name, shape, num_planes, exponents, scales)
        used.add(prefix + "scales")
        sign = np.zeros(0, np.uint8)
        if kind.stores_sign:
            sign = _expect(tensors, prefix + "sign", np.uint8, packed_size(h * w))
            used.add(prefix + "sign")
        common = {"shape": shape, "num_planes": num_planes, "exponents": exponents, "sign": sign,
                  "planes": _planes(name, layer, exponents, h, w, tensors, used), **checked}
        return name, kind.from_stored(common, scales, layer)
    except CodeError as exc:
        raise FormatError(f"layer {name}: {exc}") from None


def read(path: str | os.PathLike, *, decode: bool = True,
         header_check: Callable[[ShapeView], None] | None = None) -> ReadFile:
    """Parse and validate a ``.cbd`` file (checksum, metadata, every tensor's dtype and size). Only a regular
    file of at most :data:`MAX_FILE_BYTES` is opened: a FIFO, device or symlink to one is refused unread; a
    file whose size its header does not account for is refused after reading the header only, and the
    checksum is computed on the bytes as read (no copy). ``decode=False``: a format-2 file's levels are not
    decoded (its codes are :class:`LayerSummary`; see :func:`parse`). ``header_check(view)``: called on a
    format-2 file's header alone (a :class:`CBDFile` whose codes and floats have shapes only), before the rest
    of the file is read, e.g. to refuse a file that does not fit a model."""
    seen: dict = {}
    body = _BodyHash()

    def inspect(take: Callable[[int], bytes], size: int) -> None:
        body.left = max(0, size - _DIGEST)
        seen["header"] = _inspect(take, size, header_check)

    data = read_regular_file(path, what="file", max_bytes=MAX_FILE_BYTES, inspect=inspect, hasher=body,
                             as_buffer=True)
    return parse(data, decode=decode, header=seen.get("header"), digest=body.digest())


class _BodyHash:
    """SHA-256 of a file's bytes but its last 32 (the stored digest), fed chunk by chunk as the file is read."""

    def __init__(self) -> None:
        self.hash, self.left = hashlib.sha256(), 0

    def update(self, chunk) -> None:
        part = memoryview(chunk)[:self.left]
        self.hash.update(part)
        self.left -= len(part)

    def digest(self) -> bytes:
        return self.hash.digest()


def _inspect_v1(take: Callable[[int], bytes], length: int) -> None:
    """A format-1 payload's safetensors header must account for the payload's size (its tensors tile it)."""
    head = take(8)
    need(len(head) == 8, "corrupt payload: no tensor header")
    header_len = struct.unpack("<Q", head)[0]
    need(header_len <= min(MAX_HEADER_BYTES, length - 8), f"corrupt payload: header length {header_len}")
    header = strict_json(take(header_len), "payload header")
    need(isinstance(header, dict), "corrupt payload header")
    ends: list[Any] = [entry.get("data_offsets") for name, entry in header.items() if name != "__metadata__"
            and isinstance(entry, dict)]
    need(all(isinstance(e, list) and len(e) == 2 and all(is_int(o) for o in e) for e in ends),
          "corrupt payload header: bad data offsets")
    declared = 8 + header_len + max((e[1] for e in ends), default=0)
    need(declared == length, f"corrupt .cbd file: its header accounts for {declared:,} payload bytes, the file "
                             f"holds {length:,}")


@dataclass
class _Shaped:
    shape: tuple[int, ...]


def _header_view(meta: dict, size: int) -> CBDFile[_Shaped, _Shaped]:
    """A format-2 header as a :class:`CBDFile` of shapes (for :func:`check_fits`), its fields checked."""
    meta = _check_meta(meta, 2)
    codes = {}
    for layer in meta["layers"]:
        name, shape, _kind, _planes = layer_fields(layer, _int)
        need(name not in codes, "corrupt header: duplicate layer names")
        codes[name] = _Shaped(shape)
    floats = {entry["key"]: _Shaped(tuple(entry["shape"])) for entry in meta["floats"]}  # checked by the size pass
    need(len(floats) == len(meta["floats"]), "corrupt header: duplicate float tensor keys")
    view = CBDFile(meta=meta, codes=codes, floats=floats, size=size, version=2)
    _tied(view)
    return view


def _inspect(take: Callable[[int], bytes], size: int, header_check: Callable[[ShapeView], None] | None = None
             ) -> tuple[dict, int] | None:
    """Refuse a file before reading it whole: its prefix must match its size, and a format-2 header must
    account for every byte of it (the declared layer streams and float tensors)."""
    prefix = take(_PREFIX.size)
    need(len(prefix) == _PREFIX.size, f"not a .cbd file: {size} bytes is too short")
    version, length = _check_prefix(prefix, size)
    if version == 1:
        _inspect_v1(take, length)
        return None
    head = take(4)
    need(len(head) == 4, "corrupt payload: no header")
    header_len = struct.unpack("<I", head)[0]
    need(header_len <= min(length - 4, MAX_HEADER_BYTES), f"corrupt payload: header length {header_len}")
    meta, start = v2.header_of(head + take(header_len))
    declared = start + v2.declared_data_size(meta)
    need(declared == length, f"corrupt .cbd file: its header accounts for {declared:,} payload bytes, the file "
                             f"holds {length:,}")
    if header_check is not None:
        header_check(_header_view(meta, size))
    return meta, start


def _float_tensor(entry, tensors: dict) -> tuple[str, np.ndarray]:
    """A ``float/<key>`` tensor, its dtype and shape checked against its metadata entry. (Files written before
    the shape was recorded have none: their float tensors are still checked against the model by ``load``.)"""
    need(isinstance(entry, dict) and isinstance(entry.get("key"), str), "corrupt float entry")
    key, dtype = entry["key"], entry.get("dtype")
    need(isinstance(dtype, str) and dtype in _FLOAT_STORED, f"float tensor {key}: unsupported dtype {dtype!r}")
    array = tensors.get("float/" + key)
    if array is None:
        raise FormatError(f"missing tensor float/{key}")
    shape = entry.get("shape", list(array.shape))
    need(isinstance(shape, list) and len(shape) <= MAX_DIMS and all(is_int(d) and d >= 0 for d in shape),
          f"float tensor {key}: bad shape {shape!r}")
    need(array.dtype == _FLOAT_STORED[dtype] and list(array.shape) == shape,
          f"tensor float/{key} is {array.dtype} {list(array.shape)}; the metadata says {dtype} {shape}")
    return key, array


def parse(data: bytes | bytearray, *, decode: bool = True, header: tuple[dict, int] | None = None,
          digest: bytes | None = None) -> ReadFile:
    """Parse and validate the bytes of a ``.cbd`` file (see :func:`read`). ``decode=False``: a format-2 file is
    checked from end to end (sizes, scales, float tensors, every header field) but its levels are not decoded:
    its codes are :class:`LayerSummary` objects and :func:`decode_codes` decodes them later; format 1 is
    always decoded (its size is its tensors'). ``header``: a format-2 payload's header as :func:`v2.header_of`
    read it from these bytes; ``digest``: the SHA-256 of ``data`` but its last 32 bytes, as computed while they
    were read (else it is computed here)."""
    version, payload = _split_container(data, digest)
    if version == 1:
        meta, tensors = _parse_meta(bytes(payload))
        return _decoded_file(_check_meta(meta, version), tensors, {}, {}, len(data), version)
    scan = v2.scan_payload(payload, header)
    _check_meta(scan.meta, version)
    if decode:  # no model bounds what the layers decode to: each must be plausible for its stream's size
        for span in scan.layers:
            v2.check_decodable_alone(span)
        return _decoded_file(*_decode_scan(scan), len(data), version)
    return _summary_file(scan, len(data))


def _decode_scan(scan: v2.Scan) -> tuple[dict, dict, dict, dict]:
    meta, tensors, levels, streams = v2.decode_payload(scan)
    return _check_meta(meta, 2), tensors, levels, streams


def decode_codes(parsed: ReadFile) -> DecodedFile:
    """A file read with ``decode=False``, decoded (every layer's levels and planes). The caller bounds what that
    costs: :func:`load` has checked every declared shape against the model first."""
    if parsed.scan is None:
        # parse decodes every layer of a file it keeps no scan for: each code is a LayerCode
        return cast(DecodedFile, parsed)
    return _decoded_file(*_decode_scan(parsed.scan), parsed.size, parsed.version)


def _decoded_file(meta: dict, tensors: dict, levels: dict, streams: dict, size: int, version: int
                  ) -> DecodedFile:
    need(len(tensors) <= MAX_TENSORS, "too many tensors")
    used: set[str] = set()
    codes = dict(_layer_code(layer, tensors, used) for layer in meta["layers"])
    need(len(codes) == len(meta["layers"]), "duplicate layer names")
    _check_zero_layers(codes.values())
    floats = dict(_float_tensor(entry, tensors) for entry in meta["floats"])
    need(len(floats) == len(meta["floats"]), "duplicate float tensor keys")
    used.update("float/" + key for key in floats)
    need(used == set(tensors), f"unexpected tensors in file: {sorted(set(tensors) - used)[:5]}")
    for name, signed in levels.items():  # the levels the planes were built from: decoding need not rebuild them
        codes[name].remember_levels(signed)
    for name, stream in streams.items():  # and what the file stored for them: sizes need not re-code them
        codes[name].remember_stream(stream)
    parsed = CBDFile(meta=meta, codes=codes, floats=floats, size=size, version=version)
    _tied(parsed)
    return parsed


def _check_zero_layers(codes) -> None:
    zero_numel = sum(code.numel for code in codes if code.mode == "zero")
    need(zero_numel <= MAX_ZERO_NUMEL, f"all-zero layers of {zero_numel} weights in total: too large")


def _summary_file(scan: v2.Scan, size: int) -> CBDFile[LayerSummary, np.ndarray]:
    """A format-2 file's :class:`CBDFile` without decoding levels: every check :func:`_layer_code` makes that
    needs no plane, the float tensors (constants as broadcast views)."""
    codes = {}
    for span in scan.layers:
        try:
            _layer_common(span.layer, span.kind, span.name, span.shape, span.num_planes, span.exponents, span.scales)
        except FormatError as exc:
            raise named(span.layer, exc) from None
        codes[span.name] = LayerSummary(span)
    _check_zero_layers(codes.values())
    floats = {}
    for float_span in scan.floats:
        entry, tensors = v2.float_tensor(float_span)
        key, array = _float_tensor(entry, tensors)
        floats[key] = array
    meta = {**scan.meta, "layers": [span.layer for span in scan.layers],
            "floats": [{k: v for k, v in span.entry.items() if k not in ("stored", "value")} for span in scan.floats]}
    parsed = CBDFile(meta=meta, codes=codes, floats=floats, size=size, version=2, scan=scan)
    _tied(parsed)
    return parsed


def verify(path: str | os.PathLike, parsed: ReadFile | None = None) -> list[str]:
    """Re-check a file: container checksum (on read), then every plane, decoded (``B @ C`` for factored
    planes), against its stored SHA-256, the decoded weights, and every float tensor (BatchNorm statistics,
    biases) for NaN/Inf. Returns the problems found, at most one line per layer or tensor, names escaped
    (empty when all is well). Format 2 stores no per-plane digests: reading it already checked every stream's
    and every factored plane's CRC-32 against the decoded data (``B @ C``), and the digests its reader derives
    from those planes would only be compared with themselves, so they are not recomputed. ``parsed``: the file
    as :func:`read` returned it for ``path`` (saves reading it again). A format-2 file is decoded one layer at
    a time: memory is one layer's, whatever the file holds."""
    parsed = read(path, decode=False) if parsed is None else parsed
    problems = [_layer_problem(name, code, digests=parsed.version == 1) for name, code in _codes_one_by_one(parsed)]
    problems += [f"float tensor {escape_name(key)} holds NaN/Inf values" for key in check_finite_floats(parsed.floats)]
    return [problem for problem in problems if problem]


def _codes_one_by_one(parsed: ReadFile) -> Iterator[tuple[str, LayerCode]]:
    """Every layer's decoded code, one at a time (a format-2 summary decodes each only when it is reached)."""
    if parsed.scan is None:
        yield from decode_codes(parsed).codes.items()
        return
    for span in parsed.scan.layers:
        v2.check_decodable_alone(span)
        entry, tensors, signed, stream = v2.decode_layer(span)
        name, code = _layer_code(entry, tensors, set())
        if signed is not None:
            code.remember_levels(signed)
        code.remember_stream(stream)
        del entry, tensors, signed, stream
        yield name, code


def _layer_problem(name: str, code: LayerCode, digests: bool = True) -> str:
    """One line saying what is wrong with a layer's code ('' when nothing is); ``digests``: re-check each
    plane's stored SHA-256."""
    h, w = code.matrix_shape
    wrong = [index for index, plane in enumerate(code.planes)
             if digests and plane_digest(plane.decode(h, w)) != plane.digest]
    parts = []
    if wrong:
        listed = ", ".join(map(str, wrong[:8])) + (" ..." if len(wrong) > 8 else "")
        parts.append(f"planes {listed} of {len(code.planes)}: the decoded data does not match its digest")
    with np.errstate(over="ignore", invalid="ignore"):  # a corrupt scale may overflow: reported here
        finite = code.mode == "zero" or bool(np.isfinite(code.decode()).all())
    if not finite:
        parts.append("decodes to non-finite weights")
    return f"layer {escape_name(name)}: " + "; ".join(parts) if parts else ""


def _tied(parsed: ShapeView) -> dict[str, str]:
    """Tied layer -> the coded layer whose weight it shares, as the file records it (checked)."""
    entries = parsed.meta.get("tied", [])
    need(isinstance(entries, list), "corrupt cbdnet metadata: tied")
    tied = {}
    for entry in entries:
        need(isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry.get("owner") in parsed.codes
              and entry["name"] not in parsed.codes and entry["name"] not in tied, "corrupt tied-layer entry")
        tied[entry["name"]] = entry["owner"]
    return tied


def check_fits(model: nn.Module, parsed: ShapeView) -> None:
    """Every coded layer is a Conv2d/Linear of the model with the same weight shape, and the float tensors are
    exactly the rest of its state dict, shape for shape. Reads shapes only: works on a ``meta``-device model,
    so a file cannot make :func:`load` build (allocate) a model that it does not describe."""
    state = model.state_dict()
    coded: set[str] = set()
    shapes = {name: code.shape for name, code in parsed.codes.items()}
    shapes.update({name: parsed.codes[owner].shape for name, owner in _tied(parsed).items()})
    for name, shape in shapes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CBDError(f"the file's layer {name} does not exist in the model") from None
        if not is_compressible(module) or tuple(coded_weight(module).shape) != tuple(shape):
            raise CBDError(f"the file's layer {name} {tuple(shape)} does not fit the model's {module}")
        coded.update(coded_key(alias, m) for alias, m in model.named_modules(remove_duplicate=False) if m is module)
    expected = set(state) - coded
    missing, unexpected = sorted(expected - set(parsed.floats)), sorted(set(parsed.floats) - expected)
    if missing or unexpected:
        raise CBDError(f"the file does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    wrong = [key for key in sorted(expected) if tuple(state[key].shape) != tuple(parsed.floats[key].shape)]
    if wrong:
        raise CBDError(f"the file does not fit the model: wrong shape for {wrong[:5]}")


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _finite(weight: torch.Tensor) -> bool:
    """All entries finite, in one pass and without a temporary the size of the weight: the smallest and the
    largest entry are finite exactly when every entry is (a NaN makes both NaN)."""
    if weight.numel() == 0:
        return True
    low, high = torch.aminmax(weight.detach())
    return bool(torch.isfinite(low) and torch.isfinite(high))


def _restore(model: nn.Module, parsed: DecodedFile, *, assign: bool = False) -> nn.Module:
    """Decode the codes into CBD modules and fill the float tensors. ``assign``: ``model`` is a ``meta``-device
    skeleton whose tensors are all in the file; they are set to the file's tensors, never allocated twice."""
    check_fits(model, parsed)
    replacements = {}
    for name, code in parsed.codes.items():  # decode everything before touching the caller's model
        with np.errstate(over="ignore", invalid="ignore"):  # a corrupt scale may overflow: refused below
            replacements[name] = from_module(model.get_submodule(name), code)
        if not _finite(replacements[name].weight):
            raise FormatError(f"layer {name} decodes to non-finite weights: the file is corrupt")
    tied = {}
    for name, owner in _tied(parsed).items():
        twin = from_module(model.get_submodule(name), parsed.codes[owner])
        twin.share_weight(replacements[owner])
        tied[name] = twin
    for name, replacement in {**replacements, **tied}.items():
        _set_submodule(model, name, replacement)
    own = model.state_dict()
    if assign:
        dtypes = {key: value.dtype for key, value in own.items()}
        state = _with_metadata({key: torch.from_numpy(np.array(value)).to(dtypes[key])
                                for key, value in parsed.floats.items()}, own)
        model.load_state_dict(state, strict=False, assign=True)
        if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            raise RuntimeError("cbdnet.load: a tensor of the model was not filled from the file")
    else:
        state = _with_metadata({key: torch.from_numpy(np.array(value)) for key, value in parsed.floats.items()}, own)
        model.load_state_dict(state, strict=False)
    return model


def _with_metadata(state: dict, own: dict) -> OrderedDict:
    """``state`` with the model's own per-module state-dict versions: modules that check the version they load
    (torchvision's MNASNet refuses a state dict without one) see the current one."""
    out = OrderedDict(state)
    out._metadata = getattr(own, "_metadata", OrderedDict())  # type: ignore[attr-defined]
    return out


class _FileCodes:
    """The layer codes of a loaded model, re-read from its ``.cbd`` file on demand instead of kept in memory
    (a code is ~bits/32 of its float weight): the file must still be the one loaded (its SHA-256 is checked)."""

    def __init__(self, path: str | os.PathLike, digest: bytes) -> None:
        self.path = Path(path).resolve()
        self.digest = digest
        self._held: DecodedFile | None = None
        self._holders = 0

    def parsed(self) -> DecodedFile:
        if self._held is not None:
            return self._held
        try:
            data = read_regular_file(self.path, what="file", max_bytes=MAX_FILE_BYTES)
        except CBDError as exc:
            raise CBDError(f"the layer codes of this model are read from {self.path} on demand, and it cannot "
                           f"be read now ({exc}): load the model again") from None
        if data[-_DIGEST:] != self.digest:
            raise CBDError(f"{self.path} changed since this model was loaded from it; its layer codes are read "
                           "from that file on demand: load the model again")
        return decode_codes(parse(data, decode=False))  # the model it was loaded into bounds it

    def hold(self) -> None:
        if self._holders == 0:
            self._held = self.parsed()
        self._holders += 1

    def release(self) -> None:
        self._holders -= 1
        if self._holders == 0:
            self._held = None


@dataclass
class _LayerSource:
    """``code_source`` of one loaded layer: its code, read from the file."""

    file: _FileCodes
    name: str

    def __call__(self) -> LayerCode:
        return self.file.parsed().codes[self.name]

    def __deepcopy__(self, memo: dict) -> _LayerSource:
        return self  # read-only: a copied model reads the same file


@contextmanager
def _codes_held(modules) -> Iterator[None]:
    """While inside, the files that lazily loaded modules read their codes from are parsed once, not per layer."""
    files = {id(s.file): s.file for m in modules if isinstance(s := m.__dict__.get("code_source"), _LayerSource)}
    for file in files.values():
        file.hold()
    try:
        yield
    finally:
        for file in files.values():
            file.release()


def _release_codes(model: nn.Module, path: str | os.PathLike, digest: bytes) -> None:
    source = _FileCodes(path, digest)
    for name, module in model.named_modules():
        if isinstance(module, CBDModule):
            module.release_code(_LayerSource(source, name))


Builder = Callable[[str, dict], nn.Module]


def _meta_build(builder: Builder, arch: str, kwargs: dict) -> nn.Module | None:
    try:
        with torch.device("meta"):
            return builder(arch, kwargs)
    except CBDError:
        raise
    except Exception:  # an architecture that cannot be built on the meta device: the real build decides
        return None


def _fills_everything(model: nn.Module, parsed: ShapeView) -> bool:
    """Whether the file gives every tensor of the (meta) model: no non-persistent buffers (set by its
    constructor only) and no tensor shared between state-dict keys other than tied coded weights."""
    state = model.state_dict(keep_vars=True)
    if {name for name, _ in model.named_buffers(remove_duplicate=False)} - set(state):
        return False
    coded = {coded_key(name, model.get_submodule(name)) for name in (*parsed.codes, *_tied(parsed))}
    keys: dict[int, list[str]] = {}
    for key, value in state.items():
        keys.setdefault(id(value), []).append(key)
    return all(len(group) == 1 or set(group) <= coded for group in keys.values())


def _skeleton(parsed: ShapeView, builder: Builder | None) -> tuple[nn.Module, bool]:
    """A fresh model of the file's architecture from ``builder(arch, arch_kwargs)``, built on the ``meta``
    device first (no memory) and checked against the file, so that ``arch_kwargs`` cannot ask for an
    arbitrarily large model. Returns ``(model, on_meta)``: the meta model itself where the file fills every
    tensor of it (no FP32 weights are allocated only to be replaced), else a real build."""
    arch = parsed.meta.get("arch")
    if not isinstance(arch, str) or builder is None:
        raise CBDError("the file names no architecture this loader can build: pass the model skeleton, "
                       "load(path, model)")
    kwargs = parsed.meta.get("arch_kwargs") or {}
    shapes_only = _meta_build(builder, arch, kwargs)
    if shapes_only is not None:
        check_fits(shapes_only, parsed)
        if _fills_everything(shapes_only, parsed):
            return shapes_only, True
    try:
        return builder(arch, kwargs), False
    except CBDError:
        raise
    except Exception as exc:
        raise FormatError(f"cannot build {arch} with the file's arch_kwargs {kwargs}: {str(exc)[:200]}") from None


def load(path: str | os.PathLike, model: nn.Module | None = None, *, builder: Builder | None = None,
         keep_codes: bool = False) -> nn.Module:
    """Load a ``.cbd`` file into ``model`` (an uncompressed skeleton of the same architecture), or into
    ``builder(arch, arch_kwargs)`` when ``model`` is None. Never unpickles anything. (``cbdnet.load`` passes
    the zoo's builder, so files of registered architectures load by name.)

    Memory: a skeleton built here lives on the ``meta`` device until the file's tensors are assigned to it,
    and the layer codes are not kept beside the decoded weights: each CBD module re-reads its code from
    ``path`` when ``.code`` is needed (``cbdnet.save``, reports), checking that the file is unchanged; so the
    loaded model holds no more than the FP32 model. ``keep_codes=True`` keeps them in memory instead."""
    digest = _file_digest(path)  # before reading: a file replaced in between fails the later check, safely
    built: dict[str, tuple[nn.Module, bool]] = {}

    def fits(view: ShapeView) -> None:  # the file's declared shapes against the model, before it is read whole
        built["model"] = _skeleton(view, builder) if model is None else (model, False)
        check_fits(built["model"][0], view)

    parsed = read(path, decode=False, header_check=fits)
    if "model" not in built:  # format 1: its header is checked with the rest
        fits(parsed)
    model, on_meta = built.pop("model")
    check_fits(model, parsed)
    nonfinite = check_finite_floats(parsed.floats)
    need(not nonfinite, f"float tensor {escape_name(nonfinite[0]) if nonfinite else ''} holds NaN/Inf values: the "
                        "file is corrupt")
    parsed = decode_codes(parsed)  # only now, each layer's shape known to be the model's
    dtype = parsed.meta.get("dtype", "float32")  # checked by read()
    model = _restore(model.to(_DTYPES[dtype]), parsed, assign=on_meta)
    if not keep_codes:
        _release_codes(model, path, digest)
    _remember(model, parsed.meta)
    model.eval()
    del parsed
    release_free_memory()
    return model


def release_free_memory() -> None:
    """Give the heap pages freed by parsing and decoding (the file's bytes, per-layer temporaries) back to the
    OS: glibc keeps them otherwise, and the process would hold ~2x the model's bytes after a load."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def _remember(model: nn.Module, meta: dict) -> None:
    """What ``save`` records beside the codes (architecture, config, weights' origin), so that saving a loaded
    model writes the same bytes."""
    stored = meta.get("extra")
    extra = stored if isinstance(stored, dict) else {}
    if isinstance(meta.get("arch"), str) and recorded(model, "arch") is None:
        record(model, arch=meta["arch"], arch_kwargs=dict(meta.get("arch_kwargs") or {}))
    for key in ("config", "weights_sha256", "weights_source"):
        if key in extra:
            record(model, **{key: extra[key]})


def _file_digest(path: str | os.PathLike) -> bytes:
    """The SHA-256 stored at the end of a ``.cbd`` file (``read`` checks it against the contents; a file that
    cannot be read or is too short gets ``read``'s own error message)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() < _DIGEST:
                return b""
            handle.seek(-_DIGEST, os.SEEK_END)
            return handle.read(_DIGEST)
    except OSError:
        return b""
