"""``cbdnet sweep`` writes under the one output policy (issue 13): its results, point records, spec copy and
plot are staged and renamed, never written through a symbolic link or over a folder, device, FIFO or input;
a foreign non-empty folder needs ``--force``; a sweep's own folder resumes without it. No Dask cluster is
started here: the finished sweeps are point records written with the real keys, which a rerun only reads."""

from __future__ import annotations

import json
import os
import textwrap
import time
from pathlib import Path

import pytest

import cbdnet
from cbdnet.cli import commands as cli
from cbdnet.errors import CBDError
from cbdnet.sweep import content_digests, expand_points, load_spec, plot_pareto, point_key
from cbdnet.sweep.engine import prepare_output
from cbdnet.sweep.spec import fp32_key

pytestmark = pytest.mark.usefixtures("no_hang")
SPEC = """
[model]
arch = "digits-cnn"
weights = "random"
[data]
eval = "digits:test"
[[point]]
method = "rtn"
bits = [3, 4]
"""
USER = b"a file the user wants to keep\n"


def finished_sweep(out: Path, spec_path: Path) -> list[str]:
    """DIR/points/<key>.json for the FP32 evaluation and every point, as a finished sweep leaves them."""
    spec = load_spec(spec_path)
    digests = content_digests(spec)
    version = cbdnet.__version__
    (out / "points").mkdir(parents=True, exist_ok=True)
    (out / "files").mkdir(exist_ok=True)
    records = [(fp32_key(digests, version), {"fp32": True}, {"top1": 0.5, "top5": 0.9, "n": 540})]
    for bits, point in zip((3, 4), expand_points(spec), strict=True):
        records.append((point_key(point, digests, version), point,
                        {"file_bits_per_weight": bits + 1.5, "file_bytes": 1000 * bits, "bits_per_weight": bits + 0.1,
                         "weights": 5000, "top1": 0.3 + bits / 10, "n": 540, "seconds": 1.0}))
    for key, point, result in records:
        record = {"key": key, "point": point, "cbdnet_version": version, "finished": "2026-11-26T00:00:00+0000",
                  "result": result}
        (out / "points" / f"{key}.json").write_text(json.dumps(record))
    return [key for key, _, _ in records]


