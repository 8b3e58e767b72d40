"""``cbdnet sweep``: spec checks, expansion, keys, and real sweeps of a random digits CNN on Dask workers (the
default local cluster and a scheduler + two worker processes started here with the ``dask`` command)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import cbdnet
from cbdnet.cli import main
from cbdnet.sweep import SpecError, content_digests, expand_points, load_spec, point_key, run_point, run_sweep
from cbdnet.sweep.engine import NO_DASHBOARD  # noqa: F401 - the public constant the CLI's cluster uses
from cbdnet.sweep.spec import fp32_key, series_label
from cbdnet.zoo.data import load_spec as load_data
from cbdnet.zoo.metrics import evaluate_classification
from cbdnet.zoo.models import build

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"

HEAD = """
[model]
arch = "digits-cnn"
weights = "random"
[data]
eval = "digits:test"
calib = "digits:train"
"""

# Three quick points (no calibration: GPTQ on 1,437 digits takes a minute on the shared box).
TINY = HEAD + """
[[point]]
method = "rtn"
bits = [3, 4]
[[point]]
planes = 3
fallback = "size"
"""
TIMING = ("seconds", "compress_seconds", "file")


def write(root: Path, text: str, name: str = "s.toml") -> Path:
    path = root / name
    path.write_text(textwrap.dedent(text))
    return path


def comparable(rows: list[dict]) -> list[dict]:
    """Rows without their timings and the output folder's path."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def slow_run_point(delay: float, task: dict) -> dict:
    """The real point after a pause, so that a sweep can be killed with points in flight."""
    time.sleep(delay)
    return run_point(task)


# ------------------------------------------------------------------------------ spec errors


BAD_POINTS = [
    ("[[point]]\nmethod = 'gptq'\n", "method must be one of cbd, uniform, rtn"),
    ("[[point]]\nbitz = 4\n", "unknown key 'bitz'"),
    ("[[point]]\nbits = 3.5\n", "bits must be an integer"),
    ("[[point]]\nbits = []\n", "expands to no points"),
    ("[[point]]\nbottleneck = 1.5\n", "bottleneck must be a number in [0, 1]"),
    ("[[point]]\ngranularity = 'row'\n", "granularity must be one of"),
    ("[[point]]\ncalib = 'yes'\n", "calib must be true or false"),
    ("[[point]]\nlabel = ['a', 'b']\n", "label must be a non-empty string"),
    ("[[point]]\nbits = 4\n", "bits does not apply"),  # the CLI's own check: --bits is for rtn
    ("[[point]]\nmethod = 'rtn'\nplanes = 3\n", "planes does not apply"),
    ("[[point]]\nmethod = 'rtn'\ngptq = true\n", "gptq does not apply: they need calib"),
    ("[[point]]\ntarget-bits = 3\nmethod = 'rtn'\n", "method does not apply"),
    ("[[point]]\nmethod = 'rtn'\nskip = ['nope']\n", "skip names ['nope']"),
    ("[[point]]\nmethod = 'rtn'\n[extra]\nx = 1\n", "unknown table or key 'extra'"),
    ("[point]\nmethod = 'cbd'\n", "write [[point]], not [point]"),
    ("", "no [[point]] tables"),
    ("[[point]]\nbits = [3, 4\n", "not valid TOML"),
]


@pytest.mark.parametrize("body,message", BAD_POINTS)
def test_spec_errors(tmp_path, body, message):
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, HEAD + body))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


@pytest.mark.parametrize("old,new,message", [
    ('arch = "digits-cnn"', 'arch = "no-such-net"', "unknown architecture"),
    ('arch = "digits-cnn"', 'arch = "digits-cnn"\ncolour = 1', "unknown key 'colour' in [model]"),
    ('weights = "random"', 'weights = "missing.th"', "missing.th does not exist"),
    ('eval = "digits:test"', 'eval = "cifar10-npz:missing.npz"', "missing.npz does not exist"),
    ('eval = "digits:test"', 'eval = "mnist:x"', "unknown data kind 'mnist'"),
    ('calib = "digits:train"\n', "", "calib = true needs [data].calib"),
])
def test_spec_errors_model_data(tmp_path, old, new, message):
    body = HEAD.replace(old, new) + "[[point]]\nmethod = 'rtn'\ncalib = true\n"
    with pytest.raises(SpecError) as err:
        load_spec(write(tmp_path, body))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["unknown key", "unknown method", "missing file", "unreachable cluster"])
