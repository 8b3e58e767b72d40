"""The ``.cbd`` reader against hostile files: truncations, flips, garbage, pickles, re-signed corruptions.

Every case must end in a :class:`cbdnet.FormatError` / :class:`cbdnet.CBDError` (or, for a re-signed change
that keeps the file well-formed, a model that loads): never another exception, never executed code.
"""

from __future__ import annotations

import copy
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from cbd_mutations import (
    evil_pickle,
    header_of,
    json_paths,
    meta_of,
    outcome,
    payload_of,
    rebuild,
    region_boundaries,
    replace_at,
    resigned_flips,
    sign,
    tensors_of,
    tiny_file,
    tiny_model,
    with_header,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cbdnet
from cbdnet.cli import commands as cli
from cbdnet.errors import CBDError, FormatError
from cbdnet.format.cbdfile import MAX_HEADER_BYTES, MAX_TENSORS, parse

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def good() -> bytes:
    return tiny_file()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def refused(data: bytes, folder, match: str | None = None) -> FormatError:
    path = folder / "bad.cbd"
    path.write_bytes(data)
    with pytest.raises(CBDError, match=match) as caught:
        cbdnet.load(path)
    return caught.value


def test_fixture_file_is_valid_and_exercises_every_storage(good, folder):
    parsed = parse(good)
    storages = {plane.storage for code in parsed.codes.values() for plane in code.planes}
    modes = {code.mode for code in parsed.codes.values()}
    assert storages == {"factored", "packed"} and "cbd" in modes
    assert outcome(good, folder) == "accepted"


# ---------------------------------------------------------------- as stored on disk (checksum in force)

def test_truncation_at_every_region_boundary_is_refused(good, folder):
    cuts = region_boundaries(good)
    assert len(cuts) > 20  # magic, version, flags, length, header, every tensor, digest
    for cut in cuts[:-1]:
        for end in {max(cut - 1, 0), cut, cut + 1}:
            with pytest.raises(FormatError):
                parse(good[:end])
    refused(good[: cuts[-2]], folder, match="truncated|too short")


def test_padding_and_appended_bytes_are_refused(good):
    with pytest.raises(FormatError, match="payload length"):
        parse(good + b"\0")


@FUZZ
@given(data=st.data())
def test_any_byte_flip_is_caught(good, data):
    position = data.draw(st.integers(0, len(good) - 1))
    mask = data.draw(st.integers(1, 255))
    corrupt = bytearray(good)
    corrupt[position] ^= mask
    with pytest.raises(FormatError):
        parse(bytes(corrupt))


@FUZZ
@given(blob=st.binary(max_size=4096))
def test_random_garbage_is_refused(blob):
    with pytest.raises(FormatError):
        parse(blob)


@FUZZ
@given(blob=st.binary(max_size=2048))
def test_garbage_payload_in_a_valid_container_is_refused(blob):
    with pytest.raises(FormatError):
        parse(sign(blob))


def test_future_version_is_refused_naming_it(good, folder):
    future = sign(payload_of(good), version=7)
    error = refused(future, folder)
    assert "version 7" in str(error) and "upgrade" in str(error)
    assert isinstance(error, FormatError)
    with pytest.raises(FormatError, match="version 0"):
        parse(sign(payload_of(good), version=0))


def test_bad_magic_says_not_a_cbd_file(good, folder):
    refused(b"GIF89a" + good[6:], folder, match="not a .cbd file")


def test_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    blob = evil_pickle(marker)
    pickle.loads(blob)  # the payload really would run code if unpickled ...
    assert marker.exists()
    marker.unlink()
    for data in (blob, sign(blob), sign(struct.pack("<Q", len(blob)) + blob)):
        path = tmp_path / "evil.cbd"
        path.write_bytes(data)
        with pytest.raises(FormatError):
            cbdnet.load(path)
        assert cli.main(["info", "--verify", str(path)]) == 2
    assert not marker.exists()  # ... but loading it as a .cbd never did


def test_torch_save_file_renamed_cbd_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    for obj in (tiny_model().state_dict(), tiny_model(), {"x": torch.ones(2), "evil": evil_pickle(marker)}):
        path = tmp_path / "model.cbd"
        torch.save(obj, path)
        with pytest.raises(FormatError, match="not a .cbd file"):
            cbdnet.load(path)
    assert not marker.exists()


def test_load_path_uses_no_pickle(good, tmp_path, monkeypatch):
    path = tmp_path / "ok.cbd"
    path.write_bytes(good)

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle used on the load path")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(np, "load", forbidden)
    model = cbdnet.load(path)
    assert cbdnet.verify(path) == []
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


@pytest.mark.parametrize("argv_tail", [[], ["--verify"], ["--verify", "--json"]])
def test_cli_info_on_corrupt_file_is_one_line_exit_2(good, tmp_path, capsys, argv_tail):
    path = tmp_path / "bad.cbd"
    path.write_bytes(good[:-5] + b"xxxxx")
    assert cli.main(["info", str(path), *argv_tail]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cbdnet: error:") and "checksum" in err


# ---------------------------------------------------------------- behind the checksum (re-signed files)

def test_resigning_the_unchanged_payload_gives_the_same_file(good):
    assert sign(payload_of(good)) == good


@FUZZ
@given(data=st.data())
def test_resigned_byte_flips_are_refused_or_load(good, folder, data):
    assert outcome(resigned_flips(data, good), folder) in ("refused", "accepted")


@FUZZ
@given(data=st.data())
def test_resigned_truncated_or_spliced_payloads_are_refused_or_load(good, folder, data):
    payload = payload_of(good)
    cut = data.draw(st.integers(0, len(payload)))
    filler = data.draw(st.binary(max_size=64))
    assert outcome(sign(payload[:cut] + filler), folder) in ("refused", "accepted")


JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                        st.text(max_size=12))
JSON_VALUE = st.recursive(JSON_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                               st.dictionaries(st.text(max_size=8), inner,
                                                                               max_size=4)), max_leaves=12)



