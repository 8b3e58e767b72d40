"""The ``.cbd`` file: a bounded, checksummed container around a safetensors payload. No pickle anywhere.

Layout (all integers little-endian)::

    0   8 bytes   magic  b"\\x89CBD\\r\\n\\x1a\\n"
    8   u32       format version (1)
    12  u32       flags (0)
    16  u64       payload length N
    24  N bytes   safetensors payload: packed bit tensors and float tensors; its ``__metadata__`` holds
                  one entry, ``cbdnet``, a JSON document (architecture, config, per-layer plane layout)
    24+N 32 bytes SHA-256 of bytes [0, 24+N)

Tensors are named ``cbd/<layer>/<part>`` (``scales``, ``sign``, ``p<k>.bits``, ``p<k>.B``, ``p<k>.C``, all
uint8 packed bits except ``scales``, float32 ``[max|w|, a, c]``, or for a ``grid`` layer its per-group steps,
the metadata adding ``groups``) and ``float/<state-dict key>``. Every
tensor's dtype and size is checked against what the metadata implies before anything is decoded, and each
plane's SHA-256 is kept so that ``verify`` can check ``B @ C`` against the plane bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save
from torch import nn

from . import __version__
from .codec import MAX_PLANES, LayerCode, PlaneCode, plane_digest
from .errors import CBDError, FormatError
from .nn import CBDModule, from_module

__all__ = ["save", "load", "read", "verify", "CBDFile", "FORMAT_VERSION", "MAGIC"]

MAGIC = b"\x89CBD\r\n\x1a\n"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIIQ")
_DIGEST = 32
MAX_HEADER_BYTES = 64 << 20  # safetensors JSON header
MAX_TENSORS = 200_000
MAX_NUMEL = 1 << 34
MODES = ("cbd", "uniform", "zero", "grid")
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
    if code.mode == "grid":
        meta["groups"] = int(code.scales().size)
    return meta


def _float_array(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: store the float32 value (exact)
        tensor = tensor.float()
    return tensor.numpy()


def _model_dtype(model: nn.Module) -> str:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return str(dtype).removeprefix("torch.")


def encode_file(model: nn.Module, *, arch: str | None = None, arch_kwargs: dict | None = None,
                extra: dict | None = None) -> bytes:
    """The bytes of the ``.cbd`` file for a compressed model."""
    tensors: dict[str, np.ndarray] = {}
    layers = []
    coded_keys = set()
    for name, module in model.named_modules():
        if isinstance(module, CBDModule):
            layers.append(_layer_meta(name, module.code, module.weight.dtype))
            coded_keys.add(f"{name}.weight")
            for part, array in module.code.tensors().items():
                tensors[f"cbd/{name}/{part}"] = np.ascontiguousarray(array)
    if not layers:
        raise CBDError("the model has no compressed layers: run cbdnet.compress(model) first")
    floats = []
    for key, value in model.state_dict().items():
        if key not in coded_keys:
            tensors[f"float/{key}"] = _float_array(value)
            floats.append({"key": key, "dtype": str(value.dtype).removeprefix("torch.")})
    meta = {
        "format": "cbdnet", "format_version": FORMAT_VERSION, "cbdnet_version": __version__,
        "arch": arch if arch is not None else getattr(model, "cbdnet_arch", None),
        "arch_kwargs": arch_kwargs if arch_kwargs is not None else getattr(model, "cbdnet_arch_kwargs", {}),
        "dtype": _model_dtype(model), "layers": layers, "floats": floats, "extra": extra or {},
    }
    payload = st_save(tensors, metadata={"cbdnet": json.dumps(meta, sort_keys=True)})
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(payload)) + payload
    return head + hashlib.sha256(head).digest()


def atomic_write(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename: ``path`` is never half-written."""
    target = Path(path)
    if target.exists() and not overwrite:
        raise CBDError(f"{target} exists; pass --force to overwrite it")
    if not target.parent.exists():
        raise CBDError(f"output directory {target.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(model: nn.Module, path: str | os.PathLike, *, arch: str | None = None, arch_kwargs: dict | None = None,
         extra: dict | None = None, overwrite: bool = True) -> int:
    """Write a compressed model to ``path`` (atomically); returns the file size in bytes."""
    data = encode_file(model, arch=arch, arch_kwargs=arch_kwargs, extra=extra)
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


