"""CLI options that conflict or are ignored are errors; any model from the CLI (torchvision:NAME,
module.path:factory); calibration from an image folder with an image limit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cbdnet.cli import main

DIGITS = ["compress", "--arch", "digits-cnn", "--weights", "random", "--quiet"]


@pytest.mark.parametrize("flags, message", [
    (["--target-bits", "4", "--method", "rtn", "--bits", "3", "--planes", "2"], "--method, --bits, --planes do not"),
    (["--method", "rtn", "--planes", "3"], "--planes does not apply"),
    (["--method", "rtn", "--fallback", "size"], "--fallback does not apply"),
    (["--method", "uniform", "--bottleneck", "0.5"], "--bottleneck does not apply"),
    (["--bits", "3"], "--bits does not apply"),
    (["--granularity", "channel", "--fallback", "size"], "fallback applies to the per-tensor"),
    (["--calib-images", "5"], "--calib-images does not apply"),
    (["--no-gptq"], "--gptq does not apply"),
    (["--calib", "digits:train", "--gptq"], "--gptq/--no-gptq apply to --method rtn per channel"),
    (["--bias-correction"], "need --calib"),
    (["--skip", "nope"], "not a Conv2d"),
    (["--target-bits", "0.5"], "--target-bits: target_bits must be"),
    (["--calib", "digits:train", "--calib-images", "0", "--method", "rtn"], "--calib-images: images must be"),
])
def test_conflicting_or_ignored_flags_are_errors(flags, message, capsys, tmp_path):
    assert main([*DIGITS, *flags, "-o", str(tmp_path / "m.cbd")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "m.cbd").exists()


def test_compress_without_output_says_nothing_is_written(capsys):
    assert main(["compress", "--arch", "digits-cnn", "--weights", "random", "--method", "rtn"]) == 0
    assert "nothing was written" in capsys.readouterr().out


def _image_folder(root, classes=2, per_class=3, size=(48, 40)):
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
                root / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.slow
def test_any_torchvision_model_from_the_cli(tmp_path, capsys):
    folder = _image_folder(tmp_path / "images")
    out, report = tmp_path / "m.cbd", tmp_path / "r.json"
    assert main(["compress", "--arch", "torchvision:mobilenet_v2", "--weights", "random", "--target-bits", "4",
                 "-o", str(out), "--json", str(report), "--quiet"]) == 0
    payload = json.loads(report.read_text())
    assert payload["file_bits_per_weight"] <= 4.0 and len(payload["layers"]) == 53  # the whole file
    assert main(["info", str(out), "--verify", "--quiet"]) == 0
    assert main(["eval", str(out), "--arch", "torchvision:mobilenet_v2", "--data", f"imagefolder:{folder}",
                 "--quiet", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 6
    assert main(["eval", str(out), "--data", f"imagefolder:{folder}", "--quiet"]) == 0  # the file names it
    assert main(["compress", "--arch", "torchvision:no_such_net", "--weights", "random"]) == 2
    assert "torchvision has no" in capsys.readouterr().err


def test_a_users_own_factory_from_the_cli_is_never_imported_on_a_files_word(tmp_path, capsys):
    out = tmp_path / "u.cbd"
    assert main(["compress", "--arch", "user_models:tiny_net", "--weights", "random", "--method", "rtn",
                 "-o", str(out), "--quiet"]) == 0
    assert main(["eval", str(out), "--data", "digits", "--quiet"]) == 2
    assert "does not import on a file's word" in capsys.readouterr().err
    assert main(["eval", str(out), "--arch", "user_models:tiny_net", "--data", "digits", "--quiet"]) == 0
    assert main(["info", str(out), "--arch", "user_models:tiny_net", "--quiet"]) == 0
    assert main(["info", str(out), "--arch", "digits-cnn", "--quiet"]) == 2
    assert "does not" in capsys.readouterr().err
    assert main(["compress", "--arch", "no_such_module:make", "--weights", "random"]) == 2
    assert "cannot import" in capsys.readouterr().err


@pytest.mark.slow
def test_imagefolder_calibration_with_an_image_limit(tmp_path):
    folder = _image_folder(tmp_path / "train", classes=2, per_class=4, size=(64, 64))
    report = tmp_path / "r.json"
    assert main(["compress", "--arch", "torchvision:squeezenet1_1", "--weights", "random", "--method", "rtn",
                 "--calib", f"imagefolder:{folder}", "--calib-images", "3", "--json", str(report), "--quiet"]) == 0
    assert json.loads(report.read_text())["calibration"]["images"] == 3
