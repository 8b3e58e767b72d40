"""Building blocks for fuzzing the ``.cbd`` reader (used by tests/format/test_format_safety.py and
bench/fuzz_campaign.py).

A valid file is split into its regions; mutations either keep the file as it is on disk (so the SHA-256
trailer catches them) or are *re-signed* (trailer recomputed) so that the parser and the metadata/tensor
validation behind the checksum are exercised too.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from hypothesis import strategies as st
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

import cbdnet
from cbdnet.errors import CBDError
from cbdnet.format.cbdfile import _PREFIX, MAGIC, encode_file, parse
from cbdnet.zoo.models import build

DIGEST = 32
TINY_ARCH = ("digits-cnn", {"width": 4})  # five layers, ~6k weights: compresses in about a second


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build(TINY_ARCH[0], **TINY_ARCH[1]).eval()


def tiny_file(planes: int = 3, bottleneck: float = 0.3, version: int = 1) -> bytes:
    """The bytes of a compressed tiny model: composite and uniform layers, factored and plain planes (the paper's
    size rule keeps the composite code on these random weights, which the distortion rule would store uniform).
    Format 1 by default: the safetensors-level mutations below are about its layout (format 2: test_format_v2)."""
    model, _ = cbdnet.compress(tiny_model(), cbdnet.CBDConfig(planes=planes, bottleneck=bottleneck, fallback="size"),
                                progress=False)
    return encode_file(model, version=version)


KERNEL_ARCH = ("digits-cnn", {"width": 16})  # wide enough (32x16 kernels) for the kernel contexts to pay


def structured_levels(rng: np.random.Generator, out: int, cin: int, kh: int, kw: int) -> np.ndarray:
    """Levels shaped like trained kernels: a magnitude per slice, a smooth signed pattern within it (what the
    kernel contexts of the levels coder exploit)."""
    scale = rng.laplace(size=(out, cin, 1, 1)) * 4
    y, x = np.meshgrid(np.arange(kh) - (kh - 1) / 2, np.arange(kw) - (kw - 1) / 2, indexing="ij")
    pattern = rng.normal(size=(out, cin, 1, 1)) * np.exp(-(y**2 + x**2) / 4)
    return np.rint(scale * (pattern + 0.4 * rng.normal(size=(out, cin, kh, kw)))).astype(np.int64)


def kernel_file(seed: int = 0) -> bytes:
    """A format-2 file of the digits CNN (width 16) whose 3x3 kernels are :func:`structured_levels` (scaled), RTN
    6-bit per channel: its wider convolutions are stored ``ans-kernel`` (the kernel-context mode of the levels
    coder)."""
    torch.manual_seed(seed)
    model = build(KERNEL_ARCH[0], **KERNEL_ARCH[1]).eval()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3):
                module.weight.copy_(torch.from_numpy(0.01 * structured_levels(rng, *module.weight.shape)))
    model, report = cbdnet.compress(model, cbdnet.RTNConfig(bits=6), progress=False)
    assert "ans-kernel" in {layer.coding for layer in report.layers}, [layer.coding for layer in report.layers]
    return encode_file(model)


def sign(payload: bytes, version: int = 1, flags: int = 0) -> bytes:
    """Wrap a payload in a container with a correct length and SHA-256 trailer."""
    head = _PREFIX.pack(MAGIC, version, flags, len(payload)) + payload
    return head + hashlib.sha256(head).digest()


def resigned_flips(data, good: bytes, version: int = 1) -> bytes:
    """``good`` with 1..4 payload bytes XOR-ed (drawn from hypothesis ``data``), re-signed as ``version``."""
    payload = bytearray(payload_of(good))
    for _ in range(data.draw(st.integers(1, 4))):
        payload[data.draw(st.integers(0, len(payload) - 1))] ^= data.draw(st.integers(1, 255))
    return sign(bytes(payload), version=version)


def payload_of(data: bytes) -> bytes:
    return data[_PREFIX.size:-DIGEST]


def header_of(data: bytes) -> dict:
    payload = payload_of(data)
    length = struct.unpack_from("<Q", payload)[0]
    return json.loads(payload[8:8 + length])


def meta_of(data: bytes) -> dict:
    return json.loads(header_of(data)["__metadata__"]["cbdnet"])


def tensors_of(data: bytes) -> dict[str, np.ndarray]:
    return st_load(payload_of(data))


def rebuild(tensors: dict[str, np.ndarray], meta: dict | str) -> bytes:
    """A re-signed file holding ``tensors`` and the (possibly corrupt) metadata ``meta``."""
    text = meta if isinstance(meta, str) else json.dumps(meta)
    return sign(st_save(tensors, metadata={"cbdnet": text}))


def with_header(data: bytes, header: dict | bytes) -> bytes:
    """A re-signed file whose safetensors JSON header is replaced (the tensor bytes stay as they are)."""
    payload = payload_of(data)
    length = struct.unpack_from("<Q", payload)[0]
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return sign(struct.pack("<Q", len(raw)) + raw + payload[8 + length:])


def region_boundaries(data: bytes) -> list[int]:
    """Every offset where one region of the file ends and the next begins: magic, version, flags, length,
    safetensors header length, JSON header, each tensor's bytes, the digest."""
    header = header_of(data)
    json_len = struct.unpack_from("<Q", payload_of(data))[0]
    data_start = _PREFIX.size + 8 + json_len
    cuts = {0, 8, 12, 16, _PREFIX.size, _PREFIX.size + 8, data_start, len(data) - DIGEST, len(data)}
    for name, entry in header.items():
        if name != "__metadata__":
            cuts.update(data_start + offset for offset in entry["data_offsets"])
    return sorted(cuts)


class Marker:
    """Unpickling this creates ``path``: proof that something was unpickled."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"weights": Marker(str(marker))})


def outcome(data: bytes, folder: Path, *, full: bool = True) -> str:
    """``refused`` (a CBDError), or ``accepted`` when the file parses, loads and verifies; any other exception
    propagates (a crash). With ``full`` the file is also written to disk and loaded into a model."""
    try:
        parsed = parse(data)
        if not full:
            return "accepted"
        path = folder / "case.cbd"
        path.write_bytes(data)
        cbdnet.load(path)
        cbdnet.verify(path)
        if parsed.meta.get("arch") == TINY_ARCH[0] and parsed.meta.get("arch_kwargs") == TINY_ARCH[1]:
            cbdnet.load(path, tiny_model())  # into a skeleton of the same architecture
        return "accepted"
    except CBDError:
        return "refused"


def json_paths(value, prefix=()):
    """Every path into a JSON document (keys and list indices), for targeted mutation."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from json_paths(item, (*prefix, index))


def replace_at(document, path, new):
    """``document`` with the value at ``path`` replaced by ``new`` (in place; the root is returned)."""
    if not path:
        return new
    target = document
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = new
    return document


def v2_header_of(data: bytes) -> dict:
    """The inflated JSON header of a format-2 file."""
    payload = payload_of(data)
    length = struct.unpack_from("<I", payload)[0]
    return json.loads(zlib.decompress(payload[4:4 + length]))


def v2_with_header(data: bytes, header: dict | bytes) -> bytes:
    """A re-signed format-2 file whose header is replaced (the layer data stay as they are)."""
    payload = payload_of(data)
    length = struct.unpack_from("<I", payload)[0]
    raw = zlib.compress(header if isinstance(header, bytes) else json.dumps(header).encode())
    return sign(struct.pack("<I", len(raw)) + raw + payload[4 + length:], version=2)