def test_cli_bad_spec_is_one_line_exit_2_before_any_point(tmp_path, capsys, case):
    body = {"unknown key": TINY + "colour = 'red'\n", "unknown method": TINY.replace("'rtn'", "'gptq'")
            .replace('"rtn"', '"gptq"'), "missing file": TINY.replace('"digits:test"', '"cifar10-npz:x.npz"'),
            "unreachable cluster": TINY}[case]
    argv = ["sweep", str(write(tmp_path, body)), "-o", str(tmp_path / "out"), "--quiet"]
    if case == "unreachable cluster":
        argv += ["--cluster", f"tcp://127.0.0.1:{_free_port()}"]
    start = time.perf_counter()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cbdnet: error: ") and err.count("\n") == 1, err
    assert time.perf_counter() - start < 30
    assert not list((tmp_path / "out" / "points").glob("*.json")) if (tmp_path / "out").exists() else True


def test_cli_refuses_file_or_symlink_as_output(tmp_path, capsys):
    spec = write(tmp_path, TINY)
    (tmp_path / "file").write_text("keep")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for name, message in (("file", "is not a folder"), ("link", "symbolic link")):
        assert main(["sweep", str(spec), "-o", str(tmp_path / name), "--quiet"]) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "keep" and not list((tmp_path / "real").iterdir())


# ------------------------------------------------------------------------------ expansion and keys


def test_expansion_and_series(tmp_path):
    spec = load_spec(write(tmp_path, HEAD + """
        [[point]]
        method = "rtn"
        bits = [3, 4]
        granularity = ["channel", "tensor"]
        calib = true
        [[point]]
        planes = [3, 4]
        fallback = "size"
        skip = [["classifier.3"], ["features.0", "classifier.3"]]
        [[point]]
        target-bits = [2.5, 3]
        calib = true
        label = "budget"
        """))
    points = expand_points(spec)
    assert len(points) == 4 + 4 + 2
    assert points[:2] == [{"method": "rtn", "bits": 3, "granularity": "channel", "calib": True},
                          {"method": "rtn", "bits": 3, "granularity": "tensor", "calib": True}]
    assert points[4] == {"method": "cbd", "planes": 3, "fallback": "size", "skip": ["classifier.3"]}
    assert points[5]["skip"] == ["classifier.3", "features.0"]
    assert points[8] == {"target-bits": 2.5, "calib": True, "label": "budget"}
    assert isinstance(points[9]["target-bits"], float)
    assert [series_label(p) for p in points[:2]] == ["rtn channel + gptq", "rtn tensor + calib"]
    assert series_label(points[4]) == "cbd (paper) (skip 1)" and series_label(points[8]) == "budget"


def test_keys(tmp_path):
    (tmp_path / "w.th").write_bytes(b"")
    torch.save(build("digits-cnn").state_dict(), tmp_path / "w.th")
    body = TINY.replace('"random"', '"w.th"')
    spec = load_spec(write(tmp_path, body))
    points = expand_points(spec)
    digests = content_digests(spec)
    keys = [point_key(p, digests, "0.1.0") for p in points]
    assert len(set(keys)) == len(keys) and fp32_key(digests, "0.1.0") not in keys
    assert point_key(dict(reversed(points[0].items())), digests, "0.1.0") == keys[0]  # order-free
    assert point_key({**points[0], "label": "x"}, digests, "0.1.0") == keys[0]  # a label only names a series
    assert all(point_key(p, digests, "0.2.0") != k for p, k in zip(points, keys, strict=True))  # the version
    # another folder with the same bytes: the same keys; other weights: other keys
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "w.th").write_bytes((tmp_path / "w.th").read_bytes())
    assert content_digests(load_spec(write(tmp_path / "b", body))) == digests
    torch.save(build("digits-cnn").state_dict(), tmp_path / "b" / "w.th")
    other = content_digests(load_spec(write(tmp_path / "b", body)))
    assert all(point_key(p, other, "0.1.0") != k for p, k in zip(points, keys, strict=True))
    # the calibration data's identity only changes the keys of points that calibrate
    calibrated = {"method": "rtn", "bits": 4, "calib": True}
    changed = {**digests, "calib": "digits:train:other"}
    assert point_key(points[0], changed, "0.1.0") == keys[0]
    assert point_key(calibrated, changed, "0.1.0") != point_key(calibrated, digests, "0.1.0")