def sweep(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(["sweep", *argv, "--quiet"])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and err.startswith("cbdnet") and "Traceback" not in err, err
    return err


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


@pytest.fixture
def spec_path(tmp_path) -> Path:
    path = tmp_path / "s.toml"
    path.write_text(textwrap.dedent(SPEC))
    return path


def test_a_finished_sweep_resumes_without_force_and_regenerates_its_files(tmp_path, spec_path, capsys):
    out = tmp_path / "out"
    keys = finished_sweep(out, spec_path)
    (out / "results.json").write_text("[]\n")  # a previous run's (stale) results: the sweep's own, replaced
    stale = [out / ".results.json.abcd1234.tmp", out / "points" / f".{keys[1]}.json.zz_9y8x7.tmp",
             out / "files" / f".{keys[2]}.cbd.q1w2e3r4.tmp"]
    for path in stale:  # what a killed run (or worker) left staged
        path.write_bytes(b"partial")
    (out / "files" / "mine.tmp").write_bytes(USER)  # not a name the sweep stages: kept
    start = time.perf_counter()
    code, err = sweep(capsys, str(spec_path), "-o", str(out))
    assert code == 0, err
    assert time.perf_counter() - start < 30  # nothing computed, no cluster started
    rows = json.loads((out / "results.json").read_text())
    assert [(r["status"], r["bits"], r["top1"]) for r in rows] == [("done", 3, 0.6), ("done", 4, 0.7)]
    assert (out / "results.csv").read_text().count("\n") == 3 and "| FP32 |" in (out / "results.md").read_text()
    assert (out / "spec.toml").read_text() == spec_path.read_text()
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert temps(out) == ["mine.tmp"] and (out / "files" / "mine.tmp").read_bytes() == USER
    # resumed from the folder's own spec copy (an input that is also the sweep's spec.toml): not refused
    code, err = sweep(capsys, str(out / "spec.toml"), "-o", str(out))
    assert code == 0, err
    assert json.loads((out / "results.json").read_text()) == rows


@pytest.mark.parametrize("name", ["results.json", "results.md", "spec.toml", "pareto.png"])
def test_links_folders_and_fifos_in_place_of_sweep_files_are_refused_before_any_work(tmp_path, spec_path, capsys,
                                                                                     name):
    out = tmp_path / "out"
    finished_sweep(out, spec_path)
    user = tmp_path / "precious.txt"
    user.write_bytes(USER)
    target = out / name
    for make, expected in ((lambda: target.symlink_to(user), "symbolic link"),
                           (lambda: target.mkdir(), "directory"), (lambda: os.mkfifo(target), "FIFO")):
        make()
        before = sorted(p.name for p in out.iterdir())
        code, err = sweep(capsys, str(spec_path), "-o", str(out))
        assert code == 2 and expected in one_line(err) and name in err
        assert user.read_bytes() == USER and sorted(p.name for p in out.iterdir()) == before
        assert not (out / "results.json").exists() or name == "results.json"  # refused before the first write
        target.unlink() if not target.is_dir() or target.is_symlink() else target.rmdir()


def test_an_empty_output_path_is_refused_not_the_current_folder(tmp_path, spec_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # found by the fuzz campaign: -o '' swept into the current folder
    before = sorted(os.listdir(tmp_path))
    for force in ([], ["--force"]):
        code, err = sweep(capsys, str(spec_path), "-o", "", *force)
        assert code == 2 and "empty path" in one_line(err)
    assert sorted(os.listdir(tmp_path)) == before


def test_a_foreign_folder_needs_force_and_inputs_are_never_outputs(tmp_path, spec_path, capsys):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_bytes(USER)
    code, err = sweep(capsys, str(spec_path), "-o", str(folder))
    assert code == 2 and "--force" in one_line(err) and "holds no sweep" in err
    assert os.listdir(folder) == ["notes.txt"] and (folder / "notes.txt").read_bytes() == USER
    prepare_output(folder, [], force=True)  # --force: the sweep may write its files there, next to the user's
    assert sorted(os.listdir(folder)) == ["files", "notes.txt", "points"]
    assert (folder / "notes.txt").read_bytes() == USER
    with pytest.raises(CBDError, match="is the input"):
        prepare_output(tmp_path, [tmp_path], force=True)
    with pytest.raises(CBDError, match="input"):  # the spec itself where the sweep writes results.json
        prepare_output(tmp_path, [spec_path.rename(tmp_path / "results.json")], force=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    prepare_output(empty, [])  # an empty folder needs no --force
    assert sorted(os.listdir(empty)) == ["files", "points"]


def test_points_and_files_folders_and_the_lock_are_checked(tmp_path, spec_path, capsys):
    out = tmp_path / "out"
    finished_sweep(out, spec_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (out / "files").rmdir()
    (out / "files").symlink_to(elsewhere)
    code, err = sweep(capsys, str(spec_path), "-o", str(out))
    assert code == 2 and "symbolic link" in one_line(err)
    (out / "files").unlink()
    (out / "files").mkdir()
    for make in (lambda: os.mkfifo(out / ".lock"), lambda: (out / ".lock").symlink_to(tmp_path / "precious")):
        make()
        code, err = sweep(capsys, str(spec_path), "-o", str(out))
        assert code == 2 and ".lock" in one_line(err)
        assert not (tmp_path / "precious").exists()
        (out / ".lock").unlink()
    code, err = sweep(capsys, str(spec_path), "-o", str(out))
    assert code == 0, err


def test_plot_pareto_never_writes_through_a_link(tmp_path):
    rows = [{"index": 0, "series": "rtn", "method": "rtn", "bits": 3, "file_bits_per_weight": 4.5,
             "bits_per_weight": 3.1, "file_bytes": 3000, "top1": 0.6, "n": 540, "fp32_top1": 0.7, "status": "done",
             "error": None}]
    user = tmp_path / "precious.png"
    user.write_bytes(USER)
    (tmp_path / "plot.png").symlink_to(user)
    with pytest.raises(CBDError, match="symbolic link"):
        plot_pareto(rows, tmp_path / "plot.png")
    assert user.read_bytes() == USER and temps(tmp_path) == []
    plot_pareto(rows, user)  # a regular file is replaced atomically
    assert user.read_bytes()[:4] == b"\x89PNG" and temps(tmp_path) == []
