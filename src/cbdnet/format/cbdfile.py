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

Reading a file from a stranger is safe: the checksum is checked first; the safetensors JSON header is
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
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from torch import nn

from .. import __version__
from ..codec import CODE_TYPES, MAX_PLANES, CodeError, LayerCode, PlaneCode, plane_digest
from ..codec.bits import packed_size
from ..errors import CBDError, FormatError
from ..nn import COMPRESSIBLE, CBDModule, from_module
from ..nn.walk import coded_keys
from . import v2

__all__ = ["save", "load", "read", "parse", "verify", "atomic_write", "check_writable", "check_fits", "CBDFile",
           "FORMAT_VERSION",
           "MAGIC"]

MAGIC = b"\x89CBD\r\n\x1a\n"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
_PREFIX = struct.Struct("<8sIIQ")
_DIGEST = 32
MAX_HEADER_BYTES = 16 << 20  # safetensors JSON header (ResNet-110's is ~0.2 MB)
MAX_TENSORS = 200_000
MAX_NUMEL = 1 << 34
MAX_ZERO_NUMEL = 1 << 28  # all-zero layers store no bits: bound what loading one may allocate
MAX_DIMS = 8
MAX_EXPONENT = 320  # |plane exponent|; float32 ratios need at most ~277, and 2.0**320 cannot overflow
# safetensors dtypes numpy can hold, with their item sizes; anything else is refused before parsing
_ST_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "F16": 2, "I32": 4, "U32": 4, "F32": 4,
                "I64": 8, "U64": 8, "F64": 8}
# float/<key> tensors: the state-dict dtype named in the metadata -> the numpy dtype stored
_FLOAT_STORED = {"float32": np.float32, "float16": np.float16, "bfloat16": np.float32, "float64": np.float64,
                 "int64": np.int64, "int32": np.int32, "int16": np.int16, "int8": np.int8, "uint8": np.uint8,
                 "bool": np.bool_}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


@dataclass
class CBDFile:
    """A parsed, checksum-verified ``.cbd`` file: the metadata and the layer codes, nothing decoded."""

    meta: dict
    codes: dict[str, LayerCode]
    floats: dict[str, np.ndarray]
    size: int


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


