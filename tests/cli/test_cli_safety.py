"""The command line never costs a user a good file, fails with one line and the right exit code, and gives
byte-identical output for the same input."""

from __future__ import annotations

import importlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cbd_mutations import evil_pickle, tiny_model

import cbdnet
from cbdnet.cli import commands as cli
from cbdnet.errors import CBDError, DataError
from cbdnet.format.cbdfile import atomic_write
from cbdnet.zoo.models import build

SRC = Path(__file__).resolve().parents[2] / "src"
COMPRESS = ["compress", "--arch", "digits-cnn", "--weights", "random", "-J", "3", "--quiet"]
OLD = b"a good file the user wants to keep\n"


def run(argv: list[str], capsys) -> tuple[int, str]:
    code = cli.main(argv)
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("cbdnet"), err
    return err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture
def existing(tmp_path) -> Path:
    path = tmp_path / "model.cbd"
    path.write_bytes(OLD)
    return path


def test_existing_output_needs_force(existing, capsys):
    code, err = run([*COMPRESS, "-o", str(existing)], capsys)
    assert code == 2 and "--force" in one_error_line(err)
    assert existing.read_bytes() == OLD
    code, err = run([*COMPRESS, "-o", str(existing), "--force"], capsys)
    assert code == 0 and err == ""
    assert existing.read_bytes().startswith(cbdnet.format.cbdfile.MAGIC) and cbdnet.verify(existing) == []


def test_output_into_a_directory_or_missing_folder_is_refused_before_work(tmp_path, capsys, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("compression started although the output was refused")

    monkeypatch.setattr(cli, "compress_encoded", no_work)
    for target, why in ((tmp_path, "is a directory"), (tmp_path / "absent" / "m.cbd", "does not exist")):
        code, err = run([*COMPRESS, "-o", str(target), "--force"], capsys)
        assert code == 2 and why in one_error_line(err)
    code, err = run([*COMPRESS, "-o", str(tmp_path / "m.cbd"), "--json", str(tmp_path / "no" / "r.json")], capsys)
    assert code == 2 and "does not exist" in one_error_line(err)
    assert not (tmp_path / "m.cbd").exists()


@pytest.mark.parametrize("failure", ["internal", "input"])
def test_failure_mid_compression_leaves_the_old_output(existing, capsys, monkeypatch, failure):
    walker = importlib.import_module("cbdnet.calib.pipeline")
    real_encode, calls = walker.encode_weight, []

    def encode_then_fail(*args, **kwargs):
        calls.append(kwargs.get("name"))
        if len(calls) == 3:
            raise RuntimeError("disk on fire") if failure == "internal" else CBDError("bad layer")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(walker, "encode_weight", encode_then_fail)
    json_path = existing.with_suffix(".json")
    json_path.write_bytes(OLD)
    code, err = run([*COMPRESS, "-o", str(existing), "--force", "--json", str(json_path)], capsys)
    assert len(calls) == 3
    assert code == (1 if failure == "internal" else 2)
    assert ("internal error: RuntimeError: disk on fire" if failure == "internal" else "bad layer") in \
        one_error_line(err)
    assert existing.read_bytes() == OLD and json_path.read_bytes() == OLD
    assert leftovers(existing.parent) == []


def test_nan_weights_and_bad_checkpoints_leave_the_old_output(existing, tmp_path, capsys):
    state = build("digits-cnn").state_dict()
    state["features.3.weight"][0, 0, 0, 0] = float("nan")
    nan_ckpt = tmp_path / "nan.pt"
    torch.save(state, nan_ckpt)
    whole = tmp_path / "whole.pt"
    torch.save(build("digits-cnn"), whole)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(evil_pickle(marker))
    cases = [(nan_ckpt, "features.3.weight holds NaN/Inf"), (whole, "arbitrary code"), (evil, "arbitrary code"),
             (tmp_path / "absent.pt", "no such weights file")]
    for weights, expected in cases:
        argv = ["compress", "--arch", "digits-cnn", "--weights", str(weights), "-o", str(existing), "--force"]
        code, err = run(argv, capsys)
        assert code == 2 and expected in one_error_line(err)
        assert existing.read_bytes() == OLD
    assert not marker.exists() and leftovers(tmp_path) == []


def test_bad_data_spec_leaves_the_old_output(existing, tmp_path, capsys):
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((2, 8, 8), np.uint8), labels=np.zeros(2, np.int64))
    for spec, expected in ((f"cifar10-npz:{tmp_path / 'absent.npz'}", "expected an .npz with 'images'"),
                           (f"cifar10-npz:{wrong}", "expected uint8 [N,32,32,3]"),
                           ("mnist:x", "expected one of"),
                           ("digits", "does not fit the model")):  # 8x8 grey digits into a CIFAR ResNet
        argv = ["compress", "--arch", "cifar-resnet20", "--weights", "random", "-J", "2", "--quiet",
                "--data", spec, "-o", str(existing), "--force"]
        code, err = run(argv, capsys)
        assert code == 2 and expected in one_error_line(err)
        assert existing.read_bytes() == OLD
    assert leftovers(tmp_path) == []


def test_atomic_write_keeps_the_old_file_when_writing_fails(existing, monkeypatch):
    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(CBDError, match="No space left"):
        atomic_write(existing, b"new contents")
    assert existing.read_bytes() == OLD and leftovers(existing.parent) == []
    with pytest.raises(CBDError, match="--force"):
        atomic_write(existing, b"new", overwrite=False)


