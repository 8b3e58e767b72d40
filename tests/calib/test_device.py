"""``device=`` in the calibration config and ``--device`` on the command line: the CPU path is the default and
gives the same bytes when named; CUDA asked for where there is none is one clear error (exit 2) before any
work; on a machine with CUDA, the calibrated budget runs there and gives the file the CPU gives, within float
tolerance."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from small_nets import resnet8, toy_data

import cbdnet
from cbdnet.calib.batches import as_calibration_set
from cbdnet.calib.configs import BudgetConfig, CalibrationConfig, ConfigError, config_from_options, resolve_device
from cbdnet.cli import main
from cbdnet.format import encode_file

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA on this machine")


FEW = BudgetConfig(target_bits=4.0, rtn_bits=(3, 4, 5), composite_planes=(), levels=(), weighted_levels=())


def _file(device: str | None) -> bytes:
    settings = CalibrationConfig() if device is None else CalibrationConfig(device=device)
    model, _ = cbdnet.compress(resnet8(), FEW, calibration=toy_data(),
                               calibration_config=settings, progress=False)
    return encode_file(model)


def test_cpu_named_gives_the_default_bytes():
    assert _file("cpu") == _file(None)


def test_device_is_checked_and_not_recorded():
    for bad in ("gpu", "cuda:x", "", 0, None, "cuda:1234"):
        with pytest.raises(ConfigError, match="device"):
            CalibrationConfig(device=bad)
    assert "device" not in CalibrationConfig(device="auto").to_dict()  # where it ran is no property of the file
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert config_from_options({"target-bits": 3.0, "calib": "x", "device": "auto"})[1].device == "auto"
    with pytest.raises(cbdnet.CBDError, match="--device does not apply"):
        config_from_options({"target-bits": 3.0, "device": "cpu"}, prefix="--")


@no_cuda
def test_cuda_without_cuda_is_refused():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        resolve_device("cuda")
    model = resnet8()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match="CUDA is not available"):
        cbdnet.compress(model, FEW, calibration=toy_data(), calibration_config=CalibrationConfig(device="cuda:0"),
                        progress=False)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())  # refused untouched


@no_cuda
def test_cli_device_cuda_without_cuda_exits_2(tmp_path, capsys):
    out = tmp_path / "m.cbd"
    code = main(["compress", "--arch", "digits-cnn", "--target-bits", "4", "--calib", "digits", "--device", "cuda",
                 "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    assert len(err) == 1 and "--device" in err[0] and "CUDA is not available" in err[0]
    assert main(["compress", "--arch", "digits-cnn", "--device", "cpu", "-o", str(out)]) == 2  # needs --calib
    assert "--device does not apply" in capsys.readouterr().err


def test_calibration_set_moves_batches_to_its_device():
    data = as_calibration_set(toy_data(8))
    assert data.device is None and all(x.device.type == "cpu" for x, _ in data.batches(4))
    moved = type(data)(data.images, data.labels, device=torch.device("meta"))
    images, labels = next(moved.batches(4))
    assert images.is_meta and labels.is_meta and data.images.device.type == "cpu"  # held on the host


@needs_cuda
def test_cuda_gives_the_cpu_file_within_tolerance():
    model, _ = cbdnet.compress(resnet8(), FEW, calibration=toy_data(),
                               calibration_config=CalibrationConfig(device="cuda"), progress=False)
    reference, _ = cbdnet.compress(resnet8(), FEW, calibration=toy_data(), progress=False)
    assert next(model.parameters()).device.type == "cpu"  # back where it was
    size, expected = len(encode_file(model)), len(encode_file(reference))
    assert abs(size - expected) <= 0.02 * expected
    x = toy_data(16).images
    with torch.no_grad():
        out, ref = model(x), reference(x)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=0.1 * float(ref.abs().max()))
