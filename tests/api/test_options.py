"""One source of truth for the compress options (cbdnet.options): the configs, the CLI and the sweep spec accept
exactly the same values of every option (its range's edges and just beyond, wrong types, every choice and a
non-choice), give them the same normalised value, and take their defaults and choices from the one declaration."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path

import pytest

from cbdnet import codec, options
from cbdnet.calib import configs
from cbdnet.cli import build_parser, commands, parser
from cbdnet.options import OPTIONS, Option, option
from cbdnet.sweep.spec import POINT_KEYS, SpecError, load_spec

HEAD = "[model]\narch = 'digits-cnn'\nweights = 'random'\n[data]\neval = 'digits'\ncalib = 'digits:train'\n"
# the other options each one is tried with, so that the method uses it (a sweep point and the CLI refuse an option
# that the method would ignore)
CONTEXT = {"planes": {"method": "cbd"}, "bottleneck": {"method": "cbd"}, "fallback": {"method": "cbd"},
           "bits": {"method": "rtn"}, "granularity": {"method": "rtn"}, "target-bits": {}, "method": {}}
CALIBRATED = {"method": "rtn", "calib": True}
CONFIGS = {"cbd": configs.CBDConfig, "uniform": configs.UniformConfig, "rtn": configs.RTNConfig,
           "budget": configs.BudgetConfig}
TESTED = [opt for opt in OPTIONS if opt.kind != "data"]  # calib: a data spec on the CLI, a boolean in a sweep


class _Missing:
    """The value a form cannot express (a boolean flag takes no value)."""


def _values(opt: Option) -> list:
    """The values tried: every edge, just beyond each, the middle, wrong types, every choice and non-choices."""
    if opt.kind == "int":
        low, high = int(opt.low), int(opt.high)
        return [low, high, low - 1, high + 1, (low + high) // 2, float(low), low + 0.5, True, "x", "", [low]]
    if opt.kind == "float":
        low, high, tiny = opt.low, opt.high, 1e-6
        return [low, high, low - tiny, low + tiny, high - tiny, high + tiny, (low + high) / 2, int(high),
                math.nan, math.inf, -math.inf, True, "x", "", [high]]
    if opt.kind == "choice":
        return [*opt.choices, "nope", "", opt.choices[0].upper(), 1, True, list(opt.choices[:1])]
    if opt.kind == "str":
        return [*opt.examples, "", " ", "a\nb", 1, True, list(opt.examples[:1])]
    return [True, False, 1, 0, "yes", "true", *[u for u in opt.unset if u is not None]]


def _context(opt: Option) -> dict:
    return dict(CONTEXT.get(opt.name, CALIBRATED))


def _field_of(opt: Option, compress, calibration):
    if opt.name == "method":
        return compress.method
    config = calibration if opt.field in {f.name for f in dataclasses.fields(configs.CalibrationConfig)} else compress
    return getattr(config, opt.field)


def _config_form(opt: Option, value):
    """(a) the configs: the mapping of options to configs, each config checking its own fields."""
    try:
        compress, calibration = configs.config_from_options({**_context(opt), opt.name: value})
    except (configs.ConfigError, configs.OptionError):
        return False, None
    return True, _field_of(opt, compress, calibration)


def _cli_text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _cli_form(opt: Option, value):
    """(b) the CLI: the flag parsed, then the configs made from the flags, as ``compress`` does before any work."""
    context = _context(opt)
    argv = ["compress", "--arch", "digits-cnn"]
    argv += ["--method", context["method"]] if "method" in context else []
    argv += ["--calib", "digits:train"] if context.get("calib") else []
    if opt.kind == "bool":
        if not isinstance(value, bool):
            return _Missing
        argv.append(opt.flag if value else f"--no-{opt.name}")
    else:
        argv += [opt.flag, _cli_text(value)]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        return False, None
    try:
        compress = commands.compress_config(args)
        calibration = commands.calibration_settings(args, compress)
    except (configs.ConfigError, configs.OptionError):
        return False, None
    return True, _field_of(opt, compress, calibration)


def _toml(value) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return json.dumps(value)  # TOML's literals of these values are JSON's


def _sweep_form(opt: Option, value, tmp_path: Path):
    """(c) the sweep spec: a one-point spec file with the option as a key, loaded and checked."""
    if isinstance(value, list):
        return _Missing  # a list in a point table expands into points: no single value
    point = {**_context(opt), opt.name: value}
    body = "[[point]]\n" + "".join(f"{json.dumps(key)} = {_toml(item)}\n" for key, item in point.items())
    path = tmp_path / "spec.toml"
    path.write_text(HEAD + body)
    try:
        spec = load_spec(path)
    except SpecError:
        return False, None
    got = spec.tables[0][opt.name]
    return True, got


@pytest.mark.parametrize("opt", TESTED, ids=[opt.name for opt in TESTED])
def test_configs_cli_and_sweep_accept_the_same_values(opt, tmp_path):
    accepted = []
    for value in _values(opt):
        forms = {"config": _config_form(opt, value), "cli": _cli_form(opt, value),
                 "sweep": _sweep_form(opt, value, tmp_path)}
        given = {name: form for name, form in forms.items() if form is not _Missing}
        verdicts = {name: ok for name, (ok, _) in given.items()}
        assert len(set(verdicts.values())) == 1, (opt.name, value, verdicts)
        if verdicts["config"]:
            accepted.append(value)
            normalised = {name: got for name, (ok, got) in given.items()}
            assert len({repr(v) for v in normalised.values()}) == 1, (opt.name, value, normalised)
    assert accepted  # every option has values that all three accept ...
    assert len(accepted) < len(_values(opt))  # ... and values that all three refuse


@pytest.mark.parametrize("opt", [o for o in TESTED if o.kind in ("int", "float")], ids=lambda o: o.name)
def test_ranges_are_the_declared_ones(opt):
    check = opt.check
    for edge, is_open in ((opt.low, opt.low_open), (opt.high, opt.high_open)):
        value = int(edge) if opt.kind == "int" else float(edge)
        if is_open:
            with pytest.raises(options.ConfigError):
                check(value)
        else:
            assert check(value) == value
    with pytest.raises(options.ConfigError, match="^" + re.escape(f"{opt.field} must be {opt.describe()}, got ")):
        check(opt.high + 1)


def test_the_configs_fields_and_defaults_are_the_options():
    for opt in OPTIONS:
        if opt.field is None or opt.field in {f.name for f in dataclasses.fields(configs.CalibrationConfig)}:
            continue
        having = {method for method, cls in CONFIGS.items() if opt.field in {f.name for f in dataclasses.fields(cls)}}
        assert having == set(opt.methods), opt.name  # "which methods it applies to" is true
        for method in having:
            default = next(f.default for f in dataclasses.fields(CONFIGS[method]) if f.name == opt.field)
            expected = opt.method_defaults.get(method, opt.default)
            assert default == expected or opt.unset and default in opt.unset, (opt.name, method)
    calibration = configs.CalibrationConfig()
    for opt in OPTIONS:
        if opt.field in {f.name for f in dataclasses.fields(configs.CalibrationConfig)}:
            assert getattr(calibration, opt.field) == opt.default, opt.name
    assert configs.CBDConfig().fallback == option("fallback").default


def test_names_and_choices_have_one_source():
    assert tuple(opt.name for opt in OPTIONS) == configs.OPTION_NAMES
    assert set(POINT_KEYS) == {*configs.OPTION_NAMES, "skip", "label"}
    assert (codec.GRANULARITIES, codec.FALLBACK_RULES, codec.MAX_PLANES) == (
        options.GRANULARITIES, options.FALLBACK_RULES, options.MAX_PLANES)
    assert set(configs.METHODS) == {*options.METHODS, "target-bits"}
    assert (parser.METHODS, parser.GRANULARITIES, parser.FALLBACK_RULES) == (
        options.METHODS, options.GRANULARITIES, options.FALLBACK_RULES)
    assert configs.ConfigError is options.ConfigError


def test_every_compress_flag_is_declared_and_its_help_shows_its_default():
    compress = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[
        "compress"]
    flags = {s: action for action in compress._actions for s in action.option_strings}
    for opt in OPTIONS:
        action = flags[opt.flag]
        assert action.default is None  # "not given" reaches config_from_options as None
        assert f"default: {opt.default_text()}" in action.help, opt.name
        assert tuple(action.choices or ()) == opt.choices, opt.name
        if opt.short:
            assert flags[opt.short] is action


def test_the_device_option_is_declared_once(capsys):
    """--device (a CalibrationConfig field) is one Option: its check, the CLI flag's type and help, the config's
    validation and the sweep key all follow from it."""
    device = option("device")
    assert device.check("cuda:1") == "cuda:1"
    for bad in ("gpu", "cuda:", "", "cpu\n", 1, True):
        with pytest.raises(options.ConfigError, match=r"^device must be cpu, cuda, cuda:N or auto, got "):
            device.check(bad)
    assert build_parser().parse_args(["compress", "--device", "cuda:0"]).device == "cuda:0"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["compress", "--device", "gpu"])
    assert "argument --device: device must be cpu, cuda, cuda:N or auto, got 'gpu'" in capsys.readouterr().err
    compress = build_parser()._subparsers._group_actions[0].choices["compress"]
    action = next(action for action in compress._actions if "--device" in action.option_strings)
    assert action.help.endswith("(default: cpu)") and action.default is None
    with pytest.raises(options.ConfigError):
        configs.CalibrationConfig(device="gpu")
    assert configs.CalibrationConfig(device="auto").device == "auto"
