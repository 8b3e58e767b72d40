"""The public surface of :mod:`cbdnet.api`: one config per call (calibration settings inside the config,
calibration data as the third argument), the deprecated ``calibration_config=``, ``filter_fn``, the typed
report, ``model.cbdnet`` and loading without a skeleton from an architecture recorded at compress/save time."""

from __future__ import annotations

import json
import sys
import textwrap
import warnings

import pytest
import torch
import torchvision
from torch.utils.data import DataLoader, TensorDataset

import cbdnet
import cbdnet.api
from cbdnet.calib.configs import ConfigError, config_from_dict
from cbdnet.format.cbdfile import encode_file
from cbdnet.nn.state import ModelState
from cbdnet.zoo.data import digits
from cbdnet.zoo.models import DigitsCNN, build


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build("digits-cnn").eval()


@pytest.fixture(scope="module")
def loader():
    train = digits("train")
    return DataLoader(TensorDataset(train.images[:256], train.labels[:256]), batch_size=64)


def _without_seconds(report: cbdnet.Report) -> str:
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not k.startswith("seconds")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value
    return json.dumps(strip(report.to_dict()), sort_keys=True)


def test_the_package_exports_the_api_modules_functions():
    for name in ("compress", "save", "load", "verify"):
        assert getattr(cbdnet, name) is getattr(cbdnet.api, name)
        assert getattr(cbdnet, name).__module__ == "cbdnet.api"


# ---------------------------------------------------------------- one config per call

def test_settings_in_the_config_give_what_calibration_config_gave_with_a_deprecation_warning(loader):
    settings = cbdnet.CalibrationConfig(images=128, bias_correction=True)
    new_model, new = cbdnet.compress(_model(), cbdnet.RTNConfig(bits=3, calibration=settings), loader,
                                     progress=False)
    with pytest.warns(DeprecationWarning, match="calibration_config"):
        old_model, old = cbdnet.compress(_model(), cbdnet.RTNConfig(bits=3), calibration=loader,
                                         calibration_config=settings, progress=False)
    assert new.extra["calibration"]["images"] == 128 and new.extra["calibration"]["bias_corrected_layers"] > 0
    assert _without_seconds(new) == _without_seconds(old)  # the JSON report: the same fields and values
    assert encode_file(new_model) == encode_file(old_model)  # and the same file
    assert new.config["calibration"]["bias_correction"] is True


def test_the_new_call_shape_warns_nothing(loader):
    config = cbdnet.BudgetConfig(target_bits=4.0, rtn_bits=(3, 4), composite_planes=(), levels=(6,), weighted_levels=(),
                                 calibration=cbdnet.CalibrationConfig(images=64, refit=False))
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        _, report = cbdnet.compress(_model(), config, loader, progress=False)
    assert report.extra["calibration"]["images"] == 64 and "refit" not in report.extra["calibration"]


def test_settings_given_twice_are_refused(loader):
    config = cbdnet.RTNConfig(calibration=cbdnet.CalibrationConfig(images=64))
    with pytest.warns(DeprecationWarning), pytest.raises(cbdnet.CBDError, match="given twice"):
        cbdnet.compress(_model(), config, loader, calibration_config=cbdnet.CalibrationConfig(), progress=False)


def test_calibration_settings_without_data_change_nothing_the_file_records():
    plain, _ = cbdnet.compress(_model(), cbdnet.RTNConfig(bits=4), progress=False)
    settled, report = cbdnet.compress(_model(), cbdnet.RTNConfig(bits=4, calibration=cbdnet.CalibrationConfig(
        images=10)), progress=False)
    assert encode_file(plain) == encode_file(settled) and "calibration" not in report.config


@pytest.mark.parametrize("config", [
    cbdnet.CBDConfig(calibration=cbdnet.CalibrationConfig(bias_correction=False)),
    cbdnet.UniformConfig(planes=3, calibration=cbdnet.CalibrationConfig(bn_reestimate=True)),
    cbdnet.RTNConfig(bits=3, calibration=cbdnet.CalibrationConfig(images=7, gptq=False)),
    cbdnet.BudgetConfig(target_bits=3, levels=(4,), calibration=cbdnet.CalibrationConfig(adaround=5)),
    cbdnet.BudgetConfig(target_bits=3),
])
def test_configs_with_calibration_round_trip_through_their_dict(config):
    entry = config.to_dict()
    assert json.loads(json.dumps(entry)) == entry
    assert config_from_dict(entry) == config
    assert ("calibration" in entry) == (config.calibration is not None)  # absent: serialised as before


def test_configs_refuse_a_calibration_that_is_not_a_calibration_config():
    for make in (lambda: cbdnet.RTNConfig(calibration={"images": 3}), lambda: cbdnet.CBDConfig(calibration=True),
                 lambda: config_from_dict({"method": "rtn", "calibration": {"pictures": 3}}),
                 lambda: config_from_dict({"method": "rtn", "calibration": [1]})):
        with pytest.raises(ConfigError, match="calibration|CalibrationConfig"):
            make()