def encode_file(model: nn.Module, *, arch: str | None = None, arch_kwargs: dict | None = None,
                extra: dict | None = None, float32: bool | None = None, version: int = FORMAT_VERSION) -> bytes:
    """The bytes of the ``.cbd`` file for a compressed model. ``extra`` defaults to the config that
    :func:`cbdnet.compress` recorded on the model. Format 2 stores float tensors as float16 where that keeps
    float16's full precision (``float32=True``: always as they are; None: as ``compress(..., float32=)``
    chose, which rounded the model's floats to match); ``version=1`` writes the old format."""
    if float32 is None:
        float32 = bool(getattr(model, "cbdnet_float32", False))
    if version not in READ_VERSIONS:
        raise CBDError(f"cannot write .cbd format version {version}; versions: {READ_VERSIONS}")
    tensors: dict[str, np.ndarray] = {}
    layers = []
    coded, tied = _coded_layers(model)
    if not coded:
        raise CBDError("the model has no compressed layers: run cbdnet.compress(model) first")
    for name, module in coded:
        layers.append(_layer_meta(name, module.code, module.weight.dtype))
        for part, array in module.code.tensors().items():
            tensors[f"cbd/{name}/{part}"] = np.ascontiguousarray(array)
    skipped = coded_keys(model)
    floats, float_arrays = [], []
    for key, value in model.state_dict().items():
        if key not in skipped:
            tensors[f"float/{key}"] = _float_array(value)
            float_arrays.append((key, tensors[f"float/{key}"]))
            floats.append({"key": key, "dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape)})
    if extra is None:
        config = getattr(model, "cbdnet_config", None)
        extra = {"config": config} if config is not None else {}
    for key in ("weights_sha256", "weights_source"):
        if getattr(model, f"cbdnet_{key}", None) is not None and key not in extra:
            extra = {**extra, key: getattr(model, f"cbdnet_{key}")}
    meta = {
        "format": "cbdnet", "format_version": version, "cbdnet_version": __version__,
        "arch": arch if arch is not None else getattr(model, "cbdnet_arch", None),
        "arch_kwargs": arch_kwargs if arch_kwargs is not None else getattr(model, "cbdnet_arch_kwargs", {}),
        "dtype": _model_dtype(model), "layers": layers, "floats": floats, "extra": extra,
    }
    if tied:
        meta["tied"] = tied
    if version == 1:
        payload = st_save(tensors, metadata={"cbdnet": json.dumps(meta, sort_keys=True)})
    else:
        payload = v2.encode_payload(meta, [(name, module.code) for name, module in coded], float_arrays,
                                    float16=not float32)
    head = _PREFIX.pack(MAGIC, version, 0, len(payload)) + payload
    return head + hashlib.sha256(head).digest()


def atomic_write(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename: ``path`` is never half-written."""
    target = Path(path)
    check_writable(target, overwrite=overwrite)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise CBDError(f"cannot write {target}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), _file_mode(target))  # mkstemp gives 0600: use the old file's or umask's
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise CBDError(f"cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _file_mode(target: Path) -> int:
    if target.exists():
        return target.stat().st_mode & 0o7777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def check_writable(path: str | os.PathLike, *, overwrite: bool = True) -> None:
    """Refuse an output path early (before any work): an existing file without ``overwrite``, a directory,
    or a folder that does not exist."""
    target = Path(path)
    if target.is_dir():
        raise CBDError(f"{target} is a directory; give a file name")
    if target.exists() and not overwrite:
        raise CBDError(f"{target} exists; pass --force to overwrite it")
    if not target.parent.is_dir():
        raise CBDError(f"output directory {target.parent} does not exist")


def save(model: nn.Module, path: str | os.PathLike, *, arch: str | None = None, arch_kwargs: dict | None = None,
         extra: dict | None = None, overwrite: bool = True, float32: bool | None = None) -> int:
    """Write a compressed model to ``path`` (atomically); returns the file size in bytes. ``float32=True``
    keeps every float tensor as it is (by default they are stored as float16 where that loses nothing
    beyond float16's rounding, see :mod:`.v2`)."""
    data = encode_file(model, arch=arch, arch_kwargs=arch_kwargs, extra=extra, float32=float32)
    atomic_write(path, data, overwrite=overwrite)
    return len(data)


# ---------------------------------------------------------------- reading

def _need(condition: bool, message: str) -> None:
    if not condition:
        raise FormatError(message)


def _int(value, name: str, low: int, high: int) -> int:
    _need(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
          f"corrupt metadata: {name} = {value!r} is not an integer in [{low}, {high}]")
    return value


def _split_container(data: bytes) -> tuple[int, bytes]:
    _need(len(data) >= _PREFIX.size + _DIGEST, f"not a .cbd file: {len(data)} bytes is too short")
    magic, version, _flags, length = _PREFIX.unpack_from(data)
    _need(magic == MAGIC, "not a .cbd file (bad magic bytes)")
    _need(version <= max(READ_VERSIONS),
          f"this file has .cbd format version {version}; this cbdnet ({__version__}) reads up to "
          f"version {max(READ_VERSIONS)}: upgrade cbdnet")
    _need(version in READ_VERSIONS, f"unknown .cbd format version {version}")
    _need(length == len(data) - _PREFIX.size - _DIGEST,
          f"truncated or padded .cbd file: payload length {length} does not match the file size {len(data)}")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    _need(hashlib.sha256(body).digest() == digest, "checksum mismatch: the .cbd file is corrupt or was modified")
    payload = body[_PREFIX.size:]
    if version == 1:
        _need(len(payload) >= 8, "corrupt payload: no tensor header")
        header_len = struct.unpack_from("<Q", payload)[0]
        _need(header_len <= min(MAX_HEADER_BYTES, len(payload) - 8), f"corrupt payload: header length {header_len}")
    return version, payload


def _no_duplicates(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    _need(len(set(keys)) == len(keys), "corrupt JSON: duplicate keys")
    return dict(pairs)


def _json(text: bytes | str, what: str):
    """Parse JSON, turning every parser failure (bad UTF-8, syntax, nesting too deep, a 5,000-digit
    integer, duplicate keys) into a FormatError."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates)
    except FormatError:
        raise
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise FormatError(f"corrupt {what}: {str(exc)[:200]}") from None


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_header(payload: bytes) -> dict:
    """Check the safetensors JSON header ourselves before the safetensors parser sees (and allocates for) it:
    a bounded tensor count, known dtypes, at most MAX_DIMS non-negative dimensions, and byte ranges that tile
    the data section exactly (so the parser allocates no more than the file holds). Returns the metadata."""
    header_len = struct.unpack_from("<Q", payload)[0]
    raw = payload[8:8 + header_len]
    _need(raw.count(b"data_offsets") <= MAX_TENSORS, f"corrupt payload: more than {MAX_TENSORS} tensors")
    header = _json(raw, "payload header")
    _need(isinstance(header, dict) and len(header) <= MAX_TENSORS + 1, "corrupt payload header")
    data_len = len(payload) - 8 - header_len
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            _need(isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values()),
                  "corrupt payload header: __metadata__ is not a string map")
            continue
        _need(isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"},
              f"corrupt payload header: entry {name[:80]!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        _need(isinstance(dtype, str) and dtype in _ST_ITEMSIZE, f"tensor {name[:80]!r}: unsupported dtype {dtype!r}")
        _need(isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(d) and d >= 0 for d in shape),
              f"tensor {name[:80]!r}: bad shape")
        _need(isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets),
              f"tensor {name[:80]!r}: bad data offsets")
        begin, end = offsets
        _need(0 <= begin <= end <= data_len and end - begin == math.prod(shape) * _ST_ITEMSIZE[dtype],
              f"tensor {name[:80]!r}: data offsets {offsets} do not fit its shape or the payload")
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        _need(begin == position, "corrupt payload: tensor data overlaps or leaves gaps")
        position = end
    _need(position == data_len, "corrupt payload: tensor data does not fill the payload")
    return header.get("__metadata__") or {}


def _parse_meta(payload: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    st_meta = _tensor_header(payload)
    try:
        tensors = st_load(payload)
    except Exception as exc:  # the safetensors parser: any failure means a malformed payload
        raise FormatError(f"corrupt tensor payload: {str(exc)[:200]}") from None
    raw = st_meta.get("cbdnet")
    _need(isinstance(raw, str), "no cbdnet metadata in the payload")
    return _check_meta(_json(raw, "cbdnet metadata")), tensors


def _check_meta(meta) -> dict:
    _need(isinstance(meta, dict) and meta.get("format") == "cbdnet", "corrupt cbdnet metadata")
    _need(isinstance(meta.get("layers"), list) and isinstance(meta.get("floats"), list),
          "corrupt cbdnet metadata: no layer list")
    _need(len(meta["layers"]) > 0, "corrupt cbdnet metadata: no compressed layers")
    dtype = meta.get("dtype", "float32")
    _need(isinstance(dtype, str) and dtype in _DTYPES, f"corrupt cbdnet metadata: dtype {dtype!r}")
    _need(meta.get("arch") is None or isinstance(meta.get("arch"), str), "corrupt cbdnet metadata: arch")
    kwargs = meta.get("arch_kwargs") or {}
    _need(isinstance(kwargs, dict) and all(isinstance(v, (int, float, str, bool)) for v in kwargs.values()),
          "corrupt cbdnet metadata: arch_kwargs must map names to numbers or strings")
    return meta


def _expect(tensors: dict, key: str, dtype, size: int) -> np.ndarray:
    _need(key in tensors, f"missing tensor {key}")
    array = tensors[key]
    _need(array.dtype == dtype and array.ndim == 1 and array.size == size,
          f"tensor {key} has dtype {array.dtype} and shape {array.shape}; expected {np.dtype(dtype)} [{size}]")
    return array


def _planes(name: str, layer: dict, exponents: tuple[int, ...], h: int, w: int, tensors: dict, used: set
            ) -> list[PlaneCode]:
    planes = []
    for index, (entry, exponent) in enumerate(zip(layer["plane_codes"], exponents, strict=True)):
        _need(isinstance(entry, dict) and entry.get("exponent") == exponent, f"layer {name}: bad plane {index}")
        storage, digest = entry.get("storage"), entry.get("sha256")
        _need(isinstance(digest, str) and len(digest) == 64, f"layer {name}: plane {index} has no digest")
        rank = _int(entry.get("rank"), f"{name}.plane{index}.rank", -1, min(h, w))
        if storage == "packed":
            parts = {"bits": packed_size(h * w)}
        else:
            _need(storage == "factored" and rank >= 0, f"layer {name}: plane {index} storage {storage!r}")
            parts = {"B": packed_size(h * rank), "C": packed_size(rank * w)}
        stored = {}
        for part, size in parts.items():
            key = f"cbd/{name}/p{index}.{part}"
            stored[part] = _expect(tensors, key, np.uint8, size)
            used.add(key)
        planes.append(PlaneCode(exponent, storage, rank, stored, digest))
    return planes


def _layer_code(layer: dict, tensors: dict, used: set) -> tuple[str, LayerCode]:
    """One layer's code: the common parts checked here, the kind's own parts by its class."""
    _need(isinstance(layer, dict) and isinstance(layer.get("name"), str), "corrupt layer entry")
    name = layer["name"]
    shape = layer.get("shape")
    _need(isinstance(shape, list) and len(shape) in (2, 4), f"layer {name}: bad shape {shape!r}")
    shape = tuple(_int(s, f"{name}.shape", 1, 1 << 31) for s in shape)
    _need(math.prod(shape) <= MAX_NUMEL, f"layer {name}: shape {shape} too large")
    kind = CODE_TYPES.get(layer.get("mode")) if isinstance(layer.get("mode"), str) else None
    _need(kind is not None, f"layer {name}: unknown mode {layer.get('mode')!r}")
    num_planes = _int(layer.get("planes"), f"{name}.planes", 1, MAX_PLANES)
    plane_meta, exponents = layer.get("plane_codes"), layer.get("exponents")
    _need(isinstance(plane_meta, list) and isinstance(exponents, list), f"layer {name}: no plane list")
    _need(len(plane_meta) == len(exponents) == kind.expected_planes(num_planes),
          f"layer {name}: {len(plane_meta)} planes stored, {kind.expected_planes(num_planes)} expected")
    exponents = tuple(_int(e, f"{name}.exponent", -MAX_EXPONENT, MAX_EXPONENT) for e in exponents)
    layer_dtype = layer.get("dtype", "float32")
    _need(isinstance(layer_dtype, str) and layer_dtype in _DTYPES, f"layer {name}: bad dtype {layer_dtype!r}")
    h, w = (shape[0], shape[1]) if len(shape) == 2 else (shape[0] * shape[2], shape[1] * shape[3])
    prefix = f"cbd/{name}/"
    try:
        scales = _expect(tensors, prefix + "scales", np.float32, kind.scale_count(shape, layer))
        _need(bool(np.isfinite(scales).all()), f"layer {name}: non-finite scales")
        used.add(prefix + "scales")
        sign = np.zeros(0, np.uint8)
        if kind.stores_sign:
            sign = _expect(tensors, prefix + "sign", np.uint8, packed_size(h * w))
            used.add(prefix + "sign")
        common = {"shape": shape, "num_planes": num_planes, "exponents": exponents, "sign": sign,
                  "planes": _planes(name, layer, exponents, h, w, tensors, used),
                  "reason": str(layer.get("reason", "")),
                  "bound": _int(layer.get("bound", 0), f"{name}.bound", 0, 1 << 31),
                  "mask_rank": _int(layer.get("mask_rank", 0), f"{name}.mask_rank", 0, 1 << 31)}
        return name, kind.from_stored(common, scales, layer)
    except CodeError as exc:
        raise FormatError(f"layer {name}: {exc}") from None


def read(path: str | os.PathLike) -> CBDFile:
    """Parse and validate a ``.cbd`` file (checksum, metadata, every tensor's dtype and size)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise CBDError(f"no such file: {path}") from None
    except IsADirectoryError:
        raise CBDError(f"{path} is a directory, not a .cbd file") from None
    except OSError as exc:
        raise CBDError(f"cannot read {path}: {exc.strerror}") from None
    return parse(data)


def _float_tensor(entry, tensors: dict) -> tuple[str, np.ndarray]:
    """A ``float/<key>`` tensor, its dtype and shape checked against its metadata entry. (Files written before
    the shape was recorded have none: their float tensors are still checked against the model by ``load``.)"""
    _need(isinstance(entry, dict) and isinstance(entry.get("key"), str), "corrupt float entry")
    key, dtype = entry["key"], entry.get("dtype")
    _need(isinstance(dtype, str) and dtype in _FLOAT_STORED, f"float tensor {key}: unsupported dtype {dtype!r}")
    array = tensors.get("float/" + key)
    _need(array is not None, f"missing tensor float/{key}")
    shape = entry.get("shape", list(array.shape))
    _need(isinstance(shape, list) and len(shape) <= MAX_DIMS and all(_is_int(d) and d >= 0 for d in shape),
          f"float tensor {key}: bad shape {shape!r}")
    _need(array.dtype == _FLOAT_STORED[dtype] and list(array.shape) == shape,
          f"tensor float/{key} is {array.dtype} {list(array.shape)}; the metadata says {dtype} {shape}")
    return key, array


def parse(data: bytes) -> CBDFile:
    """Parse and validate the bytes of a ``.cbd`` file (see :func:`read`)."""
    version, payload = _split_container(data)
    if version == 1:
        meta, tensors = _parse_meta(payload)
    else:
        meta, tensors = v2.decode_payload(payload)
        meta = _check_meta(meta)
    _need(len(tensors) <= MAX_TENSORS, "too many tensors")
    used: set[str] = set()
    codes = dict(_layer_code(layer, tensors, used) for layer in meta["layers"])
    _need(len(codes) == len(meta["layers"]), "duplicate layer names")
    zero_numel = sum(code.numel for code in codes.values() if code.mode == "zero")
    _need(zero_numel <= MAX_ZERO_NUMEL, f"all-zero layers of {zero_numel} weights in total: too large")
    floats = dict(_float_tensor(entry, tensors) for entry in meta["floats"])
    _need(len(floats) == len(meta["floats"]), "duplicate float tensor keys")
    used.update("float/" + key for key in floats)
    _need(used == set(tensors), f"unexpected tensors in file: {sorted(set(tensors) - used)[:5]}")
    parsed = CBDFile(meta=meta, codes=codes, floats=floats, size=len(data))
    _tied(parsed)
    return parsed


def verify(path: str | os.PathLike) -> list[str]:
    """Re-check a file: container checksum (on read), then every plane, decoded (``B @ C`` for factored
    planes), against its stored SHA-256. Returns the problems found (empty when all is well)."""
    parsed = read(path)
    problems = []
    for name, code in parsed.codes.items():
        h, w = code.matrix_shape
        for index, plane in enumerate(code.planes):
            if plane_digest(plane.decode(h, w)) != plane.digest:
                problems.append(f"{name}: plane {index} ({plane.storage}) does not match its digest")
        with np.errstate(over="ignore", invalid="ignore"):  # a corrupt scale may overflow: reported below
            finite = code.mode == "zero" or bool(np.isfinite(code.decode()).all())
        if not finite:
            problems.append(f"{name}: decodes to non-finite weights")
    return problems


def _tied(parsed: CBDFile) -> dict[str, str]:
    """Tied layer -> the coded layer whose weight it shares, as the file records it (checked)."""
    entries = parsed.meta.get("tied", [])
    _need(isinstance(entries, list), "corrupt cbdnet metadata: tied")
    tied = {}
    for entry in entries:
        _need(isinstance(entry, dict) and isinstance(entry.get("name"), str) and entry.get("owner") in parsed.codes
              and entry["name"] not in parsed.codes and entry["name"] not in tied, "corrupt tied-layer entry")
        tied[entry["name"]] = entry["owner"]
    return tied


def check_fits(model: nn.Module, parsed: CBDFile) -> None:
    """Every coded layer is a Conv2d/Linear of the model with the same weight shape, and the float tensors are
    exactly the rest of its state dict, shape for shape. Reads shapes only: works on a ``meta``-device model,
    so a file cannot make :func:`load` build (allocate) a model that it does not describe."""
    state = model.state_dict()
    coded = set()
    shapes = {name: code.shape for name, code in parsed.codes.items()}
    shapes.update({name: parsed.codes[owner].shape for name, owner in _tied(parsed).items()})
    for name, shape in shapes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CBDError(f"the file's layer {name} does not exist in the model") from None
        if not isinstance(module, COMPRESSIBLE) or tuple(module.weight.shape) != tuple(shape):
            raise CBDError(f"the file's layer {name} {tuple(shape)} does not fit the model's {module}")
        coded.update(f"{alias}.weight" if alias else "weight"
                     for alias, m in model.named_modules(remove_duplicate=False) if m is module)
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


def _restore(model: nn.Module, parsed: CBDFile) -> nn.Module:
    check_fits(model, parsed)
    replacements = {}
    for name, code in parsed.codes.items():  # decode everything before touching the caller's model
        with np.errstate(over="ignore", invalid="ignore"):  # a corrupt scale may overflow: refused below
            replacements[name] = from_module(model.get_submodule(name), code)
        if not np.isfinite(replacements[name].weight.detach().float().numpy()).all():  # numpy: cheap on CPU
            raise FormatError(f"layer {name} decodes to non-finite weights: the file is corrupt")
    tied = {}
    for name, owner in _tied(parsed).items():
        twin = from_module(model.get_submodule(name), parsed.codes[owner])
        twin.weight = replacements[owner].weight
        tied[name] = twin
    for name, replacement in {**replacements, **tied}.items():
        _set_submodule(model, name, replacement)
    state = {key: torch.from_numpy(np.array(value)) for key, value in parsed.floats.items()}
    model.load_state_dict(state, strict=False)
    return model


Builder = Callable[[str, dict], nn.Module]


def _skeleton(parsed: CBDFile, builder: Builder | None) -> nn.Module:
    """A fresh model of the file's architecture from ``builder(arch, arch_kwargs)``, built on the ``meta``
    device first (no memory) and checked against the file, so that ``arch_kwargs`` cannot ask for an
    arbitrarily large model."""
    arch = parsed.meta.get("arch")
    if not isinstance(arch, str) or builder is None:
        raise CBDError("the file names no architecture this loader can build: pass the model skeleton, "
                       "load(path, model)")
    kwargs = parsed.meta.get("arch_kwargs") or {}
    shapes_only = None
    try:
        if kwargs:  # without arguments the registry alone decides the size: nothing to fear from the file
            with torch.device("meta"):
                shapes_only = builder(arch, kwargs)
    except CBDError:
        raise
    except Exception:  # an architecture that cannot be built on the meta device: the real build decides
        shapes_only = None
    if shapes_only is not None:
        check_fits(shapes_only, parsed)
    try:
        return builder(arch, kwargs)
    except CBDError:
        raise
    except Exception as exc:
        raise FormatError(f"cannot build {arch} with the file's arch_kwargs {kwargs}: {str(exc)[:200]}") from None


def load(path: str | os.PathLike, model: nn.Module | None = None, *, builder: Builder | None = None) -> nn.Module:
    """Load a ``.cbd`` file into ``model`` (an uncompressed skeleton of the same architecture), or into
    ``builder(arch, arch_kwargs)`` when ``model`` is None. Never unpickles anything. (``cbdnet.load`` passes
    the zoo's builder, so files of registered architectures load by name.)"""
    parsed = read(path)
    if model is None:
        model = _skeleton(parsed, builder)
    dtype = parsed.meta.get("dtype", "float32")  # checked by read()
    model = _restore(model.to(_DTYPES[dtype]), parsed)
    model.eval()
    return model
