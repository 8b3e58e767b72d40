"""Tests for outputs.py: every rule with real file-system objects (run as root or not)."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parents[2] / "src" / "cbdnet"  # children import cbdnet.fileio without torch

from cbdnet.fileio import outputs  # noqa: E402
from cbdnet.fileio.outputs import OutputError, OutputSet, is_stdout  # noqa: E402


def temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


pytestmark = pytest.mark.usefixtures("no_hang")


# ------------------------------------------------------------------ refusals at add()

def test_empty_and_stdout_paths(tmp_path):
    out = OutputSet()
    with pytest.raises(OutputError, match="empty"):
        out.add("", what="report")
    with pytest.raises(OutputError, match="standard output"):
        out.add("-", what="report")
    for alias in ("/dev/stdout", "/dev/stderr", "/proc/self/fd/1"):
        with pytest.raises(OutputError, match="give '-'"):
            out.add(alias, what="report")
        with pytest.raises(OutputError, match="give '-'"):
            is_stdout(alias)
    assert is_stdout("-") and not is_stdout(str(tmp_path / "x")) and not is_stdout(None)
    with pytest.raises(OutputError, match="directory"):
        out.add(str(tmp_path) + "/", what="report")


def test_output_is_the_input(tmp_path):
    model = tmp_path / "m.cbd"
    model.write_bytes(b"model")
    out = OutputSet(inputs=[model], force=True)
    with pytest.raises(OutputError, match=r"report .*m\.cbd is the input"):
        out.add(model, what="report")
    # the same file by another spelling
    with pytest.raises(OutputError, match="input"):
        out.add(tmp_path / "." / "m.cbd", what="report")
    assert model.read_bytes() == b"model"


def test_output_hard_link_to_input(tmp_path):
    data = tmp_path / "data.npz"
    data.write_bytes(b"data")
    link = tmp_path / "report.json"
    os.link(data, link)
    out = OutputSet(inputs=[str(data)], force=True)
    with pytest.raises(OutputError, match=r"report\.json is the same file as the input .*data\.npz"):
        out.add(link, what="JSON report")
    assert data.read_bytes() == b"data"


def test_output_symlink_to_input(tmp_path):
    ckpt = tmp_path / "w.pth"
    ckpt.write_bytes(b"weights")
    link = tmp_path / "out.cbd"
    link.symlink_to(ckpt)
    out = OutputSet(inputs=[ckpt], force=True)
    with pytest.raises(OutputError, match="same file as the input"):
        out.add(link, what="compressed model")
    # input given through a symlink, output the real file
    out2 = OutputSet(inputs=[link], force=True)
    with pytest.raises(OutputError, match="input"):
        out2.add(ckpt, what="compressed model")
    assert ckpt.read_bytes() == b"weights" and link.is_symlink()


def test_input_that_does_not_exist_yet_still_clashes(tmp_path):
    out = OutputSet(inputs=[tmp_path / "later.cbd"])
    with pytest.raises(OutputError, match="input"):
        out.add(tmp_path / "sub" / ".." / "later.cbd", what="report")


def test_two_outputs_same_file(tmp_path):
    out = OutputSet()
    out.add(tmp_path / "a.cbd", what="compressed model")
    with pytest.raises(OutputError, match="same file as the compressed model"):
        out.add(str(tmp_path / "a.cbd"), what="JSON report")
    (tmp_path / "b").write_bytes(b"b")
    os.link(tmp_path / "b", tmp_path / "c")
    out = OutputSet(force=True)
    out.add(tmp_path / "b", what="compressed model")
    with pytest.raises(OutputError, match="same file"):
        out.add(tmp_path / "c", what="JSON report")


def test_device_node_refused_and_untouched():
    before = os.stat("/dev/null")
    for force in (False, True):
        with pytest.raises(OutputError, match="/dev/null is a character device, not a regular file"):
            OutputSet(force=force).add("/dev/null", what="compressed model")
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_ino == before.st_ino and after.st_rdev == before.st_rdev


def test_fifo_refused_without_opening(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="FIFO"):
        OutputSet(force=True).add(fifo, what="report")
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_socket_refused(tmp_path):
    import socket
    path = tmp_path / "s.sock"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))
        with pytest.raises(OutputError, match="socket"):
            OutputSet(force=True).add(path, what="report")


def test_directory_refused(tmp_path):
    with pytest.raises(OutputError, match="is a directory; give a file name"):
        OutputSet(force=True).add(tmp_path, what="report")


def test_symlink_refused_even_to_regular_file(tmp_path):
    real = tmp_path / "real.cbd"
    real.write_bytes(b"old")
    link = tmp_path / "link.cbd"
    link.symlink_to(real)
    with pytest.raises(OutputError, match=r"symbolic link \(to .*real\.cbd\)"):
        OutputSet(force=True).add(link, what="compressed model")
    dangling = tmp_path / "dangling.cbd"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError, match="symbolic link"):
        OutputSet().add(dangling, what="compressed model")
    assert link.is_symlink() and real.read_bytes() == b"old" and not (tmp_path / "nowhere").exists()


def test_missing_parent_refused(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        OutputSet().add(tmp_path / "no" / "x.cbd", what="compressed model")
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(OutputError, match="not a directory"):
        OutputSet().add(tmp_path / "f" / "x.cbd", what="compressed model")


def test_existing_file_needs_force(tmp_path):
    target = tmp_path / "m.cbd"
    target.write_bytes(b"old")
    with pytest.raises(OutputError, match="exists; pass --force"):
        OutputSet().add(target, what="compressed model")
    assert target.read_bytes() == b"old"
    with OutputSet(force=True) as out:
        out.add(target, what="compressed model")
        out.write(target, b"new")
        assert target.read_bytes() == b"old"  # staged only
        out.commit()
    assert target.read_bytes() == b"new" and temps(tmp_path) == []


def test_closed_set_and_unregistered_path(tmp_path):
    out = OutputSet()
    with pytest.raises(OutputError, match="not registered"):
        out.write(tmp_path / "x", b"")
    out.abort()
    with pytest.raises(OutputError, match="already"):
        out.add(tmp_path / "x", what="report")


# ------------------------------------------------------------------ directories

def test_add_dir(tmp_path):
    out = OutputSet()
    made = out.add_dir(tmp_path / "demo", what="demo folder")
    assert made.is_dir()
    assert OutputSet().add_dir(tmp_path / "demo", what="demo folder") == made  # exists: fine
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(OutputError, match="not a directory"):
        OutputSet().add_dir(tmp_path / "file", what="demo folder")
    (tmp_path / "ln").symlink_to(made)
    with pytest.raises(OutputError, match="symbolic link"):
        OutputSet().add_dir(tmp_path / "ln", what="demo folder")
    with pytest.raises(OutputError, match="does not exist"):
        OutputSet().add_dir(tmp_path / "a" / "b", what="sweep folder")
    with pytest.raises(OutputError, match="input"):
        OutputSet(inputs=[made]).add_dir(made, what="sweep folder")
    with pytest.raises(OutputError, match="empty"):
        OutputSet().add_dir("", what="sweep folder")


def test_a_directory_add_dir_created_is_removed_when_nothing_is_published(tmp_path):
    new = tmp_path / "new"
    with pytest.raises(RuntimeError), OutputSet() as out:  # staged, then the run fails: no folder left
        out.add_dir(new, what="demo folder")
        out.write(out.add(new / "a.cbd", what="model"), b"partial")
        raise RuntimeError("the run failed")
    assert not new.exists()
    with OutputSet() as out:  # something the user put there meanwhile keeps the folder (rmdir only)
        out.add_dir(new, what="demo folder")
        (new / "mine").write_bytes(b"keep")
    assert (new / "mine").read_bytes() == b"keep" and os.listdir(new) == ["mine"]
    (new / "mine").unlink()
    with OutputSet() as out:  # an existing (empty) folder is left as it was
        out.add_dir(new, what="demo folder")
    assert new.is_dir()
    new.rmdir()
    with OutputSet() as out:  # published: kept
        out.add_dir(new, what="demo folder")
        out.write(out.add(new / "a.cbd", what="model"), b"done")
        out.commit()
    assert (new / "a.cbd").read_bytes() == b"done" and os.listdir(new) == ["a.cbd"]


def test_sigterm_removes_the_directory_add_dir_created(tmp_path):
    new = tmp_path / "new"
    code = textwrap.dedent(f"""
        import sys, time
        import types; _p = types.ModuleType("cbdnet"); _p.__path__ = [{str(HERE)!r}]; sys.modules["cbdnet"] = _p
        from cbdnet.fileio.outputs import OutputSet
        with OutputSet() as out:
            folder = out.add_dir({str(new)!r}, what="demo folder")
            out.write(out.add(folder / "a.cbd", what="model"), b"x" * 1000)
            print("staged", flush=True)
            time.sleep(30)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"staged"
        assert len(temps(new)) == 1
        child.send_signal(signal.SIGTERM)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGTERM and not new.exists()


