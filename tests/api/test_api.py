"""The Python API: configs, ``cbdnet.compress(model, config, calibration=...)`` with any iterable of batches,
the same bytes as the CLI, and the guards around it (tied weights, edited weights, skip names, flags)."""

from __future__ import annotations

import copy
import dataclasses
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cbdnet
from cbdnet.calib.configs import ConfigError, config_from_dict
from cbdnet.calib.stats import collect_stats
from cbdnet.cli import commands, main
from cbdnet.nn import CBDModule
from cbdnet.zoo.data import digits
from cbdnet.zoo.models import build, load_weights


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "digits.pt"
    torch.save(build("digits-cnn").state_dict(), path)
    return path


def _model(checkpoint) -> nn.Module:
    return load_weights(build("digits-cnn"), checkpoint).eval()


# ---------------------------------------------------------------- configs

@pytest.mark.parametrize("make", [
    lambda: cbdnet.CBDConfig(planes=0), lambda: cbdnet.CBDConfig(bottleneck=1.5),
    lambda: cbdnet.CBDConfig(fallback="both"), lambda: cbdnet.CBDConfig(granularity="channel", fallback="size"),
    lambda: cbdnet.UniformConfig(planes=17), lambda: cbdnet.RTNConfig(bits=1),
    lambda: cbdnet.RTNConfig(granularity="row"), lambda: cbdnet.BudgetConfig(target_bits=0.5),
    lambda: cbdnet.BudgetConfig(target_bits=float("nan")),
    lambda: cbdnet.BudgetConfig(rtn_bits=(), composite_planes=(), levels=(), weighted_levels=()),
    lambda: cbdnet.BudgetConfig(levels=(0,)), lambda: cbdnet.BudgetConfig(weighted_levels=(0,)),
    lambda: cbdnet.BudgetConfig(weighted_levels=(float("inf"),)),
    lambda: cbdnet.BudgetConfig(sensitivity_exponents=(1.5,)), lambda: cbdnet.BudgetConfig(sensitivity_exponents=()),
    lambda: cbdnet.BudgetConfig(sensitivity_exponents=(True,)),
    lambda: cbdnet.CalibrationConfig(images=0), lambda: cbdnet.CalibrationConfig(bias_correction="maybe"),
])
def test_configs_refuse_bad_fields(make):
    with pytest.raises(ConfigError) as caught:
        make()
    assert isinstance(caught.value, cbdnet.CBDError) and "--" not in str(caught.value)  # arguments, not flags


def test_configs_are_frozen_and_round_trip_through_their_dict():
    for config in (cbdnet.CBDConfig(), cbdnet.CBDConfig(planes=4, granularity="channel"), cbdnet.UniformConfig(3),
                   cbdnet.RTNConfig(bits=3, granularity="tensor"), cbdnet.BudgetConfig(target_bits=3)):
        entry = json.loads(json.dumps(config.to_dict()))
        assert entry["method"] == config.method and config_from_dict(entry) == config
    assert cbdnet.RTNConfig().to_dict() == {"method": "rtn", "bits": 4, "granularity": "channel"}
    assert cbdnet.CBDConfig().to_dict()["fallback"] == "distortion"
    with pytest.raises(AttributeError):
        cbdnet.RTNConfig().bits = 8
    with pytest.raises(ConfigError):
        config_from_dict({"method": "rtn", "bits": 4, "planes": 5})


# ---------------------------------------------------------------- the CLI and the API write the same bytes

CASES = {
    "rtn": (["--method", "rtn", "--bits", "4"], lambda: cbdnet.RTNConfig(bits=4), False),
    "paper": (["--planes", "4", "--bottleneck", "0.3", "--fallback", "size"],
              lambda: cbdnet.CBDConfig(planes=4, bottleneck=0.3, fallback="size"), False),
    "budget": (["--target-bits", "4.0", "--calib", "digits:train", "--calib-images", "300"],
               lambda: cbdnet.BudgetConfig(target_bits=4.0), True),
    "default": ([], lambda: cbdnet.CBDConfig(), False),
    "uniform": (["--method", "uniform", "--planes", "3"], lambda: cbdnet.UniformConfig(planes=3), False),
    "cbd-channel": (["--granularity", "channel", "-J", "4"], lambda: cbdnet.CBDConfig(planes=4, granularity="channel"),
                    False),
    "rtn-gptq": (["--method", "rtn", "--bits", "3", "--calib", "digits:train", "--calib-images", "300"],
                 lambda: cbdnet.RTNConfig(bits=3), True),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if CASES[c][2] else c for c in CASES])
