"""save/load: bit-identical weights, identical logits, bits == bytes, verify."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import cbdnet
from cbdnet.codec.floats import as_float16, constant_value
from cbdnet.format import cbdfile as io
from cbdnet.nn import CBDModule
from cbdnet.zoo.models import build


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    torch.manual_seed(0)
    model = build("cifar-resnet20").eval()
    original = copy.deepcopy(model)
    model, report = cbdnet.compress(model, cbdnet.CBDConfig(planes=5, bottleneck=0.3), progress=False)
    path = tmp_path_factory.mktemp("cbd") / "r20.cbd"
    report.file_bytes = cbdnet.save(model, path)
    return original, model, report, path


def test_reload_gives_bit_identical_weights_and_logits(compressed):
    _, model, _, path = compressed
    reloaded = cbdnet.load(path)
    for (name, a), (_, b) in zip(model.state_dict().items(), reloaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))


def test_reload_equals_float_model_with_reconstructed_weights(compressed):
    original, model, _, path = compressed
    reference = copy.deepcopy(original)
    for name, module in model.named_modules():
        if isinstance(module, CBDModule):
            reference.get_submodule(name).weight.data = torch.from_numpy(module.code.decode())
    coded = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, CBDModule)}
    with torch.no_grad():  # the file stores BatchNorm as float16 where float16 holds it to its full precision
        for key, value in reference.state_dict().items():
            half = None if key in coded else as_float16(value.numpy(), "float32")
            if half is not None:
                value.copy_(torch.from_numpy(half.astype(np.float32)))
    reloaded = cbdnet.load(path)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(reference(x), reloaded(x))


def test_file_size_keeps_the_bit_count_promise(compressed):
    _, model, report, path = compressed
    size = path.stat().st_size
    assert report.file_bytes == size
    assert report.file_bits_per_weight == 8 * size / report.params
    parsed = io.read(path)
    assert sum(code.coded_bits() for code in parsed.codes.values()) == report.coded_weight_bits
    assert sum(m.code.bits() for m in model.modules() if isinstance(m, CBDModule)) == report.weight_bits
    assert report.coded_weight_bits < report.weight_bits  # the skewed composite levels entropy-code well
    # the file is the coded layers, the float tensors as stored, and at most 2 KB + 8 B per entry of header
    assert report.float_bits == sum(0 if constant_value(a) is not None else 16 * a.size
                                    if as_float16(a, str(a.dtype)) is not None else 8 * a.nbytes
                                    for a in parsed.floats.values())
    overhead = size - report.coded_weight_bits // 8 - report.float_bits // 8
    assert 0 < overhead <= 2048 + 8 * (len(parsed.codes) + len(parsed.floats)) + 24 + 4 + 32


def test_verify_passes_and_info_matches(compressed):
    _, _, report, path = compressed
    assert cbdnet.verify(path) == []
    parsed = io.read(path)
    assert [layer.name for layer in report.layers] == list(parsed.codes)


def test_verify_catches_a_tampered_factor_even_with_a_valid_checksum(compressed, tmp_path):
    _, model, _, _ = compressed
    tampered = copy.deepcopy(model)
    victim = next(m for m in tampered.modules() if isinstance(m, CBDModule)
                  and any(p.storage == "factored" for p in m.code.planes))
    plane = next(p for p in victim.code.planes if p.storage == "factored")
    plane.tensors["C"] = plane.tensors["C"].copy()
    plane.tensors["C"][0] ^= 1  # a wrong factor, re-signed by a fresh container checksum
    victim.set_code(victim.code)  # the weight follows the tampered code, so save() accepts it
    path = tmp_path / "tampered.cbd"
    io.atomic_write(path, io.encode_file(tampered, version=1))  # format 1 keeps a SHA-256 per plane
    problems = cbdnet.verify(path)
    assert problems and "does not match its digest" in problems[0]


def test_load_into_a_user_supplied_skeleton(compressed, tmp_path):
    _, model, _, _ = compressed
    path = tmp_path / "anon.cbd"
    cbdnet.save(model, path, arch=None)
    skeleton = build("cifar-resnet20")
    reloaded = cbdnet.load(path, skeleton)
    assert reloaded is skeleton
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), reloaded(x))


def test_plain_sequential_round_trip(tmp_path):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, groups=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, groups=8),
                              torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5)).eval()
    net, report = cbdnet.compress(net, cbdnet.CBDConfig(planes=4, bottleneck=0.5), progress=False)
    assert len(report.layers) == 3
    cbdnet.save(net, tmp_path / "seq.cbd")
    skeleton = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, groups=8),
                                   torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5))
    reloaded = cbdnet.load(tmp_path / "seq.cbd", skeleton)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(net(x), reloaded(x))
    assert np.isfinite(report.bits_per_weight)
