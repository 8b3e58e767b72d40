"""Tests for inputs.py with real file-system objects; nothing may block (alarm on every test)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

HERE = Path(__file__).resolve().parents[2] / "src" / "cbdnet"  # children import cbdnet.fileio without torch

from cbdnet.fileio.inputs import (  # noqa: E402
    InputError,
    check_image_size,
    check_regular_file,
    escape_name,
    json_safe,
    open_image_bounded,
    parse_positive_int,
    read_regular_file,
    walk_files,
)

pytestmark = pytest.mark.usefixtures("no_hang")


# ------------------------------------------------------------------ regular files

def test_read_regular_file(tmp_path):
    f = tmp_path / "m.cbd"
    f.write_bytes(b"hello")
    assert read_regular_file(f, what="model", max_bytes=5) == b"hello"
    assert read_regular_file(str(f), what="model", max_bytes=100) == b"hello"
    link = tmp_path / "link"
    link.symlink_to(f)
    assert read_regular_file(link, what="model", max_bytes=5) == b"hello"  # a symlink to a regular file is fine
    assert check_regular_file(link, what="model") == link
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert read_regular_file(empty, what="model", max_bytes=0) == b""


def test_too_large_refused_before_reading(tmp_path):
    f = tmp_path / "big"
    with open(f, "wb") as handle:
        handle.truncate(10 << 30)  # sparse 10 GiB: reading it would be fatal
    with pytest.raises(InputError, match=r"is 10\.0 GiB, over the limit of 1\.0 MiB"):
        read_regular_file(f, what="model", max_bytes=1 << 20)


def test_missing_and_directory(tmp_path):
    with pytest.raises(InputError, match="no such model: .*nope"):
        read_regular_file(tmp_path / "nope", what="model", max_bytes=10)
    with pytest.raises(InputError, match="is a directory, not a regular file"):
        read_regular_file(tmp_path, what="model", max_bytes=10)
    with pytest.raises(InputError, match="empty path"):
        check_regular_file("", what="model")
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "nowhere")
    with pytest.raises(InputError, match="broken symbolic link"):
        check_regular_file(broken, what="weights file")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(InputError, match="loop"):
        check_regular_file(loop, what="weights file")


def test_fifo_refused_immediately(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="FIFO"):
        read_regular_file(fifo, what="model", max_bytes=10)
    link = tmp_path / "to-fifo"
    link.symlink_to(fifo)
    with pytest.raises(InputError, match=r"symbolic link to .*fifo\) is a FIFO"):
        read_regular_file(link, what="model", max_bytes=10)


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_devices_refused(tmp_path, device):
    with pytest.raises(InputError, match="character device"):
        read_regular_file(device, what="model", max_bytes=10)
    link = tmp_path / "dev-link"
    link.symlink_to(device)
    with pytest.raises(InputError, match=f"symbolic link to {device}\\) is a character device"):
        read_regular_file(link, what="model", max_bytes=10)


def test_fifo_and_device_in_a_subprocess_do_not_hang(tmp_path):
    """Belt and braces beyond the alarm: a separate interpreter with a hard timeout."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    code = textwrap.dedent(f"""
        import sys
        import types; _p = types.ModuleType("cbdnet"); _p.__path__ = [{str(HERE)!r}]; sys.modules["cbdnet"] = _p
        from cbdnet.fileio.inputs import read_regular_file, InputError
        for path in ({str(fifo)!r}, "/dev/zero", "/dev/stdin"):
            try:
                read_regular_file(path, what="model", max_bytes=1 << 40)
            except InputError as exc:
                print("refused", exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=10, stdin=subprocess.PIPE)
    assert result.stdout.decode().count("refused") == 3, result


def test_file_growing_while_read(tmp_path, monkeypatch):
    f = tmp_path / "grow"
    f.write_bytes(b"x" * 100)
    real_read = os.read
    grown = []

    def read(fd, n):
        if not grown:
            grown.append(1)
            with open(f, "ab") as handle:
                handle.write(b"y" * 1000)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", read)
    with pytest.raises(InputError, match="grew past the limit"):
        read_regular_file(f, what="model", max_bytes=200)
    grown.clear()
    f.write_bytes(b"x" * 100)
    with pytest.raises(InputError, match="changed while it was read"):
        read_regular_file(f, what="model", max_bytes=10_000)


# ------------------------------------------------------------------ folder walk

