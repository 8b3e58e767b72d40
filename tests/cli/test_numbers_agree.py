"""One number first, the same everywhere: for one file, `compress`'s text, its --json report, `info` (text and
--json) and a sweep point's result agree on the whole file's bits per weight and on every code field."""

from __future__ import annotations

import json
import re

import pytest

from cbdnet.cli import main
from cbdnet.format import read
from cbdnet.sweep.engine import markdown_table
from cbdnet.sweep.point import run_point

COMPRESS = ["compress", "--arch", "digits-cnn", "--weights", "random", "--planes", "3", "--fallback", "size"]
MODEL = ["compress", "--arch", "digits-cnn", "--weights", "random"]
# the paper's code, then two whose codes carry a label (rtn4/ch, the budget's choices), which the file records
SETTINGS = {"paper": COMPRESS, "rtn": [*MODEL, "--method", "rtn", "--bits", "4"],
            "budget": [*MODEL, "--target-bits", "3.0"]}


def _table(text: str) -> tuple[list[str], list[str]]:
    """The per-layer rows (without the relative error) and the totals lines of a compress/info table."""
    lines = text.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("layer "))
    end = next(i for i in range(head + 2, len(lines)) if lines[i].startswith("---"))
    rows = [line.rsplit(None, 1)[0] for line in lines[head + 2:end]]
    totals = [line for line in lines[end + 1:end + 4]]
    return rows, totals


def _number(pattern: str, text: str) -> float:
    return float(re.search(pattern, text).group(1))


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_compress_info_json_and_sweep_agree_on_one_file(setting, tmp_path, capsys):
    cbd, report_path, info_path = tmp_path / "m.cbd", tmp_path / "m.json", tmp_path / "info.json"
    assert main([*SETTINGS[setting], "-o", str(cbd), "--json", str(report_path)]) == 0
    compressed = capsys.readouterr().out
    assert main(["info", str(cbd)]) == 0
    shown = capsys.readouterr().out
    assert main(["info", str(cbd), "--json", str(info_path)]) == 0
    report, info = json.loads(report_path.read_text()), json.loads(info_path.read_text())
    file_bits = 8 * cbd.stat().st_size / report["params"]

    # the whole file's bits per weight leads every totals block and the info headline, the same number
    rows_c, totals_c = _table(compressed)
    rows_i, totals_i = _table(shown)
    for totals in (totals_c, totals_i):
        assert totals[0].startswith("whole file: ") and totals[2].startswith("paper's code count: ")
        assert _number(r"whole file: ([\d.]+) bits/weight", totals[0]) == round(file_bits, 3)
        assert _number(r"paper's code count: ([\d.]+)", totals[2]) == round(report["bits_per_weight"], 3)
    assert shown.splitlines()[0].startswith(f"{cbd}: {file_bits:.3f} bits/weight for the whole file")
    assert report["file_bits_per_weight"] == info["file_bits_per_weight"] == file_bits
    assert report["bits_per_weight"] == info["bits_per_weight"]
    assert report["coded_bits_per_weight"] == info["coded_bits_per_weight"]

    # info shows the code fields compress printed: code, a, J, file coding, GF(2) ranks, coded and paper b/w
    assert rows_c == rows_i and len(rows_c) == 5
    for mine, theirs in zip(report["layers"], info["layers"], strict=True):
        assert (mine["code"], mine["coding"], mine["plane_coding"]) == (theirs["code"], theirs["coding"],
                                                                       theirs["plane_coding"])
        assert mine["bits_per_weight"] == theirs["bits_per_weight"]
    if setting != "paper":  # a grid code's name (rtn4/ch, w2e0.5/ch ...), not the generic "grid J=N"
        assert all(not layer["code"].startswith("grid") for layer in info["layers"])
        assert {code.label for code in read(cbd).codes.values()} == {layer["code"] for layer in info["layers"]}


def test_a_sweep_point_reports_its_files_numbers(tmp_path, capsys):
    task = {"method": "cbd", "planes": 3, "fallback": "size", "arch": "digits-cnn", "weights": "random", "seed": 0,
            "eval_data": "digits:test", "calib_data": None, "files_dir": str(tmp_path), "key": "p0"}
    result = run_point(task)
    cbd = tmp_path / "p0.cbd"
    file_bits = 8 * cbd.stat().st_size / result["weights"]
    assert result["file_bits_per_weight"] == file_bits
    assert main(["info", str(cbd), "--json", str(tmp_path / "info.json")]) == 0
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["file_bits_per_weight"] == file_bits and info["bits_per_weight"] == result["bits_per_weight"]
    row = {"index": 0, "series": "cbd (paper)", "status": "done", "planes": 3, **result}
    head, _, line = markdown_table([row]).splitlines()
    assert head.split(" | ")[2:4] == ["whole-file bits/weight", "paper's code count (bits/weight)"]
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    assert cells[2] == f"{file_bits:.3f}" and cells[3] == f"{result['bits_per_weight']:.3f}"