def test_written_files_get_normal_permissions(tmp_path):
    fresh = tmp_path / "fresh.bin"
    atomic_write(fresh, b"x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o666 & ~umask
    kept = tmp_path / "kept.bin"
    kept.write_bytes(b"old")
    kept.chmod(0o640)
    atomic_write(kept, b"new")
    assert stat.S_IMODE(kept.stat().st_mode) == 0o640 and kept.read_bytes() == b"new"


def test_usage_errors_are_one_line_exit_2(capsys, tmp_path):
    cases = [([], "required: COMMAND"),
             (["compress", "--planes", "x"], "planes must be an integer in 1..16, got 'x'"),
             (["compress", "--arch", "nope"], "known: cifar-resnet110"), (["compress"], "--arch is required"),
             (["compress", "--arch", "digits-cnn", "-J", "40"], "--planes/-J: planes must be an integer in 1..16"),
             (["frobnicate"], "invalid choice"), (["info"], "required: file"),
             (["info", str(tmp_path / "absent.cbd")], "no such file"),
             (["info", str(tmp_path)], "is a directory"),
             (["eval", "--data", "digits"], "--arch is required")]
    for argv, expected in cases:
        code, err = run(argv, capsys)
        assert code == 2, (argv, err)
        assert expected in one_error_line(err), (argv, err)


def test_internal_errors_exit_1_without_traceback_unless_debug(capsys, monkeypatch):
    def crash(*args, **kwargs):
        raise ValueError("first line\nsecond line")

    monkeypatch.setattr(cli, "compress_encoded", crash)
    code, err = run(COMPRESS, capsys)
    assert code == 1 and "internal error: ValueError: first line / second line" in one_error_line(err)
    with pytest.raises(ValueError, match="first line"):
        cli.main([*COMPRESS, "--debug"])
    def no_data(spec):
        raise DataError("nope")

    monkeypatch.setattr(cli, "load_spec", no_data)
    assert run(["eval", "--arch", "digits-cnn", "--data", "digits"], capsys) == (2, "cbdnet: error: nope\n")
    with pytest.raises(DataError):
        cli.main(["eval", "--arch", "digits-cnn", "--data", "digits", "--debug"])


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "PYTHONHASHSEED": "random"}
    return subprocess.run([sys.executable, "-m", "cbdnet", *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_same_input_and_flags_give_a_byte_identical_file(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(build("digits-cnn").state_dict(), weights)
    outputs = []
    for name in ("a.cbd", "b.cbd"):
        done = _cli("compress", "--arch", "digits-cnn", "--weights", str(weights), "-J", "4", "-b", "0.4",
                    "--quiet", "-o", name, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        outputs.append((tmp_path / name).read_bytes())
    assert outputs[0] == outputs[1] and outputs[0].startswith(cbdnet.format.cbdfile.MAGIC)


@pytest.mark.slow
def test_real_process_exit_codes_and_stderr(tmp_path):
    bad = tmp_path / "bad.cbd"
    bad.write_bytes(b"\x89CBD\r\n\x1a\n" + bytes(40))
    done = _cli("info", "--verify", str(bad), cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("cbdnet: error:")
    done = _cli("compress", "--planes", "nine", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "planes must be an integer in 1..16, got 'nine'" in done.stderr
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(evil_pickle(marker))  # protocol 4: torch would also warn, which must not reach stderr
    done = _cli("compress", "--arch", "digits-cnn", "--weights", str(evil), "-o", "x.cbd", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "arbitrary code" in done.stderr
    assert not marker.exists() and not (tmp_path / "x.cbd").exists()
    done = _cli("info", "--verify", "--debug", str(bad), cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" in done.stderr and "FormatError" in done.stderr


def test_info_verify_accepts_a_good_file(tmp_path):
    model, _ = cbdnet.compress(tiny_model(), cbdnet.CBDConfig(planes=2), progress=False)
    path = tmp_path / "t.cbd"
    cbdnet.save(model, path)
    assert cli.main(["info", "--verify", "--quiet", str(path)]) == 0


# A real `cbdnet compress` process (cbdnet.cli.main, as `python -m cbdnet` runs it) with one hook that emulates
# a slow disk: once the model is staged (its temp file on disk, the report not yet) it says so on stdout and
# pauses, so that SIGTERM lands after writing has started, every time, without a guessed sleep.
SLOW_CLI = """
import sys, time
sys.path.insert(0, {src!r})
from cbdnet.cli import commands
from cbdnet.fileio import outputs
real_write = outputs.OutputSet.write
def write(self, path, data):
    real_write(self, path, data)
    print("staged", flush=True)
    time.sleep(60)
outputs.OutputSet.write = write
sys.exit(commands.main(sys.argv[1:]))
"""


def test_sigterm_mid_write_leaves_no_temp_file_and_the_old_outputs(tmp_path):
    import select
    import signal
    import time

    model, report = tmp_path / "OUT.cbd", tmp_path / "OUT.json"
    model.write_bytes(OLD)
    report.write_bytes(OLD + b"report\n")
    argv = [*COMPRESS, "-o", str(model), "--json", str(report), "--force"]
    child = subprocess.Popen([sys.executable, "-c", SLOW_CLI.format(src=str(SRC)), *argv],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60  # imports on a loaded box; the poll ends as soon as the line comes
        line = b""
        while not line.endswith(b"\n") and child.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([child.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                line += child.stdout.read1(100)
        assert line.strip() == b"staged", (line, child.stderr.read().decode()[-2000:])
        staged = leftovers(tmp_path)
        assert len(staged) == 1 and staged[0].startswith(".OUT.cbd."), staged  # writing has started
        child.send_signal(signal.SIGTERM)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGTERM  # non-zero: died of the signal, as the default action does
    assert leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["OUT.cbd", "OUT.json"]
    assert model.read_bytes() == OLD and report.read_bytes() == OLD + b"report\n"