def test_walk_files(tmp_path):
    for rel in ("b/2.JPG", "a/1.png", "a/x.txt", "c/d/3.jpeg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    os.mkfifo(tmp_path / "a" / "pipe.png")  # skipped, never opened
    (tmp_path / "a" / "dead.png").symlink_to(tmp_path / "nowhere")
    files = walk_files(tmp_path, suffixes=(".png", ".jpg", ".jpeg"), max_files=10)
    assert [p.relative_to(tmp_path).as_posix() for p in files] == ["a/1.png", "b/2.JPG", "c/d/3.jpeg"]
    with pytest.raises(InputError, match="more than 2"):
        walk_files(tmp_path, suffixes=(".png", ".jpg", ".jpeg"), max_files=2)
    with pytest.raises(InputError, match="no such image folder"):
        walk_files(tmp_path / "missing", suffixes=".png", max_files=2)
    with pytest.raises(InputError, match="not a directory"):
        walk_files(tmp_path / "a" / "1.png", suffixes=".png", max_files=2)


def test_walk_symlink_loops_terminate(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "img.png").write_bytes(b"")
    (tmp_path / "cls" / "up").symlink_to(tmp_path)            # loop back to the root
    (tmp_path / "cls" / "self").symlink_to(tmp_path / "cls")  # loop to itself
    (tmp_path / "x").symlink_to(tmp_path / "y")               # x -> y -> x
    (tmp_path / "y").symlink_to(tmp_path / "x")
    files = walk_files(tmp_path, suffixes=".png", max_files=100)
    assert [p.name for p in files] == ["img.png"]


def test_walk_follows_links_to_class_folders(tmp_path):
    store = tmp_path / "store" / "cat"
    store.mkdir(parents=True)
    (store / "1.png").write_bytes(b"")
    root = tmp_path / "root"
    root.mkdir()
    (root / "cat").symlink_to(store)
    assert [p.relative_to(root).as_posix() for p in walk_files(root, suffixes=".png", max_files=5)] == ["cat/1.png"]


# ------------------------------------------------------------------ images

def test_check_image_size():
    check_image_size(224, 224)
    check_image_size(8000, 8000)
    with pytest.raises(InputError, match="aspect ratio 6,000:1"):
        check_image_size(1, 6000, what="x.png")
    with pytest.raises(InputError, match="over the limit of 64,000,000"):
        check_image_size(10_000, 10_000)
    for bad in ((0, 5), (5, -1), (True, 5), (2.0, 3)):
        with pytest.raises(InputError, match="invalid image size"):
            check_image_size(*bad)


def test_huge_aspect_png_refused_without_decoding(tmp_path, monkeypatch):
    from PIL import Image, ImageFile
    path = tmp_path / "thin.png"
    Image.new("L", (1, 60000)).save(path)
    assert path.stat().st_size < 2000
    with monkeypatch.context() as patch:  # decoding (load) must never start
        patch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("decoded before the size check"))
        with pytest.raises(InputError, match=r"thin\.png: image is 1x60,000: aspect ratio 60,000:1"):
            open_image_bounded(path, 64_000_000)
    ok = tmp_path / "ok.png"
    Image.new("RGB", (40, 30), (1, 2, 3)).save(ok)
    image = open_image_bounded(ok, 64_000_000)
    assert image.size == (40, 30) and image.getpixel((0, 0)) == (1, 2, 3)


def test_huge_png_refused_without_allocating(tmp_path):
    """A PNG claiming 30000x30000 pixels: refused from its header, in a process that could not afford it."""
    from PIL import Image
    path = tmp_path / "big.png"
    Image.new("1", (9000, 9000)).save(path)  # 1-bit, ~10 KB on disk; under Pillow's own 89 Mpx warning
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (400 << 20, 400 << 20))
        import types; _p = types.ModuleType("cbdnet"); _p.__path__ = [{str(HERE)!r}]; sys.modules["cbdnet"] = _p
        from cbdnet.fileio.inputs import open_image_bounded, InputError
        try:
            open_image_bounded({str(path)!r}, 64_000_000)
        except InputError as exc:
            print("refused:", exc)
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=20)
    assert "refused:" in result.stdout.decode() and "81,000,000 pixels" in result.stdout.decode(), result


