"""Inputs opened safely (stdlib + numpy; Pillow only inside :func:`open_image_bounded`).

Nothing here ever opens a FIFO or a device for reading in a way that can block: files are checked with
``stat`` first, then opened ``O_NONBLOCK`` and checked again with ``fstat`` on the very descriptor that is
read (so a path swapped for a FIFO between the two is still caught). Every refusal is one
:class:`InputError` line naming the path and what it was supposed to be.
"""

from __future__ import annotations

import math
import os
import re
import stat
import warnings
from collections.abc import Callable
from pathlib import Path

from ..errors import DataError

__all__ = ["InputError", "read_regular_file", "check_regular_file", "walk_files", "check_image_size",
           "open_image_bounded", "parse_positive_int", "escape_name", "json_safe"]

PathLike = str | os.PathLike
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)


class InputError(DataError):
    """An input that cannot be used (a user error: exit code 2)."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return name
    return "a special file"


def _shown(path) -> str:
    return escape_name(os.fspath(path), max_len=300)


def _not_regular(path, what: str, mode: int) -> InputError:
    via = ""
    try:
        if os.path.islink(path):
            via = f" (a symbolic link to {escape_name(os.readlink(path), max_len=200)})"
    except OSError:
        pass
    return InputError(f"{what} {_shown(path)}{via} is {_kind(mode)}, not a regular file")


def _stat_error(path, what: str, exc: OSError) -> InputError:
    if isinstance(exc, FileNotFoundError):
        if os.path.islink(path):
            return InputError(f"{what} {_shown(path)} is a broken symbolic link (to "
                              f"{escape_name(os.readlink(path), max_len=200)})")
        return InputError(f"no such {what}: {_shown(path)}")
    if isinstance(exc, PermissionError):
        return InputError(f"cannot read {what} {_shown(path)}: permission denied")
    if isinstance(exc, NotADirectoryError):
        return InputError(f"no such {what}: {_shown(path)} (a part of the path is not a directory)")
    return InputError(f"cannot read {what} {_shown(path)}: {exc.strerror or exc}")


def check_regular_file(path: PathLike | None, *, what: str) -> Path:
    """``path`` as a Path if it is (or is a symlink to) an existing regular file; InputError otherwise.
    Never opens it."""
    text = "" if path is None else os.fspath(path)
    if text == "":
        raise InputError(f"{what}: empty path")
    if "\x00" in text:
        raise InputError(f"{what} {_shown(text)}: a path cannot contain a NUL character")
    try:
        info = os.stat(text)  # follows symlinks: a link is fine if it ends at a regular file
    except OSError as exc:
        raise _stat_error(text, what, exc) from None
    if not stat.S_ISREG(info.st_mode):
        raise _not_regular(text, what, info.st_mode)
    return Path(text)


def _open_regular(path, what: str) -> tuple[int, os.stat_result]:
    file = check_regular_file(path, what=what)
    try:
        fd = os.open(file, _OPEN_FLAGS)  # O_NONBLOCK: a FIFO swapped in after the check cannot block the open
    except OSError as exc:
        raise _stat_error(file, what, exc) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(file, what, info.st_mode)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def read_regular_file(path: PathLike, *, what: str, max_bytes: int,
                      inspect: Callable[[Callable[[int], bytes], int], None] | None = None,
                      hasher=None, as_buffer: bool = False) -> bytes | bytearray:
    """The bytes of a regular file (a symlink is followed only to a regular file). FIFOs, devices, sockets,
    directories and missing files are refused before reading; so is a file over ``max_bytes``. At most
    ``max_bytes + 1`` bytes are ever read: a file that grows (or shrinks) while read is refused.

    ``inspect(take, size)``, where given, runs first: ``take(n)`` reads the file's next ``n`` bytes (at most to
    its end; they stay part of what is returned), so a reader can check a header, and refuse a file whose size
    it does not justify, before the rest is read. ``hasher`` (e.g. a ``hashlib`` object): updated with every
    chunk as it is read. The file is read into one buffer of its size (no second copy); ``as_buffer``: that
    ``bytearray`` is returned as it is (else a ``bytes`` copy)."""
    if max_bytes < 0:
        raise ValueError("max_bytes must be >= 0")
    fd, info = _open_regular(path, what)
    shown = _shown(path)
    try:
        if info.st_size > max_bytes:
            raise InputError(f"{what} {shown} is {_size(info.st_size)}, over the limit of {_size(max_bytes)}")
        # the inspected head in a small buffer first: a file refused on its header costs no buffer of its size
        store = [bytearray()]
        total = 0

        def fill(count: int) -> int:
            """Read up to ``count`` more bytes into the buffer; returns the offset they start at."""
            nonlocal total
            start, buffer = total, store[0]
            while total < start + count and total < info.st_size:
                chunk = _read_chunk(fd, min(start + count, info.st_size, total + (1 << 20)) - total, what, shown)
                if not chunk:
                    break
                buffer[total:total + len(chunk)] = chunk
                if hasher is not None:
                    hasher.update(chunk)
                total += len(chunk)
            return start

        def take(count: int) -> bytes:
            start = fill(count)
            return bytes(store[0][start:total])

        if inspect is not None:
            inspect(take, info.st_size)
        if len(store[0]) < info.st_size:  # one allocation of the file's size, filled in place
            whole = bytearray(info.st_size)
            whole[:total] = store[0]
            store[0] = whole
        while total < info.st_size and fill(min(1 << 24, info.st_size - total)) < total:
            pass
        buffer = store[0]
        extra = 0
        while total == info.st_size and total + extra <= max_bytes:  # more bytes than the size said: it grew
            chunk = _read_chunk(fd, min(1 << 20, max_bytes + 1 - total - extra), what, shown)
            if not chunk:
                break
            extra += len(chunk)
    finally:
        os.close(fd)
    if total + extra > max_bytes:
        raise InputError(f"{what} {shown} grew past the limit of {_size(max_bytes)} while it was read")
    if total != info.st_size or extra:
        total += extra
        raise InputError(f"{what} {shown} changed while it was read ({info.st_size:,} bytes expected, "
                         f"{total:,} read); is another program writing it?")
    return buffer if as_buffer else bytes(buffer)


def _read_chunk(fd: int, count: int, what: str, shown: str) -> bytes:
    try:
        return os.read(fd, count)
    except OSError as exc:
        raise InputError(f"cannot read {what} {shown}: {exc.strerror or exc}") from None


def walk_files(root: PathLike, *, suffixes: str | tuple[str, ...], max_files: int, max_depth: int = 64
               ) -> list[Path]:
    """Regular files under ``root`` whose names end with one of ``suffixes`` (case-insensitive), sorted.

    Symbolic links to directories are followed (data sets are often built from links) but every directory
    is entered at most once, by (device, inode): a link loop ends. Links to anything but a regular file,
    FIFOs, devices and sockets are skipped, never opened. More than ``max_files`` matches, or deeper than
    ``max_depth`` levels, is an InputError."""
    text = "" if root is None else os.fspath(root)
    if text == "":
        raise InputError("image folder: empty path")
    try:
        info = os.stat(text)
    except OSError as exc:
        raise _stat_error(text, "image folder", exc) from None
    if not stat.S_ISDIR(info.st_mode):
        kind = "a file" if stat.S_ISREG(info.st_mode) else _kind(info.st_mode)
        raise InputError(f"image folder {_shown(text)} is {kind}, not a directory")
    wanted = tuple(s.lower() for s in ([suffixes] if isinstance(suffixes, str) else suffixes))
    seen = {(info.st_dev, info.st_ino)}
    found: list[Path] = []
    base_depth = text.rstrip(os.sep).count(os.sep)

    def fail(exc: OSError) -> None:
        raise _stat_error(exc.filename or text, "image folder", exc)

    for folder, dirnames, filenames in os.walk(text, topdown=True, onerror=fail, followlinks=True):
        if folder.count(os.sep) - base_depth > max_depth:
            raise InputError(f"image folder {_shown(text)} is nested more than {max_depth} levels deep")
        keep = []
        for name in sorted(dirnames):
            try:
                sub = os.stat(os.path.join(folder, name))
            except OSError:
                continue  # broken link
            key = (sub.st_dev, sub.st_ino)
            if stat.S_ISDIR(sub.st_mode) and key not in seen:
                seen.add(key)
                keep.append(name)
        dirnames[:] = keep  # prunes the walk: no directory twice, so no loop
        for name in filenames:
            if not name.lower().endswith(wanted):
                continue
            full = os.path.join(folder, name)
            try:
                if not stat.S_ISREG(os.stat(full).st_mode):
                    continue
            except OSError:
                continue
            found.append(Path(full))
            if len(found) > max_files:
                raise InputError(f"image folder {_shown(text)} holds more than {max_files:,} image files")
    found.sort(key=lambda p: os.fspath(p))
    return found


def check_image_size(width: int, height: int, *, max_pixels: int = 64_000_000, max_aspect: float = 50.0,
                     what: str = "") -> None:
    """Refuse absurd image sizes before decoding or resizing (a 97-byte 1x6000 PNG resized to a short side of
    256 is 256x1,536,000 pixels = 2.5 GB as float32 RGB)."""
    label = f"{what}: " if what else ""
    for value in (width, height):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise InputError(f"{label}invalid image size {width!r}x{height!r}")
    if width * height > max_pixels:
        raise InputError(f"{label}image is {width:,}x{height:,} = {width * height:,} pixels, over the limit of "
                         f"{max_pixels:,}")
    aspect = max(width, height) / min(width, height)
    if aspect > max_aspect:
        raise InputError(f"{label}image is {width:,}x{height:,}: aspect ratio {aspect:,.0f}:1 is over the limit "
                         f"of {max_aspect:g}:1")


def open_image_bounded(path: PathLike, max_pixels: int = 64_000_000, *, max_aspect: float = 50.0, what: str = "image"):
    """Open and decode an image with Pillow, its size checked from the header BEFORE any pixel is decoded.
    Pillow's decompression-bomb warning/error become InputError (a local warnings filter; Pillow's global
    MAX_IMAGE_PIXELS is left alone). Returns a loaded ``PIL.Image.Image`` (its file already closed).
    Note: ``warnings.catch_warnings`` is not thread-safe; use from one thread (or processes)."""
    from PIL import Image, UnidentifiedImageError

    fd, _ = _open_regular(path, what)
    shown = _shown(path)
    with os.fdopen(fd, "rb") as handle:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                image = Image.open(handle)
                width, height = image.size
                check_image_size(width, height, max_pixels=max_pixels, max_aspect=max_aspect,
                                 what=f"{what} {shown}")
                image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise InputError(f"{what} {shown} is too large to decode safely: {_first_line(exc)}") from None
        except UnidentifiedImageError:
            raise InputError(f"{what} {shown} is not an image Pillow can read") from None
        except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated / corrupt data
            raise InputError(f"cannot decode {what} {shown}: {_first_line(exc)}") from None
    return image


def _first_line(exc: BaseException) -> str:
    lines = str(exc).splitlines()
    return escape_name(lines[0], max_len=200) if lines else type(exc).__name__


_INT = re.compile(r"[+]?[0-9]{1,30}")


def parse_positive_int(text, *, name: str, low: int = 1, high: int = 2**31 - 1) -> int:
    """An integer in ``[low, high]`` from a command-line or environment value, e.g.
    ``parse_positive_int(os.environ["CBDNET_WORKERS"], name="CBDNET_WORKERS", high=256)``."""
    if isinstance(text, bool):
        raise InputError(f"{name} must be a whole number from {low:,} to {high:,}, not {text!r}")
    if isinstance(text, int):
        value = text
    else:
        raw = "" if text is None else str(text)
        stripped = raw.strip()
        if not _INT.fullmatch(stripped):
            shown = escape_name(raw, max_len=40)
            if stripped == "":
                raise InputError(f"{name} is empty; give a whole number from {low:,} to {high:,}")
            raise InputError(f"{name} must be a whole number from {low:,} to {high:,}, not '{shown}'")
        value = int(stripped)
    if not low <= value <= high:
        raise InputError(f"{name} must be from {low:,} to {high:,}, not {value:,}")
    return value


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def escape_name(text, max_len: int = 200) -> str:
    """A name from an untrusted file, safe to print on one terminal line: control characters (C0, DEL, C1,
    so ANSI escape sequences), line/paragraph separators, bidi and other format characters, lone surrogates,
    unassigned code points and spaces other than ' ' (everything ``str.isprintable`` rejects) are written as
    ``\\n``, ``\\x1b``, ``\\u202e``; a backslash as ``\\\\``; at most ``max_len``
    characters of the result (``…`` marks a cut)."""
    text = text if isinstance(text, str) else str(text)
    out = []
    length = 0
    for char in text:
        piece = _ESCAPES.get(char)
        if piece is None:
            if not char.isprintable():  # Cc, Cf, Cs, Co, Cn, Zl, Zp and Zs other than the space
                code = ord(char)
                piece = f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
            else:
                piece = char
        if length + len(piece) > max_len:
            out.append("…")
            break
        out.append(piece)
        length += len(piece)
    return "".join(out)


def json_safe(obj, *, nonfinite=None, _depth: int = 0):
    """A copy of ``obj`` that ``json.dumps(..., allow_nan=False)`` accepts: NaN/±Inf floats (also numpy
    scalars and arrays) become ``nonfinite`` (None -> JSON null; pass e.g. ``"string"`` to get "NaN",
    "Infinity", "-Infinity"); tuples/sets/arrays become lists; numpy scalars become Python numbers."""
    if _depth > 200:
        raise ValueError("json_safe: nested too deeply (a reference cycle?)")
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        value = float(obj)
        if math.isfinite(value):
            return value
        if nonfinite == "string":
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        return nonfinite
    if isinstance(obj, dict):
        return {(k if isinstance(k, (str, int, float, bool)) or k is None else str(k)):
                json_safe(v, nonfinite=nonfinite, _depth=_depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [json_safe(v, nonfinite=nonfinite, _depth=_depth + 1) for v in items]
    import numpy as np  # a dependency; imported here so that reading this module stays cheap

    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return json_safe(float(obj), nonfinite=nonfinite, _depth=_depth + 1)
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist(), nonfinite=nonfinite, _depth=_depth + 1)
    if hasattr(obj, "item") and callable(obj.item):  # e.g. a 0-d torch tensor, without importing torch
        try:
            return json_safe(obj.item(), nonfinite=nonfinite, _depth=_depth + 1)
        except Exception:
            pass
    return obj  # json.dumps will say what it cannot encode