def test_the_budget_config_has_a_name_and_keeps_its_recorded_method():
    config = cbdnet.BudgetConfig(target_bits=3.5)
    assert config.name == "budget" and config.to_dict()["method"] == "target-bits"  # files record this
    assert config_from_dict({**config.to_dict(), "method": "budget"}) == config


# ---------------------------------------------------------------- filter_fn

def test_filter_fn_keeps_the_layers_it_turns_down_in_float():
    seen = []

    def convs_only(module, fqn):
        seen.append((type(module).__name__, fqn))
        return isinstance(module, torch.nn.Conv2d)

    model, report = cbdnet.compress(_model(), cbdnet.RTNConfig(), filter_fn=convs_only, skip=["features.3"],
                                    progress=False)
    assert sorted(seen) == [("Conv2d", "features.0"), ("Conv2d", "features.7"), ("Linear", "classifier.1"),
                            ("Linear", "classifier.3")]  # every compressible layer not in skip, once
    assert [layer.name for layer in report.layers] == ["features.0", "features.7"]
    assert report.config["skip"] == ["classifier.1", "classifier.3", "features.3"]
    assert type(model.classifier[1]) is torch.nn.Linear and type(model.features[3]) is torch.nn.Conv2d
    with pytest.raises(cbdnet.CBDError, match="filter_fn"):
        cbdnet.compress(_model(), filter_fn="convs", progress=False)
    with pytest.raises(cbdnet.CBDError, match="list of layer names"):
        cbdnet.compress(_model(), skip="features.0", progress=False)


# ---------------------------------------------------------------- the typed report

def test_typed_report_fields_match_the_json(loader, tmp_path):
    config = cbdnet.BudgetConfig(target_bits=3.5, rtn_bits=(3, 4), composite_planes=(), levels=(6,), weighted_levels=(),
                                 calibration=cbdnet.CalibrationConfig(images=128, refit=False))
    model, report = cbdnet.compress(_model(), config, loader, progress=False)
    data = json.loads(json.dumps(report.to_dict()))
    assert report.chosen == data["calibration"]["chosen"] and set(report.chosen) == set(report.codes)
    assert report.budget.overhead_bits == data["calibration"]["overhead_bits"]
    assert report.budget.predicted_loss_increase == pytest.approx(data["calibration"]["predicted_loss_increase"])
    assert report.budget.retries == data["budget_retries"]
    calibration = report.calibration
    assert calibration.images == data["calibration"]["images"] == 128
    assert (calibration.loss_before, calibration.loss_after) == (data["calibration"]["loss_before"],
                                                                 data["calibration"]["loss_after"])
    assert calibration.spec == data["calibration"]["spec"] and calibration.refit is None
    assert report.folded_batchnorm == data["folded_batchnorm"] == ["features.1", "features.4", "features.8"]
    for layer, row in zip(report.layers, data["layers"], strict=True):
        assert (layer.name, layer.shape, layer.code, layer.reason, layer.bits_per_weight) == \
            (row["name"], row["shape"], row["code"], row["reason"], row["bits_per_weight"])
        assert report.layer(layer.name) is layer and report.codes[layer.name] == row["code"]
    assert report.file_bits_per_weight == data["file_bits_per_weight"] <= 3.5
    assert report.file_bytes == cbdnet.save(model, tmp_path / "m.cbd")
    with pytest.raises(KeyError):
        report.layer("features.1")


def test_typed_report_without_calibration_or_budget():
    _, budget = cbdnet.compress(_model(), cbdnet.BudgetConfig(target_bits=4.0, weighted_levels=()), progress=False)
    assert budget.calibration is None and budget.chosen == budget.to_dict()["budget"]["chosen"]
    _, plain = cbdnet.compress(_model(), cbdnet.CBDConfig(planes=4), progress=False, fold_bn=False)
    assert plain.budget is None and plain.chosen == {} and plain.calibration is None
    assert plain.folded_batchnorm == [] and "folded_batchnorm" not in plain.to_dict()


# ---------------------------------------------------------------- state on the model

def test_the_model_keeps_one_documented_attribute_and_the_old_names_for_now(tmp_path):
    model, report = cbdnet.compress(_model(), cbdnet.RTNConfig(bits=4), progress=False)
    assert isinstance(model.cbdnet, ModelState)
    assert model.cbdnet.config == report.config and model.cbdnet.arch == "digits-cnn"
    assert model.cbdnet_config == report.config and model.cbdnet_arch == "digits-cnn"  # deprecated names
    model.cbdnet.weights_source = "my own training run"
    cbdnet.save(model, tmp_path / "m.cbd")
    loaded = cbdnet.load(tmp_path / "m.cbd")
    assert loaded.cbdnet.config == report.config and loaded.cbdnet.weights_source == "my own training run"
    assert (loaded.cbdnet.arch, loaded.cbdnet.arch_kwargs) == ("digits-cnn", {})
    assert cbdnet.format.read(tmp_path / "m.cbd").meta["extra"]["weights_source"] == "my own training run"


