"""Kernel contexts of the levels coder (mode KERNEL of cbdnet.codec.entropy, coding ``ans-kernel`` of format 2):
exact round trips for every kernel shape, smaller than one static table where slices have structure (and on the
pretrained ResNet-20), and corrupt or forged blobs refused."""

import zlib

import numpy as np
import pytest
import torch
from cbd_mutations import kernel_file, outcome, resigned_flips, v2_header_of, v2_with_header
from cbd_mutations import structured_levels as structured
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import cbdnet
from cbdnet.codec import encode_rtn
from cbdnet.codec.entropy import (
    KERNEL,
    coded_size,
    decode_levels,
    encode_levels,
    kernel_order,
    narrowest_signed,
    uses_kernel,
)
from cbdnet.codec.planes import from_matrix
from cbdnet.codec.stream import KERNEL_MIN_SAVING, StreamError, decode_stream, encode_stream, kernel_of
from cbdnet.errors import CBDError
from cbdnet.format.cbdfile import encode_file, parse

KERNELS = [(3, 3), (1, 3), (3, 1), (2, 2), (5, 5), (7, 7), (1, 2)]


def roundtrip(levels: np.ndarray, kernel) -> bytes:
    blob = encode_levels(levels, kernel=kernel)
    assert np.array_equal(decode_levels(blob, levels.size, kernel=kernel), levels.reshape(-1))
    narrow = decode_levels(blob, levels.size, narrow=True, kernel=kernel)
    assert np.array_equal(narrow, levels.reshape(-1))
    assert narrow.dtype == narrowest_signed(levels.min(), levels.max())
    assert coded_size(levels, kernel=kernel) == len(blob)
    if uses_kernel(blob):  # a KERNEL blob names its kernel: decoding it as plain levels, or another kernel, fails
        for wrong in (None, (kernel[1], kernel[0]) if kernel[0] != kernel[1] else (1, kernel[0] * kernel[1])):
            with pytest.raises(ValueError, match="kernel"):
                decode_levels(blob, levels.size, kernel=wrong)
    return blob