# ------------------------------------------------------------------------------ real sweeps


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory):
    """A real Dask scheduler and two worker processes on 127.0.0.1, started with the ``dask`` command."""
    folder = tmp_path_factory.mktemp("dask")
    dask = [sys.executable, str(Path(sys.executable).parent / "dask")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE), os.environ.get("PYTHONPATH", "")])}
    address_file = folder / "scheduler.json"
    procs = [subprocess.Popen(dask + ["scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
                                      "--scheduler-file", str(address_file)], env=env, cwd=folder,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    try:
        deadline = time.monotonic() + 60
        while not address_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        address = json.loads(address_file.read_text())["address"]
        procs.append(subprocess.Popen(dask + ["worker", address, "--nworkers", "2", "--nthreads", "1",
                                              "--no-dashboard", "--host", "127.0.0.1"], env=env, cwd=folder,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
        yield address
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _finished(out: Path) -> dict[str, str]:
    return {p.name: json.loads(p.read_text())["finished"] for p in (out / "points").glob("*.json")}


@pytest.mark.slow
def test_real_sweep_rerun_cluster_and_direct_compress(tmp_path, scheduler):
    spec_path = write(tmp_path, TINY)
    out = tmp_path / "out"
    assert main(["sweep", str(spec_path), "-o", str(out), "--quiet", "--workers", "2"]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in rows] == ["done"] * 3 and [r["index"] for r in rows] == [0, 1, 2]
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 4 and csv_lines[0].startswith("index,series,method,bits,planes,fallback")
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    for row in rows:  # whole-file size: the bytes on disk over the compressed weights
        assert row["file_bytes"] == (out / "files" / f"{row['key']}.cbd").stat().st_size
        assert row["file_bits_per_weight"] == pytest.approx(row["file_bytes"] * 8 / row["weights"])
        assert row["file_bits_per_weight"] > row["coded_bits_per_weight"]  # + header and float tensors
        assert row["n"] == 540 and row["cbdnet_version"] == cbdnet.__version__
    torch.manual_seed(0)
    fp32 = evaluate_classification(build("digits-cnn"), load_data("digits:test"), progress=False)
    assert rows[0]["fp32_top1"] == fp32["top1"]

    # one row against a direct compress + save + load + eval of the same config
    torch.manual_seed(0)
    model, _ = cbdnet.compress(build("digits-cnn").eval(), cbdnet.RTNConfig(bits=4), progress=False)  # as sweeps do
    size = cbdnet.save(model, tmp_path / "direct.cbd")
    direct = evaluate_classification(cbdnet.load(tmp_path / "direct.cbd"), load_data("digits:test"), progress=False)
    assert (size, direct["top1"], direct["top5"]) == (rows[1]["file_bytes"], rows[1]["top1"], rows[1]["top5"])
    assert (tmp_path / "direct.cbd").read_bytes() == (out / "files" / f"{rows[1]['key']}.cbd").read_bytes()

    # a rerun computes nothing and starts no cluster
    stamps = _finished(out)
    start = time.perf_counter()
    assert main(["sweep", str(spec_path), "-o", str(out), "--quiet"]) == 0
    assert time.perf_counter() - start < 10
    assert _finished(out) == stamps and json.loads((out / "results.json").read_text()) == rows

    # a real scheduler with two worker processes, through --cluster: the same results, byte-identical files
    remote = tmp_path / "remote"
    assert main(["sweep", str(spec_path), "-o", str(remote), "--quiet", "--cluster", scheduler]) == 0
    remote_rows = json.loads((remote / "results.json").read_text())
    assert comparable(remote_rows) == comparable(rows)
    for row in rows:
        assert (remote / "files" / f"{row['key']}.cbd").read_bytes() == (out / "files" / f"{row['key']}.cbd")\
            .read_bytes()


CHILD = """
import functools, sys
sys.path[:0] = [{src!r}, {here!r}]
from cbdnet.sweep import load_spec, run_sweep
import test_sweep
if __name__ == "__main__":
    run_sweep(load_spec({spec!r}), {out!r}, workers=1, progress=False,
              point_function=functools.partial(test_sweep.slow_run_point, 1.5))
"""


@pytest.mark.slow
def test_killed_sweep_resumes_with_valid_rows(tmp_path, scheduler):
    import psutil

    spec = write(tmp_path, HEAD + "[[point]]\nmethod = 'rtn'\nbits = [2, 3, 4, 5, 6]\n")
    out = tmp_path / "out"
    script = write(tmp_path, CHILD.format(src=str(SRC), here=str(HERE), spec=str(spec), out=str(out)), "child.py")
    proc = subprocess.Popen([sys.executable, str(script)], start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None and len(_finished(out) if
                                                                           (out / "points").exists() else {}) < 3:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        workers = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        psutil.wait_procs(workers, timeout=15)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the group this test started
        proc.wait()
    done_before = _finished(out)
    assert 3 <= len(done_before) < 6  # the FP32 result and at least two points, not all five
    rows = json.loads((out / "results.json").read_text())  # never half-written
    assert len(rows) == 5 and {r["status"] for r in rows} <= {"done", "pending"}

    rows = run_sweep(load_spec(spec), out, cluster=scheduler, progress=False)
    assert [r["status"] for r in rows] == ["done"] * 5
    after = _finished(out)
    assert all(after[name] == stamp for name, stamp in done_before.items())  # finished points were not rerun
    assert not list((out / "points").glob(".*.tmp"))
    assert json.loads((out / "results.json").read_text()) == rows
    assert all(r["file_bytes"] == (out / "files" / f"{r['key']}.cbd").stat().st_size for r in rows)
    tops = [r["top1"] for r in rows]
    assert all(isinstance(t, float) and 0.0 <= t <= 1.0 for t in tops)


@pytest.mark.slow
def test_failing_point_is_recorded_and_the_rest_go_on(tmp_path, scheduler):
    spec = load_spec(write(tmp_path, HEAD + "[[point]]\nmethod = 'rtn'\nbits = [3, 4]\n"))
    rows = run_sweep(spec, tmp_path / "out", cluster=scheduler, progress=False,
                     point_function=functools.partial(failing_run_point, 3))
    assert [r["status"] for r in rows] == ["failed", "done"]
    assert rows[0]["error"] == "RuntimeError: no 3-bit points here" and rows[1]["error"] is None
    rows = run_sweep(spec, tmp_path / "out", cluster=scheduler, progress=False)  # a rerun retries it
    assert [r["status"] for r in rows] == ["done", "done"]


def failing_run_point(bad_bits: int, task: dict) -> dict:
    if task.get("bits") == bad_bits:
        raise RuntimeError(f"no {bad_bits}-bit points\nhere")
    return run_point(task)


def test_plot_and_markdown(tmp_path):
    from cbdnet.sweep import noise_sigma, pareto_front, plot_pareto
    from cbdnet.sweep.engine import markdown_table

    assert noise_sigma(0.81, 10_000) == pytest.approx((0.81 * 0.19 / 10_000) ** 0.5)
    assert pareto_front([(3, 0.5), (4, 0.7), (4.5, 0.6), (5, 0.8)]) == [(3, 0.5), (4, 0.7), (5, 0.8)]
    rows = [{"index": i, "series": s, "method": "rtn", "bits": b, "file_bits_per_weight": b + 1.5,
             "bits_per_weight": b + 0.08, "file_bytes": 1000 * b, "top1": t, "n": 10_000, "fp32_top1": 0.81,
             "status": "done", "error": None}
            for i, (s, b, t) in enumerate([("rtn channel", 3, 0.62), ("rtn channel", 4, 0.77),
                                           ("rtn channel + gptq", 3, 0.40), ("rtn channel + gptq", 4, 0.80)])]
    rows.append({"index": 4, "series": "rtn tensor", "method": "rtn", "bits": 2, "status": "failed",
                 "error": "RuntimeError: x"})
    png = plot_pareto(rows, tmp_path / "p.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
    table = markdown_table(rows).splitlines()
    assert table[2] == "| FP32 | - | 32 | 32 | - | 0.8100 |"
    assert table[3] == "| rtn channel | bits=3 | 4.500 | 3.080 | 3,000 | 0.6200 |"
    assert table[-1] == "| rtn tensor | bits=2 | failed: RuntimeError: x | | | |"
