""".cbd format 2: bit-exact round trips of every code kind, sizes as reported, format 1 still read, and corrupt or
truncated files refused (one CBDError, never a crash)."""

from __future__ import annotations

import copy
import json
import struct

import numpy as np
import pytest
import torch
from cbd_mutations import (
    header_of,
    json_paths,
    meta_of,
    outcome,
    payload_of,
    rebuild,
    replace_at,
    resigned_flips,
    tensors_of,
    tiny_file,
    tiny_model,
    v2_header_of,
    v2_with_header,
    with_header,
)
from cbd_mutations import sign as sign_any
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cbdnet
from cbdnet.codec import GridCode, encode_rtn, encode_uniform, encode_weight
from cbdnet.codec.bits import pack_bits
from cbdnet.codec.bits import store_plane as make_plane
from cbdnet.codec.stream import decode_stream, encode_stream
from cbdnet.errors import CBDError, FormatError
from cbdnet.format.cbdfile import encode_file, parse
from cbdnet.nn import from_module


def sign(payload: bytes, version: int = 2) -> bytes:
    return sign_any(payload, version=version)


FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _low_rank_grid(rng: np.random.Generator, out: int = 24, cin: int = 16) -> GridCode:
    """A 3-plane grid code whose high plane is rank 2 over GF(2) (so factoring it beats entropy coding)."""
    h, w = out * 3, cin * 3
    high = (rng.integers(0, 2, (h, 2)) @ rng.integers(0, 2, (2, w))) % 2
    low = rng.integers(0, 2, (2, h, w))
    planes = [make_plane(high.astype(bool), 2, True)] + [make_plane(p.astype(bool), e, False)
                                                          for p, e in zip(low, (1, 0), strict=True)]
    negative = rng.integers(0, 2, (h, w)).astype(bool)
    return GridCode(shape=(out, cin, 3, 3), num_planes=3, exponents=(2, 1, 0), sign=pack_bits(negative),
                    planes=planes, steps=rng.uniform(0.01, 0.1, out).astype(np.float32))


def _model_with(codes: list) -> torch.nn.Module:
    """tiny_model's layers carrying the given codes (in order, for layers of the codes' shapes)."""
    model = tiny_model()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    for (name, module), code in zip(layers, codes, strict=False):
        if code is None:
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, from_module(module, code))
    return model