@FUZZ
@given(data=st.data())
def test_resigned_metadata_mutations_are_refused_or_load(good, folder, data):
    meta, tensors = meta_of(good), tensors_of(good)
    paths = list(json_paths(meta))
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        meta = replace_at(copy.deepcopy(meta), path, data.draw(JSON_VALUE))
        paths = list(json_paths(meta))
    assert outcome(rebuild(tensors, meta), folder) in ("refused", "accepted")


@FUZZ
@given(data=st.data())
def test_resigned_tensor_header_mutations_are_refused_or_load(good, folder, data):
    header = header_of(good)
    names = [name for name in header if name != "__metadata__"]
    name = data.draw(st.sampled_from(names))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None]))
    entry = dict(header[name])
    if field is None:
        del header[name]
    else:
        entry[field] = data.draw(st.one_of(JSON_VALUE, st.sampled_from(["F32", "U8", "I64", "BF16", "F64"]),
                                           st.lists(st.integers(-5, 2**64), max_size=3)))
        header[name] = entry
    assert outcome(with_header(good, header), folder) in ("refused", "accepted")


def test_huge_tensor_shape_is_refused_before_allocating(good):
    header = header_of(good)
    name = next(n for n in header if n.endswith("/sign"))
    for shape in ([2**40, 2**40], [2**62], [1] * 64, [-1]):
        header[name] = dict(header[name], shape=shape)
        with pytest.raises(FormatError, match="shape|offsets"):
            parse(with_header(good, header))


def test_overlapping_tensor_data_is_refused(good):
    header = header_of(good)
    names = sorted((n for n in header if n != "__metadata__"), key=lambda n: header[n]["data_offsets"])
    first, second = header[names[0]], header[names[1]]
    header[names[1]] = dict(second, data_offsets=[0, second["data_offsets"][1] - second["data_offsets"][0]])
    assert first["data_offsets"][0] == 0
    with pytest.raises(FormatError, match="overlaps|gaps|fill"):
        parse(with_header(good, header))


def test_header_length_and_tensor_count_limits(good):
    payload = payload_of(good)
    huge = struct.pack("<Q", MAX_HEADER_BYTES + 1) + payload[8:]
    with pytest.raises(FormatError, match="header length"):
        parse(sign(huge))
    with pytest.raises(FormatError, match="header length"):
        parse(sign(struct.pack("<Q", 2**63) + payload[8:]))
    many = b'{"data_offsets": 0}' * (MAX_TENSORS + 1)  # refused by counting, before the JSON is parsed
    with pytest.raises(FormatError, match="more than"):
        parse(sign(struct.pack("<Q", len(many)) + many))


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "1" * 5000, '{"a": 1, "a": 2}', "\udcff"])
def test_pathological_json_is_refused(good, text):
    meta_text = text if text.startswith(("[", "{")) else json.dumps({"format": "cbdnet", "x": text})
    if text.isdigit():
        meta_text = '{"format": "cbdnet", "layers": ' + text + "}"
    with pytest.raises(FormatError):
        parse(rebuild(tensors_of(good), meta_text))
    raw = text.encode("utf-8", "surrogatepass")
    with pytest.raises(FormatError):
        parse(with_header(good, raw))


def _edited(good, edit) -> bytes:
    meta = meta_of(good)
    edit(meta)
    return rebuild(tensors_of(good), meta)


def test_metadata_that_would_build_a_huge_model_is_refused_cheaply(good, folder):
    def widen(meta):
        meta["arch_kwargs"] = {"width": 100_000}  # ~10^11 weights if it were built for real

    refused(_edited(good, widen), folder, match=r"arch_kwargs width = 100000: it takes int width in \[1, 1024\]")


def test_bad_arch_kwargs_and_unknown_arch(good, folder):
    def bad_kwarg(meta):
        meta["arch_kwargs"] = {"no_such_argument": 3}

    def unknown(meta):
        meta["arch"] = "resnet9000"

    refused(_edited(good, bad_kwarg), folder, match="arch_kwargs")
    error = refused(_edited(good, unknown), folder, match="unknown architecture")
    assert "digits-cnn" in str(error) and "cifar-resnet20" in str(error)


