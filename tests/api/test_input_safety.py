"""Awkward and bad inputs: edge-case layers stored exactly, half-precision models, NaN/Inf weights, checkpoints
that do not fit, unknown architectures and data specs, whole-model pickles."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from cbd_mutations import evil_pickle, tiny_model
from torch import nn

import cbdnet
from cbdnet.codec import encode_weight
from cbdnet.errors import CBDError, DataError, WeightError
from cbdnet.zoo.data import load_spec
from cbdnet.zoo.models import build, known_archs, load_weights

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("weight", [
    np.zeros((4, 3, 3, 3), np.float32),
    np.full((8, 4, 3, 3), 0.37, np.float32),
    np.full((16, 16), -2.5, np.float32),
    np.array([[0.3]], np.float32),
    np.array([[-1e-38]], np.float32),  # a subnormal-adjacent magnitude
    np.where(RNG.random((32, 32)) > 0.5, 0.7, -0.7).astype(np.float32),  # +-c: constant magnitude
    np.where(RNG.random((16, 8, 1, 1)) > 0.9, 3.0, 0.0).astype(np.float32),  # sparse, one level
], ids=["zero", "constant-conv", "constant-negative", "1x1-linear", "tiny-value", "plus-minus-c", "sparse-1x1"])
@pytest.mark.parametrize("planes", [1, 2, 5])
def test_zero_and_constant_layers_are_stored_exactly(weight, planes):
    code = encode_weight(weight, planes=planes, bottleneck=0.3, name="layer")
    decoded = code.decode()
    assert decoded.dtype == np.float32 and decoded.shape == weight.shape
    assert np.array_equal(decoded, weight)
    assert code.bits() <= (1 + planes) * weight.size + 8 * (planes + 1) + 96  # never worse than plain bits


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_refused_naming_the_layer(bad):
    weight = np.ones((4, 4), np.float32)
    weight[1, 2] = bad
    with pytest.raises(WeightError, match="features.3.*NaN/Inf"):
        encode_weight(weight, name="features.3")
    model = tiny_model()
    with torch.no_grad():
        model.classifier[1].weight[0, 0] = bad
    with pytest.raises(WeightError, match="classifier.1"):
        cbdnet.compress(model, progress=False)


class Awkward(nn.Module):
    """1x1, depthwise, one-output-channel, 1x1 Linear, an all-zero and a constant layer."""

    def __init__(self) -> None:
        super().__init__()
        self.pointwise = nn.Conv2d(3, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.single = nn.Conv2d(8, 1, 3, padding=1)
        self.zero = nn.Conv2d(1, 2, 1)
        self.constant = nn.Linear(2 * 25, 4)
        self.tiny = nn.Linear(4, 1)
        self.scalar = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.zero.weight.zero_()
            self.constant.weight.fill_(-0.125)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.single(torch.relu(self.depthwise(self.pointwise(x))))
        out = self.constant(self.zero(out).flatten(1))
        return self.scalar(self.tiny(out))


@pytest.mark.parametrize("planes", [1, 4])
def test_awkward_layers_round_trip_through_a_file(tmp_path, planes):
    torch.manual_seed(0)
    original = Awkward().eval()
    compressed, report = cbdnet.compress(copy.deepcopy(original), cbdnet.CBDConfig(planes=planes, bottleneck=0.5),
                                         progress=False)
    assert {layer.name for layer in report.layers} == {"pointwise", "depthwise", "single", "zero", "constant",
                                                       "tiny", "scalar"}
    modes = {layer.name: layer.mode for layer in report.layers}
    assert modes["zero"] == "zero"
    path = tmp_path / "awkward.cbd"
    size = cbdnet.save(compressed, path)
    assert size == path.stat().st_size and cbdnet.verify(path) == []
    reloaded = cbdnet.load(path, Awkward())
    assert torch.equal(reloaded.zero.weight, original.zero.weight)
    assert torch.equal(reloaded.constant.weight, original.constant.weight)
    assert torch.equal(reloaded.scalar.weight, original.scalar.weight)  # a single value: exact
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        assert torch.equal(reloaded(x), compressed(x))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models_compress_and_restore_their_dtype(tmp_path, dtype):
    reference = tiny_model().to(dtype)
    compressed, report = cbdnet.compress(copy.deepcopy(reference), cbdnet.CBDConfig(planes=4), progress=False)
    assert all(p.dtype == dtype for p in compressed.parameters())
    # the code was built from a float32 copy of the half weights: the same code as for the float32 model
    code32 = encode_weight(reference.features[0].weight.detach().float().numpy(), planes=4, name="features.0")
    assert np.array_equal(code32.decode(), compressed.features[0].code.decode())
    path = tmp_path / f"{dtype}.cbd"
    cbdnet.save(compressed, path)
    loaded = cbdnet.load(path)
    assert all(t.dtype == dtype for t in loaded.state_dict().values() if t.is_floating_point())
    for key, value in compressed.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = torch.randn(3, 1, 8, 8).to(dtype)
    with torch.no_grad():
        assert torch.equal(loaded(x), compressed(x))
        # and that is the half model itself with the reconstructed weights put in
        with_decoded = copy.deepcopy(reference)
        for layer in report.layers:
            with_decoded.get_submodule(layer.name).weight.copy_(compressed.get_submodule(layer.name).weight)
        assert torch.equal(with_decoded(x), loaded(x))


def test_checkpoint_that_does_not_fit_lists_missing_and_unexpected_keys(tmp_path):
    state = tiny_model().state_dict()
    state["extra.weight"] = torch.ones(3)
    del state["features.0.weight"]
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)
    with pytest.raises(WeightError) as caught:
        load_weights(tiny_model(), path)
    message = str(caught.value)
    assert "missing 1: features.0.weight" in message and "unexpected 1: extra.weight" in message
    state = build("digits-cnn").state_dict()  # width 32 into width 4: the shapes are wrong
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}}, path)
    with pytest.raises(WeightError, match="wrong shape"):
        load_weights(tiny_model(), path)


def test_unknown_architecture_lists_the_known_ones():
    with pytest.raises(CBDError) as caught:
        build("resnet-9000")
    assert all(arch in str(caught.value) for arch in known_archs())


def test_whole_model_pickle_and_code_running_pickle_are_refused(tmp_path):
    whole = tmp_path / "whole.pt"
    torch.save(tiny_model(), whole)
    with pytest.raises(WeightError, match=r"DigitsCNN.*whole model.*arbitrary code.*state_dict\(\)"):
        load_weights(tiny_model(), whole)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(evil_pickle(marker))
    with pytest.raises(WeightError, match="arbitrary code"):
        load_weights(tiny_model(), evil)
    torch.save({"x": torch.ones(1), "y": _marker_object(marker)}, evil)
    with pytest.raises(WeightError, match="arbitrary code"):
        load_weights(tiny_model(), evil)
    assert not marker.exists()
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(WeightError, match="not a PyTorch checkpoint"):
        load_weights(tiny_model(), text)


def _marker_object(marker):
    from cbd_mutations import Marker

    return Marker(str(marker))


def test_data_specs_say_what_was_expected(tmp_path):
    with pytest.raises(DataError, match=r"not found.*expected .*images.*uint8 \[N,32,32,3\]"):
        load_spec(f"cifar10-npz:{tmp_path / 'absent.npz'}")
    wrong_keys = tmp_path / "keys.npz"
    np.savez(wrong_keys, x=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(DataError, match=r"missing array.*'images'.*labels"):
        load_spec(f"cifar10-npz:{wrong_keys}")
    wrong_layout = tmp_path / "layout.npz"
    np.savez(wrong_layout, images=np.zeros((2, 3, 32, 32), np.float32), labels=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"expected uint8 \[N,32,32,3\]"):
        load_spec(f"cifar10-npz:{wrong_layout}")
    not_npz = tmp_path / "text.npz"
    not_npz.write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz.*expected"):
        load_spec(f"cifar10-npz:{not_npz}")
    with pytest.raises(DataError, match="cifar10-npz:PATH"):
        load_spec("imagenet:/data")


@pytest.mark.parametrize("zipped", [True, False])
def test_plain_state_dicts_pass_the_format_check_in_both_torch_formats(tmp_path, zipped):
    state = tiny_model(seed=3).state_dict()
    path = tmp_path / "plain.pt"
    torch.save(state, path, _use_new_zipfile_serialization=zipped)
    loaded = load_weights(tiny_model(seed=4), path).state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in state.items())


def test_shared_resnet20_checkpoint_still_loads(resnet20_weights):
    raw = torch.load(resnet20_weights, map_location="cpu", weights_only=True)
    raw = raw.get("state_dict", raw)
    model = load_weights(build("cifar-resnet20"), resnet20_weights)
    key = next(k for k in raw if k.endswith("conv1.weight"))
    assert torch.equal(model.state_dict()[key.removeprefix("module.")], raw[key])