def _codes(model: torch.nn.Module) -> list:
    weights = [m.weight.detach().double().numpy() for m in model.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    zero = encode_weight(np.zeros_like(weights[1]), 3, 0.3)
    return [encode_uniform(weights[0], 3), zero, encode_weight(weights[2], 4, 0.3, fallback="size"),
            encode_rtn(weights[3], 4, "channel"), encode_rtn(weights[4], 5, "tensor")]


@pytest.fixture(scope="module")
def good() -> bytes:
    codes = _codes(tiny_model())
    codes[1] = _low_rank_grid(np.random.default_rng(0), 8, 4)  # features.3: GF(2)-factored high plane
    return encode_file(_model_with(codes), arch="digits-cnn", arch_kwargs={"width": 4})


def _assert_same_codes(a, b) -> None:
    assert list(a.codes) == list(b.codes)
    for name in a.codes:
        x, y = a.codes[name], b.codes[name]
        assert type(x) is type(y) and x.mode == y.mode and x.exponents == y.exponents
        assert np.array_equal(x.scales(), y.scales())
        assert np.array_equal(x.decode(), y.decode()), name
        levels_x, steps_x = x.levels()
        levels_y, steps_y = y.levels()
        assert np.array_equal(levels_x, levels_y) and np.array_equal(steps_x, steps_y)


def test_every_code_kind_round_trips_bit_exactly_and_v1_still_reads():
    model = tiny_model()
    rng = np.random.default_rng(0)
    codes = _codes(model)
    codes[1] = _low_rank_grid(rng, 8, 4)  # features.3 is 8 x 4 x 3 x 3 in digits-cnn width 4
    codes[0] = encode_weight(np.zeros((4, 1, 3, 3)), 3, 0.3)
    model = _model_with(codes)
    model.cbdnet_float32 = True
    v1, v2 = parse(encode_file(model, version=1)), parse(encode_file(model))
    assert v1.meta["format_version"] == 1 and v2.meta["format_version"] == 2
    _assert_same_codes(v1, v2)
    assert {"zero", "grid"} <= {c.mode for c in v2.codes.values()}
    assert {"cbd", "uniform"} & {c.mode for c in v2.codes.values()}
    for key in v1.floats:
        assert np.array_equal(v1.floats[key], v2.floats[key])  # float32 kept: exact
    codings = {name: code.stream().coding for name, code in v2.codes.items()}
    assert "gf2+ans" in codings.values() and "ans" in codings.values() and "none" in codings.values()


def test_gf2_factored_plane_beats_entropy_coding_and_round_trips():
    code = _low_rank_grid(np.random.default_rng(1))
    stream = encode_stream(code.signed_magnitudes(), code.exponents, code.planes)
    assert stream.coding == "gf2+ans" and stream.factored[0].rank <= 2
    plain = encode_stream(code.signed_magnitudes(), code.exponents, [make_plane(p, e, False) for p, e in
                                                                     zip(code.decode_planes(), code.exponents,
                                                                         strict=True)])
    assert stream.nbytes < plain.nbytes
    h, w = code.matrix_shape
    q, planes = decode_stream(stream.coding, stream.parts(), [(f.index, f.rank, f.crc) for f in stream.factored],
                              h, w, code.exponents)
    assert np.array_equal(q, code.signed_magnitudes()) and planes[0].rank == stream.factored[0].rank


def test_file_size_is_what_the_report_says(tmp_path):
    model, report = cbdnet.compress(tiny_model(), cbdnet.RTNConfig(bits=4), progress=False)
    report.file_bytes = cbdnet.save(model, tmp_path / "m.cbd")
    size = (tmp_path / "m.cbd").stat().st_size
    assert report.file_bytes == size and report.to_dict()["file_bits_per_weight"] == 8 * size / report.params
    parsed = cbdnet.format.read(tmp_path / "m.cbd")
    assert report.coded_weight_bits == sum(code.coded_bits() for code in parsed.codes.values())
    assert report.weight_bits == sum(code.bits() for code in parsed.codes.values())
    # layers' scales + streams, float tensors and the compressed header tile the payload
    header = struct.unpack_from("<I", payload_of(parsed_bytes := (tmp_path / "m.cbd").read_bytes()))[0]
    assert size == 24 + 4 + header + report.coded_weight_bits // 8 + report.float_bits // 8 + 32
    assert header <= 2048 + 8 * (len(parsed.codes) + len(parsed.floats))
    assert parse(parsed_bytes).size == size


def test_float32_opt_out_and_float16_default(tmp_path):
    half, _ = cbdnet.compress(tiny_model(), cbdnet.RTNConfig(bits=4), progress=False)
    full, _ = cbdnet.compress(tiny_model(), cbdnet.RTNConfig(bits=4), progress=False, float32=True, fold_bn=False)
    small, big = encode_file(half), encode_file(full)
    assert len(small) < len(big)
    original = tiny_model().state_dict()
    floats = parse(big).floats
    assert all(torch.equal(torch.from_numpy(np.array(floats[k])), original[k]) for k in floats)  # float32: untouched
    for version_data, model in ((small, half), (big, full)):  # the model holds exactly what its file holds
        path = tmp_path / "x.cbd"
        path.write_bytes(version_data)
        reloaded = cbdnet.load(path)
        for key, value in model.state_dict().items():
            assert torch.equal(value, reloaded.state_dict()[key]), key


def test_versions_other_than_1_and_2_are_refused_naming_them(good):
    for version in (0, 3, 77):
        with pytest.raises(FormatError, match=f"version {version}"):
            parse(sign(payload_of(good), version=version))


def test_truncation_anywhere_is_refused(good, tmp_path):
    for cut in sorted({*range(0, 64), *range(len(good) - 64, len(good)), *range(0, len(good), 97)}):
        assert outcome(good[:cut], tmp_path) == "refused"
        assert outcome(sign(payload_of(good)[:max(0, cut - 56)]), tmp_path) == "refused"


@FUZZ
@given(data=st.data())
def test_resigned_byte_flips_are_refused_or_load(good, tmp_path_factory, data):
    assert outcome(resigned_flips(data, good, version=2), tmp_path_factory.mktemp("f")) in ("refused", "accepted")


JSON = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(), st.text(max_size=8),
                 st.sampled_from(["ans", "gf2+ans", "none", "raw", "float16", "grid", "cbd", "zero"]),
                 st.lists(st.integers(-3, 10**6), max_size=4))