# ------------------------------------------------------------------ staging, commit, abort

def test_new_file_mode_follows_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with OutputSet() as out:
            out.add(tmp_path / "n", what="report")
            out.write(tmp_path / "n", b"x")
            out.commit()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "n").st_mode) == 0o640


def test_permission_bits_kept_on_replace(tmp_path):
    target = tmp_path / "m.cbd"
    target.write_bytes(b"old")
    os.chmod(target, 0o604)
    with OutputSet(force=True) as out:
        out.add(target, what="compressed model")
        out.write(target, b"new")
        out.commit()
    assert target.read_bytes() == b"new" and stat.S_IMODE(os.stat(target).st_mode) == 0o604


def test_exception_leaves_old_files_and_no_temps(tmp_path):
    model, report = tmp_path / "m.cbd", tmp_path / "r.json"
    model.write_bytes(b"old model")
    with pytest.raises(RuntimeError), OutputSet(force=True) as out:
        out.add(model, what="compressed model")
        out.add(report, what="JSON report")
        out.write(model, b"new model")
        raise RuntimeError("report generation failed")
    assert model.read_bytes() == b"old model" and not report.exists() and temps(tmp_path) == []


def test_no_commit_publishes_nothing(tmp_path):
    with OutputSet() as out:
        out.add(tmp_path / "a", what="report")
        out.write(tmp_path / "a", b"x")
    assert not (tmp_path / "a").exists() and temps(tmp_path) == []


