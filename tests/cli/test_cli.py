"""The command line contract: compress / info / eval / demo, JSON fields, exit codes."""

from __future__ import annotations

import json

import pytest

from cbdnet.cli import main


def test_compress_info_eval_on_resnet20(tmp_path, resnet20_weights, cifar_calib, capsys):
    out, report = tmp_path / "r20.cbd", tmp_path / "r.json"
    assert main(["compress", "--arch", "cifar-resnet20", "--weights", str(resnet20_weights), "--planes", "4",
                 "--bottleneck", "0.3", "-o", str(out), "--json", str(report), "--quiet"]) == 0
    data = json.loads(report.read_text())
    assert {"bits_per_weight", "params", "file_bytes", "layers"} <= set(data)
    assert data["file_bytes"] == out.stat().st_size and data["params"] == 268336
    assert len(data["layers"]) == 20 and 3.9 < data["bits_per_weight"] < 4.6
    assert data["coded_bits_per_weight"] < data["bits_per_weight"]  # entropy-coded levels
    assert data["file_bits_per_weight"] == 8 * data["file_bytes"] / data["params"]
    layer = data["layers"][5]
    assert {"name", "shape", "h", "w", "scale", "planes_factored", "planes_plain", "plane_ranks",
            "bits_per_weight", "rel_error"} <= set(layer)

    assert main(["info", str(out), "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["bits_per_weight"] == pytest.approx(data["bits_per_weight"])

    eval_json = tmp_path / "e.json"
    assert main(["eval", str(out), "--data", f"cifar10-npz:{cifar_calib}", "--json", str(eval_json), "--quiet"]) == 0
    result = json.loads(eval_json.read_text())
    assert result["n"] == 1000 and 0.6 < result["top1"] <= result["top5"] <= 1.0


def test_compress_prints_the_table_and_accuracy(tmp_path, capsys):
    assert main(["compress", "--arch", "digits-cnn", "--weights", "random", "--seed", "3", "-o",
                 str(tmp_path / "d.cbd"), "--data", "digits:test"]) == 0
    text = capsys.readouterr().out
    assert "bits/weight" in text and "features.3" in text and "top-1 before" in text


def test_existing_output_needs_force(tmp_path, capsys):
    out = tmp_path / "d.cbd"
    out.write_bytes(b"precious")
    args = ["compress", "--arch", "digits-cnn", "--weights", "random", "-o", str(out), "--quiet"]
    assert main(args) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"precious"
    assert main([*args, "--force"]) == 0 and out.read_bytes()[:4] == b"\x89CBD"


@pytest.mark.parametrize("argv,needle", [
    (["compress", "--arch", "nonet", "--weights", "random"], "unknown architecture"),
    (["eval", "missing.cbd", "--data", "digits"], "no such file"),
    (["compress", "--arch", "digits-cnn", "--weights", "/nonexistent.pt"], "no such weights file"),
    (["eval", "--arch", "digits-cnn", "--data", "cifar10-npz:/nope.npz"], "not found"),
    (["compress", "--bogus"], ""),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "Traceback" not in err


def test_fallback_rule_is_an_option_recorded_in_the_report(tmp_path):
    reports = {}
    for rule in ("distortion", "size"):
        path = tmp_path / f"{rule}.json"
        assert main(["compress", "--arch", "cifar-resnet20", "--weights", "random", "--fallback", rule,
                     "--json", str(path), "--quiet"]) == 0
        reports[rule] = json.loads(path.read_text())
        assert reports[rule]["config"]["fallback"] == rule
    modes = {rule: [layer["mode"] for layer in report["layers"]] for rule, report in reports.items()}
    assert modes["size"].count("cbd") > modes["distortion"].count("cbd")  # random weights favour uniform
    changed = [layer for layer in reports["distortion"]["layers"] if "error" in layer["reason"]]
    assert changed and all(layer["mode"] == "uniform" for layer in changed)
    assert main(["compress", "--arch", "cifar-resnet20", "--weights", "random", "--fallback", "least",
                 "--quiet"]) == 2