@FUZZ
@given(data=st.data())
def test_resigned_header_mutations_are_refused_or_load(good, tmp_path_factory, data):
    header = v2_header_of(good)
    path = data.draw(st.sampled_from([p for p in json_paths(header) if p]))
    header = replace_at(header, path, data.draw(JSON))
    assert outcome(v2_with_header(good, header), tmp_path_factory.mktemp("h")) in ("refused", "accepted")


def test_header_bombs_and_bad_zlib_are_refused(good):
    header = v2_header_of(good)
    payload = payload_of(good)
    rest = payload[4 + struct.unpack_from("<I", payload)[0]:]  # the layer data after the header
    with pytest.raises(FormatError):
        parse(v2_with_header(good, b" " * (20 << 20)))  # inflates past the header bound
    with pytest.raises(FormatError):
        parse(sign(struct.pack("<I", 10) + b"not zlib!!" + rest))
    with pytest.raises(FormatError):
        parse(sign(struct.pack("<I", 1 << 31) + rest))
    huge = json.loads(json.dumps(header))
    huge["layers"][0]["shape"] = [1 << 20, 1 << 10, 3, 3]  # a billion weights from a tiny blob
    with pytest.raises(FormatError):
        parse(v2_with_header(good, huge))


def test_duplicate_json_keys_are_refused_by_both_readers(good):
    """A JSON key given twice (the parser would keep the last one silently) is corruption in either format."""
    def duplicated(document: dict) -> bytes:  # its first key given once more, before the real one
        return ("{" + json.dumps(next(iter(document))) + ": null, " + json.dumps(document)[1:]).encode()

    with pytest.raises(FormatError, match="corrupt header: duplicate keys"):
        parse(v2_with_header(good, duplicated(v2_header_of(good))))
    v1 = tiny_file(version=1)
    with pytest.raises(FormatError, match="corrupt payload header: duplicate keys"):
        parse(with_header(v1, duplicated(header_of(v1))))
    with pytest.raises(FormatError, match="corrupt cbdnet metadata: duplicate keys"):
        parse(rebuild(tensors_of(v1), duplicated(meta_of(v1)).decode()))


def test_a_wrong_factor_is_refused_by_its_crc(tmp_path):
    model = _model_with([None, _low_rank_grid(np.random.default_rng(2), 8, 4)])
    data = encode_file(model)
    header = v2_header_of(data)
    layer = next(entry for entry in header["layers"] if entry["stream"]["coding"] == "gf2+ans")
    layer["stream"]["factored"][0][2] ^= 1
    with pytest.raises(CBDError, match="CRC"):
        parse(v2_with_header(data, header))


def test_constant_tensors_are_stored_as_one_value_and_come_back_exactly(tmp_path):
    model, _ = cbdnet.compress(tiny_model(), cbdnet.RTNConfig(bits=4), progress=False)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.running_mean.zero_()
        bn.running_var.fill_(0.99999)  # not float16-exact: would cost 4 bytes per value
        bn.num_batches_tracked.fill_(7)
    path = tmp_path / "c.cbd"
    size = cbdnet.save(model, path)
    loaded = cbdnet.load(path, tiny_model())
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value) and loaded.state_dict()[key].dtype == value.dtype
    with torch.no_grad():
        bn.running_var[0] = 0.5  # no longer constant: stored as a tensor, the file grows
    assert cbdnet.save(model, tmp_path / "d.cbd") > size