def test_kernel_order_is_the_centre_then_outwards():
    assert kernel_order(3, 3) == [4, 1, 3, 5, 7, 0, 2, 6, 8]
    assert kernel_order(1, 3) == [1, 0, 2]
    for kh, kw in KERNELS:
        order = kernel_order(kh, kw)
        assert sorted(order) == list(range(kh * kw))
        distance = [(2 * (p // kw) - kh + 1) ** 2 + (2 * (p % kw) - kw + 1) ** 2 for p in order]
        assert distance == sorted(distance)


@pytest.mark.parametrize("kernel", [k for k in KERNELS if k[0] * k[1] >= 3])  # 2 positions: too few to learn
def test_structured_kernels_round_trip_and_code_smaller_than_one_table(kernel):
    levels = structured(np.random.default_rng(sum(kernel)), 24, 12, *kernel)
    blob = roundtrip(levels, kernel)
    static = encode_levels(levels)
    assert blob[1] == KERNEL
    assert len(blob) < 0.97 * len(static), (len(blob), len(static))


@pytest.mark.parametrize("low, high", [(-127, 127), (-128, 100), (-1000, 1000)])
def test_kernel_levels_at_the_narrow_types_edges_round_trip(low, high):
    """The decoder keeps the levels in the narrow output type and sums contexts in a wider one: levels at
    int8's edges (and -128, whose negation needs int16) must come back exactly, with the same contexts."""
    levels = structured(np.random.default_rng(3), 16, 8, 3, 3) * max(1, high // 6)
    levels = np.clip(levels, low, high)
    levels[0, 0, 1, 1], levels[1, 0, 1, 1] = low, high
    blob = roundtrip(levels, (3, 3))
    assert blob[1] == KERNEL


@pytest.mark.parametrize("seed", range(6))
def test_unstructured_levels_keep_the_smaller_coding(seed):
    """Independent levels give contexts nothing: the blob is never larger than the static table's."""
    rng = np.random.default_rng(seed)
    kh, kw = KERNELS[seed % len(KERNELS)]
    levels = np.rint(rng.laplace(0, rng.uniform(0.3, 30), (int(rng.integers(1, 40)), 3, kh, kw))).astype(np.int64)
    assert len(roundtrip(levels, (kh, kw))) <= len(encode_levels(levels))


@settings(max_examples=120, deadline=None)
@given(st.sampled_from(KERNELS).flatmap(lambda k: st.tuples(st.just(k), hnp.arrays(
    np.int64, st.tuples(st.integers(1, 6), st.integers(1, 5), st.just(k[0]), st.just(k[1])),
    elements=st.integers(-3, 3) | st.integers(-70000, 70000)))))
def test_hypothesis_roundtrip(case):
    kernel, levels = case
    roundtrip(levels, kernel)


def test_a_kernel_that_does_not_apply_falls_back():
    levels = np.arange(-10, 10).reshape(20, 1, 1, 1)
    for kernel in ((1, 1), (3, 3)):  # one position per slice; 20 levels are not slices of 9
        blob = roundtrip(levels, kernel)
        assert blob[1] != KERNEL


def _kernel_blob() -> tuple[bytes, int]:
    levels = structured(np.random.default_rng(7), 16, 8, 3, 3)
    blob = encode_levels(levels, kernel=(3, 3))
    assert blob[1] == KERNEL
    return blob, levels.size


def _recrc(body: bytes, count: int) -> bytes:
    return body + zlib.crc32(body, zlib.crc32(count.to_bytes(8, "little"))).to_bytes(4, "little")


def test_truncated_flipped_or_miscounted_kernel_blobs_are_refused():
    blob, count = _kernel_blob()
    rng = np.random.default_rng(0)
    for cut in range(len(blob)):
        with pytest.raises(ValueError):
            decode_levels(blob[:cut], count, kernel=(3, 3))
    for _ in range(300):
        bad = bytearray(blob)
        bad[int(rng.integers(len(bad)))] ^= 1 << int(rng.integers(8))
        with pytest.raises(ValueError):
            decode_levels(bytes(bad), count, kernel=(3, 3))
    for wrong in (count - 9, count + 9, count - 1, 0):
        with pytest.raises(ValueError):
            decode_levels(blob, wrong, kernel=(3, 3))


def test_forged_kernel_blobs_with_valid_checksums_are_refused_or_bounded():
    blob, count = _kernel_blob()
    body = blob[:-4]
    # version, mode, zz(lo), then kh and kw: a kernel of one position, kernels that do not divide the count,
    # and one beyond MAX_KERNEL
    lo_end = 3 if body[2] < 0x80 else 4
    for kh, kw in ((1, 1), (2, 2), (5, 5), (100, 100)):  # each a one-byte varint
        forged = body[:lo_end] + bytes([kh, kw]) + body[lo_end + 2:]
        with pytest.raises(ValueError):
            decode_levels(_recrc(forged, count), count, kernel=(kh, kw))
    rng = np.random.default_rng(1)
    for _ in range(200):  # any byte rewritten, checksum recomputed: an error or exactly `count` levels
        bad = bytearray(body)
        bad[int(rng.integers(len(bad)))] = int(rng.integers(256))
        try:
            out = decode_levels(_recrc(bytes(bad), count), count, kernel=(3, 3))
        except ValueError:
            continue
        assert out.shape == (count,)


def test_stream_codes_convolutions_in_weight_order():
    rng = np.random.default_rng(3)
    levels = structured(rng, 32, 16, 3, 3)
    code = encode_rtn(levels.astype(np.float64) * 0.01, 8, "channel")
    q = code.signed_magnitudes()
    stream = encode_stream(q, code.exponents, code.planes, code.shape)
    assert stream.coding == "ans-kernel" and kernel_of(code.shape) == (3, 3)
    h, w = code.matrix_shape
    back, _ = decode_stream(stream.coding, stream.parts(), [], h, w, code.exponents, code.shape)
    assert np.array_equal(back, q)
    with pytest.raises(StreamError, match="ans-kernel"):
        decode_stream(stream.coding, stream.parts(), [], h, w, code.exponents, (h, w))
    assert encode_stream(q, code.exponents, code.planes).coding == "ans"  # without the shape: one table


def test_pretrained_resnet20_kernels_code_smaller(resnet20_weights):
    """RTN 4-bit per channel on the trained ResNet-20: the 3x3 layers' levels take >= 4 % fewer bytes with
    kernel contexts than with one table each (6.4 % measured)."""
    from cbdnet.zoo.models import build, load_weights

    model = load_weights(build("cifar-resnet20"), resnet20_weights)
    static = kernel = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size == (3, 3):
            levels = encode_rtn(module.weight.detach().double().numpy(), 4, "channel").levels()[0]
            static += len(encode_levels(levels))
            kernel += len(roundtrip(levels, (3, 3)))
    assert kernel < 0.96 * static, (kernel, static)


def _structured_net() -> torch.nn.Module:
    """Two 3x3 convolutions whose kernels have the structure of trained ones (see :func:`structured`)."""
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3))
    rng = np.random.default_rng(11)
    with torch.no_grad():
        for conv in (model[0], model[2]):
            conv.weight.copy_(torch.from_numpy(0.01 * structured(rng, *conv.weight.shape)))
    return model


def test_files_store_ans_kernel_and_read_back_exactly(tmp_path):
    model, report = cbdnet.compress(_structured_net(), cbdnet.RTNConfig(bits=6), progress=False)
    codings = {layer.name: layer.coding for layer in report.layers}
    assert set(codings.values()) == {"ans-kernel"}, codings
    path = tmp_path / "k.cbd"
    size = cbdnet.save(model, path)
    assert size == path.stat().st_size
    parsed = parse(path.read_bytes())
    for name, code in parsed.codes.items():
        original = model.get_submodule(name).code
        assert np.array_equal(code.decode(), original.decode()), name
        assert code.stream().coding == "ans-kernel"


def test_an_unknown_coding_names_a_newer_version():
    model, _ = cbdnet.compress(_structured_net(), cbdnet.RTNConfig(bits=6), progress=False)
    data = encode_file(model)
    header = v2_header_of(data)
    header["layers"][0]["stream"]["coding"] = "ans-future"
    with pytest.raises(CBDError, match="newer version"):
        parse(v2_with_header(data, header))


@pytest.fixture(scope="module")
def kernel_bytes() -> bytes:
    return kernel_file()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_resigned_flips_of_a_kernel_file_are_refused_or_load(kernel_bytes, tmp_path_factory, data):
    """Bytes changed anywhere in a file with ``ans-kernel`` layers, checksum recomputed: one CBDError or a file
    that loads and verifies, never a crash."""
    case = resigned_flips(data, kernel_bytes, version=2)
    assert outcome(case, tmp_path_factory.mktemp("k")) in ("refused", "accepted")


@pytest.mark.parametrize("coding", ["ans", "gf2+ans", "none", "ans-kernel"])
def test_a_kernel_layer_relabelled_is_refused(kernel_bytes, coding, tmp_path):
    """The linear layer's blob (weight order = matrix order) relabelled ``ans-kernel``, or a kernel layer's
    relabelled: refused (a coding that needs a kernel, blobs of the wrong count or order), or exactly the same
    weights where the relabelling changes nothing."""
    header = v2_header_of(kernel_bytes)
    for layer in header["layers"]:
        kernel = layer["stream"]["coding"] == "ans-kernel"
        if (coding == "ans-kernel") != kernel:
            layer["stream"]["coding"] = coding
    assert outcome(v2_with_header(kernel_bytes, header), tmp_path) == "refused"


def test_kernel_contexts_are_kept_only_where_they_save_a_percent():
    """Independent levels (random weights): the kernel blob may be a little smaller, but not by KERNEL_MIN_SAVING,
    so the layer stays ``ans`` (one table decodes faster); structured ones clear it by far."""
    rng = np.random.default_rng(5)
    shape = (64, 64, 3, 3)
    for levels, expected in ((np.rint(rng.laplace(0, 4, shape)), "ans"), (structured(rng, *shape), "ans-kernel")):
        code = encode_rtn(levels.astype(np.float64) * 0.01, 8, "channel")
        q = code.signed_magnitudes()
        stream = encode_stream(q, code.exponents, code.planes, code.shape)
        kernel = len(encode_levels(from_matrix(q, shape), kernel=(3, 3)))
        plain = len(encode_levels(q))
        assert stream.coding == expected, (kernel, plain)
        assert (kernel <= (1 - KERNEL_MIN_SAVING) * plain) == (expected == "ans-kernel")
