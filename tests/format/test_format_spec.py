"""docs/format.md is a specification another implementation can follow: a reader written from that page alone
(numpy, zlib, hashlib, json and constriction; nothing of cbdnet) decodes cbdnet's own files to the same weights,
bit for bit, and the same float tensors.

The files cover every code (``cbd``, ``uniform``, ``grid``, ``zero``) and every coding (``none``, ``ans``,
``gf2+ans``, ``ans-kernel``), float16 and float32 scales, and ``constant``/``float16``/``raw`` float tensors.
If this test fails after a change to the format, the specification (docs/format.md) must change with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import zlib
from pathlib import Path

import constriction
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SEGNET = ROOT / "models" / "segnet_basic_camvid.pt"
MAGIC = b"\x89CBD\r\n\x1a\n"
RAW_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "<f4", "float64": "<f8", "int64": "<i8",
              "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "?"}


# ---------------------------------------------------------------- the reader, from docs/format.md only

class Bytes:
    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos, self.end = data, pos, len(data) if end is None else end

    def take(self, size: int) -> bytes:
        assert self.pos + size <= self.end, "short part"
        self.pos += size
        return self.data[self.pos - size:self.pos]

    def u8(self) -> int:
        return self.take(1)[0]

    def varint(self) -> int:
        value = shift = 0
        while True:
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value


def unzigzag(value: int) -> int:
    return value >> 1 if value % 2 == 0 else -((value + 1) >> 1)


def unpack(data: bytes, count: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(data, np.uint8), count=count, bitorder="little").astype(np.int64)


def categorical(freqs) -> object:
    return constriction.stream.model.Categorical(np.asarray(freqs, np.float64), perfect=False)


def kernel_levels(coder, slices: int, kh: int, kw: int, alphabet: np.ndarray, static: np.ndarray) -> np.ndarray:
    """Mode KERNEL: positions centre first, each later one under its context's table (docs/format.md)."""
    order = sorted(range(kh * kw), key=lambda p: ((2 * (p // kw) - kh + 1) ** 2 + (2 * (p % kw) - kw + 1) ** 2, p))
    index = np.zeros((kh * kw, slices), np.int64)
    values = np.zeros((kh * kw, slices), np.int64)
    total = np.zeros(slices, np.int64)
    counts = np.zeros((30, static.size), np.int64)
    done: list[int] = []
    for t, position in enumerate(order):
        y, x = divmod(position, kw)
        near = [a * kw + b for a, b in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1))
                if 0 <= a < kh and 0 <= b < kw and a * kw + b in done]
        if t == 0:
            index[position] = coder.decode(categorical(static), slices)
        else:
            magnitude = sum((4 * total >= edge * t).astype(np.int64) for edge in (1, 3, 6, 12, 24))
            if near:
                lean = 20 * t * sum(values[q] for q in near)
                direction = sum((lean >= edge * len(near) * total).astype(np.int64) for edge in (-12, -3, 3, 12))
                direction[total == 0] = 2
            else:
                direction = np.full(slices, 2)
            context = 5 * magnitude + direction
            for c in range(30):  # groups in increasing context order, slices in increasing order
                rows = np.flatnonzero(context == c)
                if rows.size:
                    table = static.sum() * counts[c] + 32 * static
                    index[position, rows] = coder.decode(categorical(table), rows.size)
            np.add.at(counts, (context, index[position]), 1)
        values[position] = alphabet[index[position]]
        total += np.abs(values[position])
        done.append(position)
    return values.T.reshape(-1)


def levels_blob(blob: bytes, count: int, kernel: tuple[int, int] | None = None) -> np.ndarray:
    body = blob[:-4]
    assert struct.unpack("<I", blob[-4:])[0] == zlib.crc32(body, zlib.crc32(struct.pack("<Q", count)))
    r = Bytes(body)
    assert r.u8() == 1
    mode = r.u8()
    if mode == 0:
        return np.zeros(0, np.int64)
    lo = unzigzag(r.varint())
    if mode == 1:
        return np.full(count, lo, np.int64)
    if mode == 3:
        width = r.u8()
        bits = unpack(r.take((count * width + 7) // 8), count * width).reshape(count, width)
        return (bits << np.arange(width)).sum(axis=1) + lo
    if mode == 4:
        kh, kw = r.varint(), r.varint()
        assert (kh, kw) == kernel
    span = r.varint()
    present, freqs, symbol = [], [], 0
    while symbol <= span:
        f = r.varint()
        if f == 0:
            symbol += r.varint() + 1
            continue
        present.append(symbol)
        freqs.append(f)
        symbol += 1
    alphabet = np.asarray(present, np.int64) + lo
    words = np.frombuffer(body[r.pos:], "<u4").astype(np.uint32)
    coder = constriction.stream.stack.AnsCoder(words)
    if mode == 4:
        out = kernel_levels(coder, count // (kh * kw), kh, kw, alphabet, np.asarray(freqs, np.int64))
    else:
        out = alphabet[np.asarray(coder.decode(categorical(freqs), count))]
    assert coder.is_empty()
    return out


def layer_weight(layer: dict, data: Bytes) -> np.ndarray:
    shape, mode, e = layer["shape"], layer["mode"], layer["exponents"]
    h, w = (shape[0], shape[1]) if len(shape) == 2 else (shape[0] * shape[2], shape[1] * shape[3])
    count = layer["groups"] if mode == "grid" else 3
    dtype = "<f2" if layer.get("scales16") else "<f4"
    scales = np.frombuffer(data.take(count * np.dtype(dtype).itemsize), dtype).astype(np.float32)
    stream = layer["stream"]
    blobs = [data.take(size) for size in stream["blob_bytes"]]
    coding = stream["coding"]
    if coding == "none":
        return np.zeros(shape, np.float32)
    if coding == "ans":
        q = levels_blob(blobs[0], h * w).reshape(h, w)
    elif coding == "ans-kernel":
        o, i, kh, kw = shape
        q = levels_blob(blobs[0], h * w, (kh, kw)).reshape(o, i, kh, kw).transpose(0, 2, 1, 3).reshape(h, w)
    else:
        assert coding == "gf2+ans"
        magnitude = levels_blob(blobs[0], h * w)
        for index, rank, crc in stream["factored"]:
            left = unpack(data.take(math.ceil(h * rank / 8)), h * rank).reshape(h, rank)
            right = unpack(data.take(math.ceil(rank * w / 8)), rank * w).reshape(rank, w)
            plane = (left @ right) % 2
            assert zlib.crc32(np.packbits(plane.astype(bool).reshape(-1), bitorder="little").tobytes()) == crc
            magnitude += plane.reshape(-1) << (e[index] - min(e))
        signs = levels_blob(blobs[1], int(np.count_nonzero(magnitude)))
        q = magnitude.copy()
        q[magnitude != 0] *= 1 - 2 * signs
        q = q.reshape(h, w)
    if mode == "grid":
        steps = np.broadcast_to(scales, (h // (shape[2] if len(shape) == 4 else 1),))
        rows = np.repeat(steps, shape[2]) if len(shape) == 4 else steps
        matrix = q.astype(np.float32) * rows.astype(np.float32)[:, None]
    else:
        wmax, c = scales[0], float(scales[2])
        magnitude = np.abs(q)
        if mode == "cbd":
            table = np.zeros(1 << (max(e) - min(e) + 1), np.float32)
            for exponent in e:  # the highest plane first, summed in float32
                bit = (np.arange(table.size) >> (exponent - min(e))) & 1
                table += bit.astype(np.float32) * np.float32(c * 2.0**exponent)
            unsigned = table[magnitude]
        else:
            unsigned = (magnitude / ((1 << layer["planes"]) - 1)).astype(np.float32)
        matrix = np.where(q < 0, -1, 1).astype(np.float32) * (wmax * unsigned)
    if len(shape) == 2:
        return matrix
    o, i, kh, kw = shape
    return matrix.reshape(o, kh, i, kw).transpose(0, 2, 1, 3)


def read_spec(data: bytes) -> tuple[dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(header, weights by layer name, float tensors by key) of a format-2 file."""
    magic, version, flags, length = struct.unpack_from("<8sIIQ", data)
    assert (magic, version, flags, length) == (MAGIC, 2, 0, len(data) - 56)
    assert hashlib.sha256(data[:-32]).digest() == data[-32:]
    payload = data[24:-32]
    size = struct.unpack_from("<I", payload)[0]
    header = json.loads(zlib.decompress(payload[4:4 + size]))
    cursor = Bytes(payload, 4 + size)
    weights = {layer["name"]: layer_weight(layer, cursor) for layer in header["layers"]}
    floats = {}
    for entry in header["floats"]:
        count = math.prod(entry["shape"])
        if entry["stored"] == "constant":
            floats[entry["key"]] = np.full(entry["shape"], entry["value"])
            continue
        dtype = "<f2" if entry["stored"] == "float16" else RAW_DTYPES[entry["dtype"]]
        floats[entry["key"]] = np.frombuffer(cursor.take(count * np.dtype(dtype).itemsize), dtype).reshape(
            entry["shape"])
    assert cursor.pos == len(payload), "bytes left after the last float tensor"
    return header, weights, floats


# ---------------------------------------------------------------- cbdnet's files, read both ways

def _mixed_codes_file() -> bytes:
    """A small model carrying every code, a GF(2)-factored plane (gf2+ans) and float32 floats."""
    from cbd_mutations import tiny_model

    from cbdnet.codec import GridCode, encode_rtn, encode_uniform, encode_weight
    from cbdnet.codec.bits import pack_bits
    from cbdnet.codec.bits import store_plane as make_plane
    from cbdnet.format.cbdfile import encode_file
    from cbdnet.nn import from_module

    model = tiny_model()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    weights = [m.weight.detach().double().numpy() for _, m in layers]
    rng = np.random.default_rng(0)
    out, cin = weights[1].shape[:2]
    h, w = out * 3, cin * 3
    high = (rng.integers(0, 2, (h, 2)) @ rng.integers(0, 2, (2, w))) % 2  # rank 2: factoring it pays
    planes = [make_plane(high.astype(bool), 2, True)] + [make_plane(rng.integers(0, 2, (h, w)).astype(bool), e, False)
                                                          for e in (1, 0)]
    low_rank = GridCode(shape=(out, cin, 3, 3), num_planes=3, exponents=(2, 1, 0),
                        sign=pack_bits(rng.integers(0, 2, (h, w)).astype(bool)), planes=planes,
                        steps=rng.uniform(0.01, 0.1, out).astype(np.float32))
    codes = [encode_uniform(weights[0], 3), low_rank, encode_weight(weights[2], 4, 0.3, fallback="size"),
             encode_rtn(weights[3], 4, "channel"), encode_rtn(weights[4], 5, "tensor")]
    if len(layers) > 5:
        codes.append(encode_weight(np.zeros_like(weights[5]), 3, 0.3))
    for (name, module), code in zip(layers, codes, strict=False):
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, from_module(module, code))
    model.cbdnet_float32 = True
    return encode_file(model)


def _trained_segnet_file() -> bytes:
    """The trained SegNet-Basic, RTN 4-bit per channel: kernel contexts, float16 steps, folded BatchNorms."""
    import cbdnet
    from cbdnet.zoo.models import build, load_weights

    model = load_weights(build("segnet-basic"), str(SEGNET)).eval()
    model, _ = cbdnet.compress(model, cbdnet.RTNConfig(bits=4, granularity="channel"))
    from cbdnet.format.cbdfile import encode_file

    return encode_file(model)


def _zero_layer_file() -> bytes:
    import cbdnet

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        model[2].weight.zero_()
    model, _ = cbdnet.compress(model, cbdnet.CBDConfig(planes=5, bottleneck=0.3))
    from cbdnet.format.cbdfile import encode_file

    return encode_file(model)


@pytest.mark.parametrize("make", [_mixed_codes_file, _trained_segnet_file, _zero_layer_file],
                         ids=["mixed-codes", "trained-segnet", "zero-layer"])
def test_a_reader_written_from_the_specification_decodes_cbdnets_files(make):
    from cbdnet.format.cbdfile import parse

    data = make()
    header, weights, floats = read_spec(data)
    parsed = parse(data)
    assert set(weights) == set(parsed.codes)
    for name, code in parsed.codes.items():
        assert np.array_equal(weights[name], code.decode()), f"layer {name} decodes differently"
    assert set(floats) == set(parsed.floats)
    for key, array in parsed.floats.items():
        assert np.array_equal(floats[key].astype(array.dtype), array), f"float tensor {key}"
    assert header["format"] == "cbdnet" and header["format_version"] == 2


def test_the_files_cover_every_code_and_coding():
    codings, modes = set(), set()
    for make in (_mixed_codes_file, _trained_segnet_file, _zero_layer_file):
        header = read_spec(make())[0]
        codings |= {layer["stream"]["coding"] for layer in header["layers"]}
        modes |= {layer["mode"] for layer in header["layers"]}
    assert codings == {"none", "ans", "gf2+ans", "ans-kernel"}
    assert modes == {"cbd", "uniform", "grid", "zero"}