def test_pillow_bomb_becomes_input_error(tmp_path):
    from PIL import Image
    path = tmp_path / "bomb.png"
    Image.new("1", (12000, 12000)).save(path)  # 144 Mpx > Pillow's 89 Mpx warning threshold
    before = Image.MAX_IMAGE_PIXELS
    import warnings
    filters = list(warnings.filters)
    with pytest.raises(InputError, match="too large to decode safely"):
        open_image_bounded(path, 10**9, max_aspect=10)  # our limit is generous: Pillow's check speaks
    assert before == Image.MAX_IMAGE_PIXELS and warnings.filters == filters


def test_image_refusals(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image")
    with pytest.raises(InputError, match="not an image"):
        open_image_bounded(junk, 1000)
    fifo = tmp_path / "f.png"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="FIFO"):
        open_image_bounded(fifo, 1000)
    from PIL import Image
    trunc = tmp_path / "t.png"
    Image.effect_noise((64, 64), 50).save(trunc)
    trunc.write_bytes(trunc.read_bytes()[:200])
    with pytest.raises(InputError, match="cannot decode"):
        open_image_bounded(trunc, 10_000)


# ------------------------------------------------------------------ small helpers

def test_parse_positive_int():
    assert parse_positive_int("4", name="CBDNET_WORKERS") == 4
    assert parse_positive_int(" +16 ", name="--batch-size") == 16
    assert parse_positive_int(7, name="--batch-size") == 7
    for bad, message in (("abc", "whole number from 1 to 64, not 'abc'"), ("", "is empty"),
                         ("4.0", "not '4.0'"), ("-3", "not '-3'"), ("0x10", "not '0x10'"), ("1_000", "not '1_000'"),
                         ("٣", "whole number"), ("9" * 5000, "whole number"), ("a\nb", r"not 'a\\nb'")):
        with pytest.raises(InputError, match=message):
            parse_positive_int(bad, name="CBDNET_WORKERS", high=64)
    with pytest.raises(InputError, match="from 1 to 64, not 65"):
        parse_positive_int("65", name="CBDNET_WORKERS", high=64)
    with pytest.raises(InputError, match="from 1 to 64, not 0"):
        parse_positive_int("0", name="CBDNET_WORKERS", high=64)
    with pytest.raises(InputError):
        parse_positive_int(True, name="x")
    assert parse_positive_int("0", name="--seed", low=0) == 0


def test_escape_name():
    assert escape_name("a\nverify OK") == "a\\nverify OK"
    assert escape_name("layer1.0.conv1") == "layer1.0.conv1"
    assert escape_name("\x1b[31mred\x1b[0m") == "\\x1b[31mred\\x1b[0m"
    assert escape_name("evil\u202etxt.exe") == "evil\\u202etxt.exe"
    assert escape_name("a\\nb") == "a\\\\nb"  # a real backslash stays distinguishable
    assert escape_name("\x9b2J") == "\\x9b2J" and escape_name("a\u2028b") == "a\\u2028b"
    assert escape_name("ünïcödé") == "ünïcödé"
    long = escape_name("x" * 10_000, max_len=50)
    assert len(long) == 51 and long.endswith("…")
    assert len(escape_name("\n" * 100, max_len=9)) <= 10


@given(st.text())
@settings(max_examples=300, deadline=None)
def test_escape_name_is_one_printable_line(text):
    out = escape_name(text, max_len=80)
    assert len(out) <= 81
    assert all(ch.isprintable() or ch == " " for ch in out), repr(out)


def test_json_safe():
    data = {"a": float("nan"), "b": [1.0, float("inf"), {"c": (float("-inf"), 2)}],
            "d": np.float32("nan"), "e": np.array([1.0, np.nan]), "f": np.int64(3), "g": np.bool_(True),
            "h": "text", "i": None, 5: {1, 2}}
    safe = json_safe(data)
    text = json.dumps(safe, allow_nan=False, sort_keys=False)
    assert json.loads(text) == {"a": None, "b": [1.0, None, {"c": [None, 2]}], "d": None, "e": [1.0, None],
                                "f": 3, "g": True, "h": "text", "i": None, "5": [1, 2]}
    assert json_safe([float("nan"), float("inf"), -math.inf], nonfinite="string") == ["NaN", "Infinity",
                                                                                       "-Infinity"]
    assert data["a"] != data["a"]  # the input is not modified
    cyclic = []
    cyclic.append(cyclic)
    with pytest.raises(ValueError, match="nested too deeply"):
        json_safe(cyclic)