def test_failure_staging_second_output(tmp_path, monkeypatch):
    model, report = tmp_path / "m.cbd", tmp_path / "r.json"
    model.write_bytes(b"old model")
    real_fsync = os.fsync
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    with pytest.raises(OutputError, match=r"cannot write JSON report .*r\.json: No space left"), \
            OutputSet(force=True) as out:
        out.add(model, what="compressed model")
        out.add(report, what="JSON report")
        out.write(model, b"new model")
        monkeypatch.setattr(outputs.os, "fsync", failing_fsync)
        out.write(report, b"{}")
        out.commit()
    assert model.read_bytes() == b"old model" and not report.exists() and temps(tmp_path) == []


def test_failure_publishing_second_output_says_so(tmp_path, monkeypatch):
    model, report = tmp_path / "m.cbd", tmp_path / "r.json"
    model.write_bytes(b"old model")
    report.write_bytes(b"old report")
    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith("r.json"):
            raise OSError(errno.EIO, "Input/output error")
        real_replace(src, dst)

    monkeypatch.setattr(outputs.os, "replace", replace)
    with pytest.raises(OutputError) as info, OutputSet(force=True) as out:
        out.add(model, what="compressed model")
        out.add(report, what="JSON report")
        out.write(model, b"new model")
        out.write(report, b"new report")
        out.commit()
    message = str(info.value)
    assert "cannot write JSON report" in message and "already written: compressed model" in message
    assert "\n" not in message
    assert model.read_bytes() == b"new model" and report.read_bytes() == b"old report" and temps(tmp_path) == []


def test_commit_rechecks_target_absent(tmp_path):
    target = tmp_path / "m.cbd"
    with OutputSet() as out:
        out.add(target, what="compressed model")
        out.write(target, b"mine")
        target.write_bytes(b"someone else's")
        with pytest.raises(OutputError, match="appeared while this run was working"):
            out.commit()
    assert target.read_bytes() == b"someone else's" and temps(tmp_path) == []


def test_commit_rechecks_target_became_symlink(tmp_path):
    target, victim = tmp_path / "m.cbd", tmp_path / "victim"
    target.write_bytes(b"old")
    victim.write_bytes(b"victim")
    with OutputSet(force=True) as out:
        out.add(target, what="compressed model")
        out.write(target, b"mine")
        target.unlink()
        target.symlink_to(victim)
        with pytest.raises(OutputError, match="became a symbolic link"):
            out.commit()
    assert target.is_symlink() and victim.read_bytes() == b"victim" and temps(tmp_path) == []