def test_float_tensor_dtype_and_shape_are_checked_against_metadata(good):
    def wrong_shape(meta):
        meta["floats"][0]["shape"] = [7, 7]

    def wrong_dtype(meta):
        meta["floats"][0]["dtype"] = "float16"

    with pytest.raises(FormatError, match="metadata says"):
        parse(_edited(good, wrong_shape))
    with pytest.raises(FormatError, match="metadata says"):
        parse(_edited(good, wrong_dtype))


def test_plane_exponent_and_rank_bounds(good):
    def huge_exponent(meta):
        layer = next(layer for layer in meta["layers"] if layer["mode"] == "cbd")
        layer["exponents"] = [5000 - i for i in range(layer["planes"])]
        for plane, exponent in zip(layer["plane_codes"], layer["exponents"], strict=True):
            plane["exponent"] = exponent

    def huge_rank(meta):
        layer = next(layer for layer in meta["layers"] if layer["mode"] == "cbd")
        plane = next(p for p in layer["plane_codes"] if p["storage"] == "factored")
        plane["rank"] = 10**6

    with pytest.raises(FormatError, match="exponent"):
        parse(_edited(good, huge_exponent))
    with pytest.raises(FormatError, match="rank"):
        parse(_edited(good, huge_rank))


def test_non_finite_decoded_weights_are_refused(good, folder):
    meta, tensors = meta_of(good), tensors_of(good)
    layer = next(layer for layer in meta["layers"] if layer["mode"] == "cbd")
    key = f"cbd/{layer['name']}/scales"
    tensors[key] = np.array([3e38, tensors[key][1], 3e38], dtype=np.float32)  # wmax * step * 2^e overflows
    bad = rebuild(tensors, meta)
    refused(bad, folder, match="non-finite")
    path = folder / "inf.cbd"
    path.write_bytes(bad)
    assert any("non-finite" in problem for problem in cbdnet.verify(path))
    skeleton = tiny_model()
    before = {key: value.clone() for key, value in skeleton.state_dict().items()}
    with pytest.raises(FormatError, match="non-finite"):
        cbdnet.load(path, skeleton)
    assert not any(isinstance(m, cbdnet.nn.CBDModule) for m in skeleton.modules())  # the caller's model untouched
    assert all(torch.equal(value, before[key]) for key, value in skeleton.state_dict().items())


def test_zero_layers_cannot_ask_for_unbounded_memory(good):
    def giant_zero(meta):
        layer = meta["layers"][0]
        layer.update(mode="zero", shape=[2**15, 2**15, 1, 1], exponents=[], plane_codes=[])

    tensors = tensors_of(good)
    name = meta_of(good)["layers"][0]["name"]
    for key in [k for k in tensors if k.startswith(f"cbd/{name}/") and not k.endswith("scales")]:
        del tensors[key]
    tensors[f"cbd/{name}/scales"] = np.zeros(3, np.float32)  # as a writer stores an all-zero layer
    meta = meta_of(good)
    giant_zero(meta)
    with pytest.raises(FormatError, match="too large"):
        parse(rebuild(tensors, meta))


@FUZZ
@given(data=st.data())
def test_cli_info_verify_on_resigned_mutations_never_crashes(good, folder, capsys, data):
    if data.draw(st.booleans()):
        payload = bytearray(payload_of(good))
        for _ in range(data.draw(st.integers(1, 4))):
            payload[data.draw(st.integers(0, len(payload) - 1))] ^= data.draw(st.integers(1, 255))
        corrupt = sign(bytes(payload))
    else:
        meta = meta_of(good)
        path = data.draw(st.sampled_from(list(json_paths(meta))))
        corrupt = rebuild(tensors_of(good), replace_at(copy.deepcopy(meta), path, data.draw(JSON_VALUE)))
    target = folder / "cli.cbd"
    target.write_bytes(corrupt)
    code = cli.main(["info", "--verify", "--json", str(target)])
    err = capsys.readouterr().err
    assert "internal error" not in err and "Traceback" not in err
    if code == 2:
        assert err.count("\n") == 1 and err.startswith("cbdnet: error:")
    elif code == 1:  # parsed, but a plane does not match its digest (or decodes to Inf): each problem listed
        assert err and all(line.startswith("cbdnet: verify:") for line in err.splitlines())
    else:
        assert code == 0 and err == ""


def test_files_without_float_shapes_still_load_and_are_checked_against_the_model(good, folder):
    meta, tensors = meta_of(good), tensors_of(good)
    for entry in meta["floats"]:
        del entry["shape"]  # as written before the shape was recorded
    assert outcome(rebuild(tensors, meta), folder) == "accepted"
    key = next(entry["key"] for entry in meta["floats"] if entry["key"].endswith("bias"))
    tensors["float/" + key] = np.zeros(tensors["float/" + key].size + 1, tensors["float/" + key].dtype)
    refused(rebuild(tensors, meta), folder, match=f"wrong shape for .*{key}")