def test_a_constant_must_fit_its_dtype_and_the_file_size(tmp_path):
    model, _ = cbdnet.compress(tiny_model(), cbdnet.RTNConfig(bits=4), progress=False)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with torch.no_grad():
        bn.weight.fill_(1.0)
    good = encode_file(model)
    meta = v2_header_of(good)
    entry = next(f for f in meta["floats"] if f.get("stored") == "constant" and f["dtype"] == "float32")
    for value, shape in ((1e300, entry["shape"]), ("1", entry["shape"]), (True, entry["shape"]),
                         (1.0, [1 << 20, 1 << 20])):
        bad = copy.deepcopy(meta)
        bad_entry = next(f for f in bad["floats"] if f["key"] == entry["key"])
        bad_entry.update(value=value, shape=shape)
        with pytest.raises(FormatError):
            parse(v2_with_header(good, bad))


def test_steps_float16_by_default_two_bytes_each_and_exact(tmp_path):
    """Grid steps are rounded to float16 (at most 2^-11 relative change) and stored in 2 bytes each; with
    ``float32=True`` they are kept and stored in 4. Either way the file reloads to exactly the model."""
    half, half_report = cbdnet.compress(tiny_model(), cbdnet.RTNConfig(bits=4), progress=False, fold_bn=False)
    full, _ = cbdnet.compress(tiny_model(), cbdnet.RTNConfig(bits=4), progress=False, float32=True, fold_bn=False)
    codes = {name: m.code for name, m in half.named_modules() if getattr(m, "code", None) is not None}
    full_codes = {name: m.code for name, m in full.named_modules() if getattr(m, "code", None) is not None}
    steps = sum(code.scales().size for code in codes.values())
    assert half_report.extra["float16_steps"] == len(codes)
    for name, code in codes.items():
        kept = full_codes[name].scales()
        assert np.array_equal(code.scales().astype(np.float16).astype(np.float32), code.scales())
        assert np.max(np.abs(code.scales() / kept - 1)) <= 2.0**-11
        assert not np.array_equal(kept.astype(np.float16).astype(np.float32), kept)  # float32 kept as it was
        assert code.coded_bits() == full_codes[name].coded_bits() - 16 * code.scales().size
    meta = v2_header_of(encode_file(half))
    assert all(layer.get("scales16") is True for layer in meta["layers"])
    assert not any("scales16" in layer for layer in v2_header_of(encode_file(full))["layers"])
    assert len(encode_file(full)) - len(encode_file(half)) >= 2 * steps  # float16 BatchNorms save more
    for model in (half, full):
        cbdnet.save(model, tmp_path / "m.cbd")
        reloaded = cbdnet.load(tmp_path / "m.cbd")
        for name, code in {n: m.code for n, m in model.named_modules() if getattr(m, "code", None)}.items():
            assert np.array_equal(reloaded.get_submodule(name).code.scales(), code.scales())
            assert torch.equal(reloaded.get_submodule(name).weight, model.get_submodule(name).weight)


def test_a_bad_scales16_flag_is_refused(tmp_path):
    model, _ = cbdnet.compress(tiny_model(), cbdnet.RTNConfig(bits=4), progress=False)
    good = encode_file(model)
    meta = v2_header_of(good)
    for value in (1, "true", None, [True]):
        bad = copy.deepcopy(meta)
        bad["layers"][0]["scales16"] = value
        with pytest.raises(FormatError, match="scales16"):
            parse(v2_with_header(good, bad))
    flipped = copy.deepcopy(meta)  # float32 claimed for float16 scales: the sizes no longer tile the payload
    del flipped["layers"][0]["scales16"]
    with pytest.raises(FormatError):
        parse(v2_with_header(good, flipped))


@pytest.mark.parametrize("bad", ["", "x" * 33, "rtn4/ch\n", "rtn4/ch;rm", "é", 7, ["rtn4/ch"]])
def test_a_layers_label_is_read_back_and_a_bad_one_is_refused(bad):
    model, _ = cbdnet.compress(tiny_model(), cbdnet.RTNConfig(bits=4, granularity="channel"))
    good = encode_file(model)
    assert {code.label for code in parse(good).codes.values()} == {"rtn4/ch"}  # what compress printed
    header = v2_header_of(good)
    header["layers"][0]["label"] = bad
    with pytest.raises(FormatError, match="bad label"):
        parse(v2_with_header(good, header))
