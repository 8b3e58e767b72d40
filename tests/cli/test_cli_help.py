"""The CLI explains itself: groups, defaults and examples in every --help, --help/--version without torch, one
error prefix, errors that name the file and the fix, export's default output name, info --json PATH."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cbdnet.cli import build_parser, main, parser

SRC = str(Path(__file__).resolve().parents[2] / "src")
COMMANDS = ("compress", "eval", "export", "info", "sweep", "demo")


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["compress", "--help"], ["eval", "--help"]])
def test_help_and_version_start_without_torch(argv):
    # CPU time, not wall time: the bound holds on a busy machine; the child imports cbdnet's CLI as the
    # `cbdnet` entry point does (cbdnet.cli:main)
    code = ("import sys, time\nstart = time.process_time()\nfrom cbdnet.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('\\nCPU', time.process_time() - start, 'torch' in sys.modules, 'numpy' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=120)
    cpu, torch_loaded, numpy_loaded = done.stdout.strip().splitlines()[-1].split()[1:]
    assert (torch_loaded, numpy_loaded) == ("False", "False"), done.stdout
    assert float(cpu) <= 0.5, cpu
    assert "cbdnet" in done.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_help_has_groups_defaults_and_an_example(command):
    sub = _subparsers()[command]
    text = sub.format_help()
    titles = [g.title for g in sub._action_groups if g._group_actions and g.title not in ("options",
                                                                                         "positional arguments")]
    assert len(titles) >= 2, titles
    assert "\nexamples:\n" in text and f"cbdnet {command}" in text.split("examples:")[1]
    assert sub.description
    for action in sub._actions:  # every option explains itself
        assert action.help, (command, action.option_strings)
    if command == "compress":
        assert {"model", "method", "budget and calibration", "outputs", "run"} <= set(titles)
        assert "(default: 500)" in text and "images per forward pass" in text  # --batch-size
    if command == "demo":
        assert "seed of the training" in text


def test_parser_choices_are_the_librarys():
    from cbdnet.codec import FALLBACK_RULES, GRANULARITIES
    from cbdnet.export.onnx import CALIBRATION_METHODS
    from cbdnet.format.cbdfile import MAX_ARCH_ARG
    from cbdnet.zoo.models import ARCHS

    # the library's own architectures (other tests register theirs in the same session)
    assert list(parser.ARCHS) == sorted(name for name, build in ARCHS.items() if build.__module__.startswith("cbdnet."))
    assert (tuple(FALLBACK_RULES), tuple(GRANULARITIES)) == (parser.FALLBACK_RULES, parser.GRANULARITIES)
    assert tuple(CALIBRATION_METHODS) == parser.CALIBRATION_METHODS and parser.MAX_ARCH_ARG == MAX_ARCH_ARG


@pytest.mark.parametrize("argv", [[], ["eval"], ["compress", "--planes", "x"], ["info", "a", "b"],
                                  ["export"], ["sweep"], ["demo", "--seed", "-1"], ["frobnicate"]])
def test_usage_errors_have_one_prefix(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cbdnet: error: ") and err.count("\n") == 1, err


def _checkpoint(tmp_path: Path) -> Path:
    from cbdnet.zoo.models import build

    path = tmp_path / "model.th"
    torch.save(build("digits-cnn").state_dict(), path)
    return path


@pytest.mark.parametrize("command", ["eval", "info", "export"])
def test_a_checkpoint_given_as_a_cbd_file_is_named_with_the_fix(command, tmp_path, capsys):
    path = _checkpoint(tmp_path)
    argv = [command, str(path)] + (["--data", "digits"] if command == "eval" else [])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cbdnet: error: {path}: not a .cbd file") and f"--weights {path}" in err, err
    if command == "eval":
        assert "--arch NAME --weights" in err
        assert main(["eval", "--arch", "digits-cnn", "--weights", str(path), "--data", "digits", "--quiet"]) == 0


def _small_cbd(tmp_path: Path) -> Path:
    path = tmp_path / "small.cbd"
    assert main(["compress", "--arch", "digits-cnn", "--weights", "random", "--method", "rtn", "-o", str(path),
                 "--quiet"]) == 0
    return path


def test_export_without_output_writes_name_onnx_beside_and_never_overwrites(tmp_path, capsys):
    pytest.importorskip("onnx")
    cbd = _small_cbd(tmp_path)
    assert main(["export", str(cbd), "--quiet"]) == 0
    onnx = tmp_path / "small.onnx"
    first = onnx.read_bytes()
    assert first[:2] and len(first) > 1000
    onnx.write_bytes(b"old")
    assert main(["export", str(cbd), "--quiet"]) == 2
    assert "--force" in capsys.readouterr().err and onnx.read_bytes() == b"old"
    assert main(["export", str(cbd), "--quiet", "--force"]) == 0 and onnx.read_bytes() == first


def test_info_json_takes_a_path_and_keeps_the_flag_forms(tmp_path, capsys):
    cbd = _small_cbd(tmp_path)
    out = tmp_path / "info.json"
    assert main(["info", str(cbd), "--json", str(out)]) == 0
    assert capsys.readouterr().out == ""
    written = json.loads(out.read_text())
    for argv in (["info", str(cbd), "--json"], ["info", "--json", str(cbd)], ["info", str(cbd), "--json", "-"],
                 ["info", "--verify", "--json", str(cbd)]):
        assert main(argv) == 0
        printed = json.loads(capsys.readouterr().out)
        printed.pop("verify", None)
        assert printed == written, argv
    assert main(["info", str(cbd), "--json", str(out)]) == 2  # the output policy: no overwrite without --force
    assert "--force" in capsys.readouterr().err