def test_code_that_still_sets_an_old_attribute_is_recorded():
    model, _ = cbdnet.compress(_model(), cbdnet.RTNConfig(bits=4), progress=False)
    model.cbdnet_weights_source = "set the old way"  # as callers written before model.cbdnet did
    assert cbdnet.format.parse(encode_file(model)).meta["extra"]["weights_source"] == "set the old way"


def test_the_int8_runtime_report_is_on_the_model_state(tmp_path):
    model, _ = cbdnet.compress(_model(), cbdnet.RTNConfig(bits=4), progress=False)
    cbdnet.save(model, tmp_path / "m.cbd")
    qmodel = cbdnet.load(tmp_path / "m.cbd", runtime="int8", calibration=digits("train").images[:64])
    assert qmodel.cbdnet.int8_report is qmodel.cbdnet_int8_report and qmodel.cbdnet.int8_report.int8_layers
    assert qmodel.cbdnet.arch == "digits-cnn"


# ---------------------------------------------------------------- load without a skeleton

def _squeezenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.squeezenet1_1(num_classes=10).eval()


def test_a_torchvision_model_compressed_from_python_loads_without_its_skeleton(tmp_path):
    model, _ = cbdnet.compress(_squeezenet(), cbdnet.RTNConfig(bits=4), arch="torchvision:squeezenet1_1",
                               arch_kwargs={"num_classes": 10}, progress=False)
    cbdnet.save(model, tmp_path / "sq.cbd")
    meta = cbdnet.format.read(tmp_path / "sq.cbd").meta
    assert (meta["arch"], meta["arch_kwargs"]) == ("torchvision:squeezenet1_1", {"num_classes": 10})
    loaded = cbdnet.load(tmp_path / "sq.cbd")
    assert type(loaded) is torchvision.models.SqueezeNet
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_without_an_arch_a_skeleton_is_needed_and_save_can_record_one(tmp_path):
    model, _ = cbdnet.compress(_squeezenet(), cbdnet.RTNConfig(bits=4), progress=False)
    cbdnet.save(model, tmp_path / "bare.cbd")
    with pytest.raises(cbdnet.CBDError, match="names no architecture"):
        cbdnet.load(tmp_path / "bare.cbd")
    with pytest.raises(cbdnet.CBDError, match="does not fit arch torchvision:squeezenet1_0"):
        cbdnet.save(model, tmp_path / "wrong.cbd", arch="torchvision:squeezenet1_0", arch_kwargs={"num_classes": 10})
    assert not (tmp_path / "wrong.cbd").exists()
    cbdnet.save(model, tmp_path / "named.cbd", arch="torchvision:squeezenet1_1", arch_kwargs={"num_classes": 10})
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(cbdnet.load(tmp_path / "named.cbd")(x), model(x))


def test_save_records_an_arch_for_a_model_built_without_the_zoo(tmp_path):
    torch.manual_seed(0)
    model, report = cbdnet.compress(DigitsCNN().eval(), cbdnet.RTNConfig(bits=4), progress=False)
    assert model.cbdnet.arch is None and report.folded_batchnorm  # folded BatchNorms keep their tensors' shapes
    cbdnet.save(model, tmp_path / "d.cbd", arch="digits-cnn")
    x = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(cbdnet.load(tmp_path / "d.cbd")(x), model(x))


def test_an_arch_that_does_not_fit_the_model_is_refused_before_compressing():
    model = _model()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    for arch, kwargs, match in (("torchvision:squeezenet1_1", {}, "does not fit"),
                                ("cifar-resnet20", {}, "does not fit"),
                                ("no-such-net", {}, "unknown architecture"),
                                ("torchvision:squeezenet1_1", {"colour": 1}, "cannot build")):
        with pytest.raises(cbdnet.CBDError, match=match):
            cbdnet.compress(model, arch=arch, arch_kwargs=kwargs, progress=False)
    assert all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_a_users_factory_is_recorded_but_never_imported_on_the_files_word(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "mynets_api_surface.py").write_text(textwrap.dedent("""
        from cbdnet.zoo.models import DigitsCNN

        def small(num_classes=10):
            return DigitsCNN(num_classes=num_classes)
    """))
    monkeypatch.syspath_prepend(str(package))
    model, _ = cbdnet.compress(_model(), cbdnet.RTNConfig(bits=4), arch="mynets_api_surface:small", progress=False)
    cbdnet.save(model, tmp_path / "mine.cbd")
    assert cbdnet.format.read(tmp_path / "mine.cbd").meta["arch"] == "mynets_api_surface:small"
    monkeypatch.delitem(sys.modules, "mynets_api_surface")
    with pytest.raises(cbdnet.CBDError, match="does not import on a file's word"):
        cbdnet.load(tmp_path / "mine.cbd")
    assert "mynets_api_surface" not in sys.modules
    loaded = cbdnet.load(tmp_path / "mine.cbd", build("mynets_api_surface:small", allow_import=True))
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