def _split_container(data: bytes) -> bytes:
    _need(len(data) >= _PREFIX.size + _DIGEST, f"not a .cbd file: {len(data)} bytes is too short")
    magic, version, _flags, length = _PREFIX.unpack_from(data)
    _need(magic == MAGIC, "not a .cbd file (bad magic bytes)")
    _need(version <= FORMAT_VERSION,
          f"this file has .cbd format version {version}; this cbdnet ({__version__}) reads up to "
          f"version {FORMAT_VERSION}: upgrade cbdnet")
    _need(version >= 1, f"unknown .cbd format version {version}")
    _need(length == len(data) - _PREFIX.size - _DIGEST,
          f"truncated or padded .cbd file: payload length {length} does not match the file size {len(data)}")
    body, digest = data[:-_DIGEST], data[-_DIGEST:]
    _need(hashlib.sha256(body).digest() == digest, "checksum mismatch: the .cbd file is corrupt or was modified")
    payload = body[_PREFIX.size:]
    _need(len(payload) >= 8, "corrupt payload: no tensor header")
    header_len = struct.unpack_from("<Q", payload)[0]
    _need(header_len <= min(MAX_HEADER_BYTES, len(payload) - 8), f"corrupt payload: header length {header_len}")
    return payload


def _parse_meta(payload: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    header_len = struct.unpack_from("<Q", payload)[0]
    try:
        header = json.loads(payload[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"corrupt payload header: {exc}") from None
    _need(isinstance(header, dict) and len(header) <= MAX_TENSORS + 1, "corrupt payload header")
    try:
        tensors = st_load(payload)
    except Exception as exc:  # the safetensors parser: any failure means a malformed payload
        raise FormatError(f"corrupt tensor payload: {exc}") from None
    raw = (header.get("__metadata__") or {}).get("cbdnet")
    _need(isinstance(raw, str), "no cbdnet metadata in the payload")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise FormatError(f"corrupt cbdnet metadata: {exc}") from None
    _need(isinstance(meta, dict) and meta.get("format") == "cbdnet", "corrupt cbdnet metadata")
    _need(isinstance(meta.get("layers"), list) and isinstance(meta.get("floats"), list),
          "corrupt cbdnet metadata: no layer list")
    return meta, tensors


def _expect(tensors: dict, key: str, dtype, size: int) -> np.ndarray:
    _need(key in tensors, f"missing tensor {key}")
    array = tensors[key]
    _need(array.dtype == dtype and array.ndim == 1 and array.size == size,
          f"tensor {key} has dtype {array.dtype} and shape {array.shape}; expected {np.dtype(dtype)} [{size}]")
    return array


def _packed(count: int) -> int:
    return (count + 7) // 8


def _layer_code(layer: dict, tensors: dict, used: set) -> tuple[str, LayerCode]:
    _need(isinstance(layer, dict) and isinstance(layer.get("name"), str), "corrupt layer entry")
    name = layer["name"]
    shape = layer.get("shape")
    _need(isinstance(shape, list) and len(shape) in (2, 4), f"layer {name}: bad shape {shape!r}")
    shape = tuple(_int(s, f"{name}.shape", 1, 1 << 31) for s in shape)
    _need(int(np.prod(shape, dtype=np.int64)) <= MAX_NUMEL, f"layer {name}: shape {shape} too large")
    mode = layer.get("mode")
    _need(mode in MODES, f"layer {name}: unknown mode {mode!r}")
    num_planes = _int(layer.get("planes"), f"{name}.planes", 1, MAX_PLANES)
    plane_meta = layer.get("plane_codes")
    exponents = layer.get("exponents")
    _need(isinstance(plane_meta, list) and isinstance(exponents, list), f"layer {name}: no plane list")
    _need(len(plane_meta) == len(exponents) == (0 if mode == "zero" else num_planes),
          f"layer {name}: {len(plane_meta)} planes stored, {num_planes} expected")
    exponents = tuple(_int(e, f"{name}.exponent", -1100, 1100) for e in exponents)
    code = LayerCode(shape, mode, num_planes, 0.0, 0.0, 0.0, exponents, np.zeros(0, np.uint8), [],
                     bound=_int(layer.get("bound", 0), f"{name}.bound", 0, 1 << 31),
                     mask_rank=_int(layer.get("mask_rank", 0), f"{name}.mask_rank", 0, 1 << 31),
                     reason=str(layer.get("reason", "")))
    h, w = code.matrix_shape
    prefix = f"cbd/{name}/"
    groups = 3
    if mode == "grid":
        groups = _int(layer.get("groups"), f"{name}.groups", 1, shape[0])
        _need(groups in (1, shape[0]), f"layer {name}: {groups} steps for {shape[0]} output channels")
    scales = _expect(tensors, prefix + "scales", np.float32, groups)
    _need(bool(np.isfinite(scales).all()), f"layer {name}: non-finite scales")
    if mode == "grid":
        code.steps = scales
        _need(list(exponents) == list(range(num_planes - 1, -1, -1)), f"layer {name}: bad grid plane order")
    else:
        code.wmax, code.scale, code.step = (float(v) for v in scales)
    used.add(prefix + "scales")
    if mode != "zero":
        code.sign = _expect(tensors, prefix + "sign", np.uint8, _packed(h * w))
        used.add(prefix + "sign")
    for index, (entry, exponent) in enumerate(zip(plane_meta, exponents, strict=True)):
        _need(isinstance(entry, dict) and entry.get("exponent") == exponent, f"layer {name}: bad plane {index}")
        storage, digest = entry.get("storage"), entry.get("sha256")
        _need(isinstance(digest, str) and len(digest) == 64, f"layer {name}: plane {index} has no digest")
        rank = _int(entry.get("rank"), f"{name}.plane{index}.rank", -1, min(h, w))
        if storage == "packed":
            parts = {"bits": _packed(h * w)}
        else:
            _need(storage == "factored" and rank >= 0, f"layer {name}: plane {index} storage {storage!r}")
            parts = {"B": _packed(h * rank), "C": _packed(rank * w)}
        stored = {}
        for part, size in parts.items():
            key = f"{prefix}p{index}.{part}"
            stored[part] = _expect(tensors, key, np.uint8, size)
            used.add(key)
        code.planes.append(PlaneCode(exponent, storage, rank, stored, digest))
    return name, code


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
    meta, tensors = _parse_meta(_split_container(data))
    _need(len(tensors) <= MAX_TENSORS, "too many tensors")
    used: set[str] = set()
    codes = dict(_layer_code(layer, tensors, used) for layer in meta["layers"])
    _need(len(codes) == len(meta["layers"]), "duplicate layer names")
    floats = {}
    for entry in meta["floats"]:
        _need(isinstance(entry, dict) and isinstance(entry.get("key"), str), "corrupt float entry")
        key = "float/" + entry["key"]
        _need(key in tensors, f"missing tensor {key}")
        floats[entry["key"]] = tensors[key]
        used.add(key)
    _need(used == set(tensors), f"unexpected tensors in file: {sorted(set(tensors) - used)[:5]}")
    return CBDFile(meta=meta, codes=codes, floats=floats, size=len(data))


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
    return problems


def _restore(model: nn.Module, parsed: CBDFile) -> nn.Module:
    for name, code in parsed.codes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CBDError(f"the file's layer {name} does not exist in the model") from None
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or tuple(module.weight.shape) != tuple(code.shape):
            raise CBDError(f"the file's layer {name} {tuple(code.shape)} does not fit the model's {module}")
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, from_module(module, code))
    state = {key: torch.from_numpy(np.array(value)) for key, value in parsed.floats.items()}
    expected = {k for k in model.state_dict() if not _is_coded(model, k)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CBDError(f"the file does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.load_state_dict(state, strict=False)
    return model


def _is_coded(model: nn.Module, key: str) -> bool:
    owner, _, leaf = key.rpartition(".")
    return leaf == "weight" and isinstance(model.get_submodule(owner) if owner else model, CBDModule)


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a ``.cbd`` file into ``model`` (an uncompressed skeleton of the same architecture), or into a
    fresh model of the file's registered architecture when ``model`` is None. Never unpickles anything."""
    parsed = read(path)
    if model is None:
        from .models import build  # the zoo (plain architectures) sits below the file format

        arch = parsed.meta.get("arch")
        if not isinstance(arch, str):
            raise CBDError("the file names no registered architecture: pass the model skeleton, load(path, model)")
        kwargs = parsed.meta.get("arch_kwargs") or {}
        if not isinstance(kwargs, dict):
            raise FormatError("corrupt cbdnet metadata: arch_kwargs")
        model = build(arch, **kwargs)
    dtype = parsed.meta.get("dtype", "float32")
    if dtype not in _DTYPES:
        raise FormatError(f"corrupt cbdnet metadata: dtype {dtype!r}")
    model = _restore(model.to(_DTYPES[dtype]), parsed)
    model.eval()
    return model