def test_commit_rechecks_other_outputs_before_publishing_any(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    with OutputSet() as out:
        out.add(a, what="compressed model")
        out.add(b, what="JSON report")
        out.write(a, b"A")
        out.write(b, b"B")
        b.write_bytes(b"other")
        with pytest.raises(OutputError, match="JSON report"):
            out.commit()
    assert not a.exists() and b.read_bytes() == b"other"


def test_fallback_without_hard_links(tmp_path, monkeypatch):
    def no_link(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(outputs.os, "link", no_link)
    target = tmp_path / "m.cbd"
    with OutputSet() as out:
        out.add(target, what="compressed model")
        out.write(target, b"data")
        out.commit()
    assert target.read_bytes() == b"data" and temps(tmp_path) == []
    with OutputSet() as out:  # exclusivity still holds: a file that appears meanwhile wins
        other = tmp_path / "o"
        out.add(other, what="report")
        out.write(other, b"mine")
        monkeypatch.setattr(outputs.OutputSet, "_recheck", lambda self, entry: None)
        other.write_bytes(b"theirs")
        with pytest.raises(OutputError, match="appeared"):
            out.commit()
    assert other.read_bytes() == b"theirs" and temps(tmp_path) == []


def test_write_twice_replaces_staged(tmp_path):
    target = tmp_path / "x"
    with OutputSet() as out:
        out.add(target, what="report")
        out.write(target, b"one")
        out.write(target, bytearray(b"two"))
        assert len(out.temp_files()) == 1
        out.commit()
    assert target.read_bytes() == b"two" and temps(tmp_path) == []


def test_signal_handlers_restored(tmp_path):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    with OutputSet() as out:
        assert signal.getsignal(signal.SIGTERM) == out._on_signal
    assert {s: signal.getsignal(s) for s in before} == before


# ------------------------------------------------------------------ concurrency

def _racer(target, payload, barrier, results):
    try:
        with OutputSet() as out:
            out.add(target, what="compressed model")
            out.write(target, payload)
            barrier.wait(5)
            out.commit()
        results.put(("ok", payload[:1]))
    except OutputError as exc:
        results.put(("refused", str(exc)))
    except BaseException as exc:  # pragma: no cover
        results.put(("crash", repr(exc)))


def test_two_processes_same_new_output(tmp_path):
    ctx = mp.get_context("fork")
    for round_ in range(8):
        target = str(tmp_path / f"m{round_}.cbd")
        barrier, results = ctx.Barrier(2), ctx.Queue()
        payloads = [b"A" * 300_000, b"B" * 300_000]
        procs = [ctx.Process(target=_racer, args=(target, p, barrier, results)) for p in payloads]
        for p in procs:
            p.start()
        got = [results.get(timeout=10) for _ in procs]
        for p in procs:
            p.join(5)
        kinds = sorted(k for k, _ in got)
        assert kinds == ["ok", "refused"], got
        refusal = next(m for k, m in got if k == "refused")
        assert "appeared while this run was working" in refusal or "exists" in refusal
        assert Path(target).read_bytes() in payloads
        assert temps(tmp_path) == []


# ------------------------------------------------------------------ signals

CHILD = textwrap.dedent("""
    import signal, sys, time
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a background job inherits SIGINT ignored
    signal.signal(signal.SIGHUP, signal.SIG_DFL)  # and a run under nohup SIGHUP ignored, which OutputSet keeps
    import types; _p = types.ModuleType("cbdnet"); _p.__path__ = [{here!r}]; sys.modules["cbdnet"] = _p
    from cbdnet.fileio.outputs import OutputSet
    target = {target!r}
    with OutputSet() as out:
        out.add(target, what="compressed model")
        out.write(target, b"x" * 1000)
        print("staged", flush=True)
        time.sleep(30)
        out.commit()
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_during_work_removes_temps(tmp_path, signum):
    target = tmp_path / "m.cbd"
    code = CHILD.format(here=str(HERE), target=str(target))
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout.readline().strip() == b"staged"
        assert len(temps(tmp_path)) == 1
        child.send_signal(signum)
        child.wait(15)  # generous: a loaded 2-core box can take seconds to schedule the handler
    finally:
        if child.poll() is None:
            child.kill()
    if signum == signal.SIGINT:
        assert child.returncode == -signum and b"KeyboardInterrupt" in child.stderr.read()
    else:
        assert child.returncode == -signum  # died of the signal, as it would have without the handler
    assert temps(tmp_path) == [] and not target.exists()


def test_ignored_signal_stays_ignored(tmp_path):
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with OutputSet():
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, old)


def test_sigterm_during_commit_waits_for_commit(tmp_path):
    """A signal that arrives inside commit() is acted on after the commit finished (files complete)."""
    code = textwrap.dedent(f"""
        import os, signal, sys
        import types; _p = types.ModuleType("cbdnet"); _p.__path__ = [{str(HERE)!r}]; sys.modules["cbdnet"] = _p
        from cbdnet.fileio import outputs
        from cbdnet.fileio.outputs import OutputSet
        real = outputs.OutputSet._publish
        def publish(self, entry):
            os.kill(os.getpid(), signal.SIGTERM)  # arrives mid-commit
            real(self, entry)
        outputs.OutputSet._publish = publish
        with OutputSet() as out:
            for name in ("a", "b"):
                out.add(os.path.join({str(tmp_path)!r}, name), what=name)
                out.write(os.path.join({str(tmp_path)!r}, name), name.encode() * 10)
            out.commit()
            print("after commit", flush=True)
    """)
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=10)
    assert child.returncode == -signal.SIGTERM
    assert (tmp_path / "a").read_bytes() == b"a" * 10 and (tmp_path / "b").read_bytes() == b"b" * 10
    assert temps(tmp_path) == []