def test_cli_and_python_api_write_byte_identical_files(case, checkpoint, tmp_path):
    flags, make_config, calibrated = CASES[case]
    cli_file, api_file = tmp_path / "cli.cbd", tmp_path / "api.cbd"
    assert main(["compress", "--arch", "digits-cnn", "--weights", str(checkpoint), *flags, "-o", str(cli_file),
                 "--quiet"]) == 0
    train = digits("train")
    loader = DataLoader(TensorDataset(train.images, train.labels), batch_size=64)  # any iterable of batches
    settings = cbdnet.CalibrationConfig(images=300) if "--calib-images" in flags else None
    config = dataclasses.replace(make_config(), calibration=settings)  # one config per call
    model, report = cbdnet.compress(_model(checkpoint), config, loader if calibrated else None, progress=False)
    cbdnet.save(model, api_file)
    assert api_file.read_bytes() == cli_file.read_bytes()
    meta = cbdnet.format.read(api_file).meta
    assert meta["extra"]["config"]["method"] == make_config().method
    assert "planes" not in meta["extra"]["config"] or case != "rtn"  # an RTN run records no planes/bottleneck
    assert meta["extra"]["weights_sha256"] == cbdnet.zoo.models.file_sha256(checkpoint)



def test_cli_compress_encodes_the_file_once_and_writes_what_the_evaluated_model_encodes_to(checkpoint, tmp_path,
                                                                                            monkeypatch):
    """``cbdnet compress -o`` writes the bytes that compress measured for ``file_bytes``: one encoding of the
    model, not a second one after evaluation; and evaluation between the two changed nothing the file stores."""
    original = cbdnet.format.cbdfile.encode_file
    encoded, evaluated = [], []

    def counting(model, **kwargs):
        encoded.append(original(model, **kwargs))
        return encoded[-1]

    for name, module in list(sys.modules.items()):  # wherever a cbdnet module imported the encoder from
        if name.split(".")[0] == "cbdnet" and getattr(module, "encode_file", None) is original:
            monkeypatch.setattr(module, "encode_file", counting)
    real_evaluate = commands.evaluate
    monkeypatch.setattr(commands, "evaluate", lambda model, *a, **k: evaluated.append(model) or
                        real_evaluate(model, *a, **k))
    out, report = tmp_path / "m.cbd", tmp_path / "m.json"
    assert main(["compress", "--arch", "digits-cnn", "--weights", str(checkpoint), "--planes", "4", "--data",
                 "digits:test", "-o", str(out), "--json", str(report), "--quiet"]) == 0
    assert len(encoded) == 1 and len(evaluated) == 2  # one encoding; the model evaluated before and after
    assert out.read_bytes() == encoded[0] and json.loads(report.read_text())["file_bytes"] == len(encoded[0])
    assert original(evaluated[-1]) == encoded[0]  # the model as it stands after evaluation encodes to these bytes

@pytest.mark.slow
def test_calibration_takes_pairs_loaders_or_bare_images(checkpoint):
    train = digits("train")
    x, y = train.images[:200], train.labels[:200]
    config = cbdnet.RTNConfig(bits=3)
    results = []
    for data in ([(x[i:i + 50], y[i:i + 50]) for i in range(0, 200, 50)],
                 DataLoader(TensorDataset(x, y), batch_size=32), train):
        settled = dataclasses.replace(config, calibration=cbdnet.CalibrationConfig(images=200))
        model, report = cbdnet.compress(_model(checkpoint), settled, calibration=data, progress=False)
        results.append([m.code.levels()[0] for m in model.modules() if isinstance(m, CBDModule)])
        assert report.extra["calibration"]["images"] == 200 and report.config["calibration"]["gptq"]
    for levels in results[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(results[0], levels, strict=True))
    _, report = cbdnet.compress(_model(checkpoint), config, calibration=[x[:64], x[64:128]], progress=False)
    assert report.extra["calibration"]["pseudo_labels"] and report.extra["calibration"]["images"] == 128
    with pytest.raises(cbdnet.DataError):
        cbdnet.compress(_model(checkpoint), config, calibration=[], progress=False)
    with pytest.raises(cbdnet.DataError):
        cbdnet.compress(_model(checkpoint), config, calibration=[(x[:4], torch.zeros(3, dtype=torch.long))],
                        progress=False)


def test_depthwise_and_grouped_convs_get_calibration_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1, groups=8),
                          nn.Conv2d(8, 4, 1, groups=2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)).eval()
    images, labels = torch.randn(40, 3, 6, 6), torch.randint(0, 5, (40,))
    stats = collect_stats(model, [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))],
                          [(images, labels)])
    assert stats["1"].hessian.shape == (8, 9, 9) and stats["2"].hessian.shape == (2, 4, 4)
    with torch.no_grad():
        x = model[0](images)
    cols = torch.nn.functional.unfold(x, 3, padding=1)  # [N, 8*9, L]; channel 5's block is rows 45..53
    block = cols[:, 45:54].transpose(1, 2).reshape(-1, 9).double()
    torch.testing.assert_close(stats["1"].hessian[5], (block.T @ block / block.shape[0]).float(), rtol=1e-5, atol=1e-6)
    _, report = cbdnet.compress(model, cbdnet.RTNConfig(bits=4), calibration=[(images, labels)], progress=False)
    assert all("gptq" in layer.reason for layer in report.layers)


# ---------------------------------------------------------------- guards

class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_tied_weights_stay_tied_and_are_coded_once(tmp_path):
    torch.manual_seed(0)
    model, report = cbdnet.compress(Tied(), cbdnet.RTNConfig(bits=4), progress=False)
    assert model.a.weight is model.b.weight and report.tied == {"b": "a"}
    assert [layer.name for layer in report.layers] == ["a"] and report.params == 256
    path = tmp_path / "tied.cbd"
    size = cbdnet.save(model, path)
    untied = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    _, alone = cbdnet.compress(untied, cbdnet.RTNConfig(bits=4), progress=False)
    assert size < cbdnet.save(untied, tmp_path / "two.cbd")  # one code, not two
    loaded = cbdnet.load(path, Tied())
    assert loaded.a.weight is loaded.b.weight
    x = torch.randn(3, 16)
    torch.testing.assert_close(loaded(x), model(x))


def test_only_a_layer_with_a_code_of_its_own_may_change_it():
    """Refit, learned rounding and float16 steps change a code only where no other layer shares it."""
    from cbdnet.nn.walk import owns_its_code

    tied, _ = cbdnet.compress(Tied(), cbdnet.RTNConfig(bits=4), progress=False)
    own = owns_its_code(tied)
    assert not own(tied.a) and not own(tied.b) and not own(tied)
    untied, _ = cbdnet.compress(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)),
                                cbdnet.RTNConfig(bits=4), skip=["2"], progress=False)
    own = owns_its_code(untied)
    assert own(untied[0]) and not own(untied[1]) and not own(untied[2])  # coded; no weight; skipped (float)


def test_saving_a_weight_edited_after_compression_is_an_error(tmp_path):
    model, _ = cbdnet.compress(build("digits-cnn"), cbdnet.RTNConfig(bits=4), progress=False)
    cbdnet.save(copy.deepcopy(model), tmp_path / "ok.cbd")  # a copy is not an edit
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] += 1.0
    with pytest.raises(cbdnet.CBDError, match="changed after compression"):
        cbdnet.save(model, tmp_path / "edited.cbd")
    assert not (tmp_path / "edited.cbd").exists()


def test_torch_jit_script_runs_a_loaded_model(tmp_path):
    model, _ = cbdnet.compress(build("digits-cnn"), cbdnet.CBDConfig(planes=4), progress=False)
    cbdnet.save(model, tmp_path / "m.cbd")
    loaded = cbdnet.load(tmp_path / "m.cbd")
    scripted = torch.jit.script(loaded)
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(scripted(x), loaded(x))


def test_skip_must_name_layers():
    with pytest.raises(cbdnet.CBDError, match="not a Conv2d"):
        cbdnet.compress(build("digits-cnn"), skip=["features.99"], progress=False)
    _, report = cbdnet.compress(build("digits-cnn"), cbdnet.RTNConfig(), skip=["features.0"], progress=False)
    assert "features.0" not in [layer.name for layer in report.layers] and report.config["skip"] == ["features.0"]


def test_report_table_names_each_layers_code_and_times_the_run():
    _, report = cbdnet.compress(build("digits-cnn"), cbdnet.RTNConfig(bits=3), progress=False)
    table = report.table()
    assert "rtn3/ch" in table and any(line.startswith("layers: ") and line.endswith(" s") for line in table.split("\n"))
    assert all(layer.code == "rtn3/ch" for layer in report.layers)
