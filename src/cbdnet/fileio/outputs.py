"""One output policy for every file the CLI writes (stdlib only, floor 1 beside :mod:`cbdnet.errors`).

Use::

    with OutputSet(inputs=[args.model, args.weights, data_path], force=args.force) as out:
        model_path = out.add(args.output, what="compressed model")      # checked now, before any work
        report_path = out.add(args.json, what="JSON report")             # (skip when is_stdout(args.json))
        ...                                                               # the long work
        out.write(model_path, cbd_bytes)                                  # staged: a temp file beside it, fsynced
        out.write(report_path, report_bytes)
        out.commit()                                                      # all staged: publish in add() order

Rules enforced by :meth:`OutputSet.add` (each refusal is one :class:`OutputError` line naming the path and what
it is): no empty path, no ``-``/``/dev/stdout`` (use :func:`is_stdout`), never the same file as an input or as
another output (real path, and device+inode so hard links count), nothing that exists and is not a regular
file (directory, device node, FIFO, socket), no symbolic link (even to a regular file), an existing parent
directory, and an existing file only with ``force``.

Publishing (:meth:`OutputSet.commit`): every target is re-checked first (still absent without ``force``; still a
regular, non-symlink file that is no input with ``force``); only then is anything published. Without ``force``
a target is created exclusively, ``os.link(tmp, target)`` (fails with EEXIST if it appeared meanwhile: of two
concurrent runs exactly one wins), falling back to an ``O_CREAT|O_EXCL`` placeholder + ``rename`` where the file
system has no hard links; with ``force`` ``os.replace``. New files get ``0o666 & ~umask``; a replaced file keeps
its permission bits. Signals are blocked while publishing, so a SIGTERM cannot stop a commit half way.

While the set is open as a context manager (main thread only) SIGTERM, SIGINT and SIGHUP remove every
temporary file and then take their previous effect (default action re-delivered, a Python handler called,
KeyboardInterrupt for SIGINT); ignored signals stay ignored. Leaving the ``with`` block without a commit (an
exception, or simply no commit) removes the temporary files and publishes nothing; a directory that
:meth:`OutputSet.add_dir` created is removed again if it is empty (an existing one is left as it was).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import CBDError

__all__ = ["OutputError", "OutputSet", "is_stdout", "file_kind"]

PathLike = str | os.PathLike
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))
_STDOUT_ALIASES = {"/dev/stdout", "/dev/stderr", "/dev/fd/1", "/dev/fd/2", "/proc/self/fd/1", "/proc/self/fd/2"}


class OutputError(CBDError):
    """An output path that cannot be used, or a write/publish that failed (a user error: exit code 2)."""


def is_stdout(path: PathLike | None) -> bool:
    """True for ``-`` (print to standard output instead of writing a file). ``/dev/stdout`` and the like are
    refused with a pointer to ``-``: as a file they would be replaced (or refused as a device node)."""
    if path is None:
        return False
    text = os.fspath(path)
    if text == "-":
        return True
    if text in _STDOUT_ALIASES or os.path.normpath(text) in _STDOUT_ALIASES:
        raise OutputError(f"{text}: give '-' to write to standard output")
    return False


def file_kind(mode: int) -> str:
    """A short name for a file type, e.g. ``'a character device'``."""
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "a special file"


def _umask() -> int:
    try:  # Linux >= 4.7: read it without the (thread-unsafe) set-and-restore dance
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


@dataclass
class _Output:
    path: Path            # absolute (immune to a later chdir), lexically as given
    shown: str            # as the user gave it, for messages
    what: str
    real: str             # os.path.realpath at add() time
    tmp: str | None = None
    mode: int = 0o644


class OutputSet:
    """A set of output files that are checked early, staged, and published together (see the module doc)."""

    def __init__(self, *, inputs: Iterable[PathLike | None] = (), force: bool = False) -> None:
        self.force = bool(force)
        self._inputs: list[tuple[str, str, tuple[int, int] | None]] = []  # (shown, realpath, (dev, ino))
        for item in inputs:
            if item is None:
                continue
            shown = os.fspath(item)
            if not shown or shown == "-":
                continue
            self._inputs.append((shown, os.path.realpath(shown), self._identity(shown)))
        self._outputs: dict[Path, _Output] = {}
        self._dirs: dict[str, str] = {}  # realpath -> shown
        self._created: list[Path] = []  # directories add_dir() created
        self._closed = False
        self._committed = False
        self._previous: dict[int, Callable[[int, FrameType | None], Any] | int | None] = {}
        self._busy = 0            # > 0 inside a critical section: a signal handler only records the signal
        self._pending: list[int] = []
        self._lock = threading.RLock()

    # ------------------------------------------------------------ registering
    @staticmethod
    def _identity(path: str) -> tuple[int, int] | None:
        try:
            info = os.stat(path)
        except (OSError, ValueError):
            return None
        return info.st_dev, info.st_ino

    def _open_check(self) -> None:
        if self._closed:
            raise OutputError("internal error: this output set was already committed or aborted")

    def _clash(self, shown: str, what: str, real: str, identity: tuple[int, int] | None) -> None:
        for in_shown, in_real, in_id in self._inputs:
            if real == in_real or (identity is not None and identity == in_id):
                same = "is" if shown == in_shown else "is the same file as"
                raise OutputError(f"{what} {shown} {same} the input {in_shown}; refusing to overwrite an input")
        for other in self._outputs.values():
            other_id = self._identity(str(other.path))
            if real == other.real or (identity is not None and identity == other_id):
                raise OutputError(f"{what} {shown} is the same file as the {other.what} {other.shown}; "
                                  "give each output its own path")

    def add(self, path: PathLike | None, *, what: str) -> Path:
        """Register an output file; all checks happen now (call before any long work). Returns its path."""
        with self._lock:
            self._open_check()
            shown = "" if path is None else os.fspath(path)
            if shown == "":
                raise OutputError(f"{what}: empty output path")
            if "\x00" in shown:
                raise OutputError(f"{what} {shown!r}: a path cannot contain a NUL character")
            if shown == "-":
                raise OutputError(f"{what}: '-' means standard output; it cannot be written as a file")
            is_stdout(shown)  # refuses /dev/stdout & co. with a pointer to '-'
            if shown.endswith(os.sep) or os.path.basename(shown) in ("", ".", ".."):
                raise OutputError(f"{what} {shown} names a directory; give a file name")
            target = Path(os.path.abspath(shown))
            real = os.path.realpath(shown)
            self._clash(shown, what, real, self._identity(shown))
            try:
                info = os.lstat(target)
            except FileNotFoundError:
                info = None
            except NotADirectoryError:
                raise OutputError(f"{what} {shown}: {os.path.dirname(shown)} is not a directory") from None
            except OSError as exc:
                raise OutputError(f"cannot use {what} {shown}: {_reason(exc)}") from None
            if info is not None:
                if stat.S_ISLNK(info.st_mode):
                    dest = os.readlink(target)
                    raise OutputError(f"{what} {shown} is a symbolic link (to {dest}); refusing to replace a link: "
                                      "give the real path or remove the link")
                if not stat.S_ISREG(info.st_mode):
                    kind = file_kind(info.st_mode)
                    hint = "; give a file name" if stat.S_ISDIR(info.st_mode) else ", not a regular file"
                    raise OutputError(f"{what} {shown} is {kind}{hint}")
                if not self.force:
                    raise OutputError(f"{what} {shown} exists; pass --force to overwrite it")
            parent = target.parent
            try:
                parent_info = os.stat(parent)
            except FileNotFoundError:
                raise OutputError(f"{what} {shown}: directory {os.path.dirname(shown) or '.'} does not exist") from None
            except OSError as exc:
                raise OutputError(f"{what} {shown}: cannot use directory {parent}: {_reason(exc)}") from None
            if not stat.S_ISDIR(parent_info.st_mode):
                raise OutputError(f"{what} {shown}: {os.path.dirname(shown)} is not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise OutputError(f"{what} {shown}: directory {os.path.dirname(shown) or '.'} is not writable")
            self._outputs[target] = _Output(target, shown, what, real)
            return target

    def add_dir(self, path: PathLike | None, *, what: str) -> Path:
        """Register (and create, if missing) an output directory. An existing one must be a real directory,
        not a symbolic link, and no input. Its parent must exist. Files inside are registered with add()."""
        with self._lock:
            self._open_check()
            shown = "" if path is None else os.fspath(path)
            if shown == "":
                raise OutputError(f"{what}: empty output directory path")
            if "\x00" in shown:
                raise OutputError(f"{what} {shown!r}: a path cannot contain a NUL character")
            target = Path(os.path.abspath(shown))
            real = os.path.realpath(shown)
            for in_shown, in_real, in_id in self._inputs:
                if real == in_real or (in_id is not None and in_id == self._identity(shown)):
                    raise OutputError(f"{what} {shown} is the input {in_shown}; refusing to write into an input")
            for other in self._outputs.values():
                if real == other.real:
                    raise OutputError(f"{what} {shown} is the {other.what} {other.shown}")
            stripped = shown.rstrip(os.sep) or shown
            try:
                info = os.lstat(stripped)
            except FileNotFoundError:
                info = None
            except OSError as exc:
                raise OutputError(f"cannot use {what} {shown}: {_reason(exc)}") from None
            if info is not None and stat.S_ISLNK(info.st_mode):
                raise OutputError(f"{what} {shown} is a symbolic link (to {os.readlink(stripped)}); "
                                  "give the real directory")
            if info is not None and not stat.S_ISDIR(info.st_mode):
                raise OutputError(f"{what} {shown} is {file_kind(info.st_mode)}, not a directory")
            if info is None:
                if not os.path.isdir(target.parent):
                    raise OutputError(f"{what} {shown}: directory {target.parent} does not exist")
                try:
                    os.mkdir(target, 0o777)  # exist_ok: a concurrent creator is fine, checked below
                    self._created.append(target)  # removed again (if still empty) when nothing is published
                except FileExistsError:
                    pass
                except OSError as exc:
                    raise OutputError(f"cannot create {what} {shown}: {_reason(exc)}") from None
                info = os.lstat(target)
                if not stat.S_ISDIR(info.st_mode):
                    raise OutputError(f"{what} {shown} is {file_kind(info.st_mode)}, not a directory")
            if not os.access(target, os.W_OK | os.X_OK):
                raise OutputError(f"{what} {shown} is not writable")
            self._dirs[real] = shown
            return target

    # ------------------------------------------------------------ staging
    def _entry(self, path: PathLike) -> _Output:
        key = Path(os.path.abspath(os.fspath(path)))
        entry = self._outputs.get(key)
        if entry is None:
            raise OutputError(f"internal error: output {os.fspath(path)} was not registered with add()")
        return entry

    def write(self, path: PathLike, data: bytes) -> None:
        """Stage ``data`` for ``path`` (registered with add()): a temp file in the same directory, fsynced.
        Staging the same path again replaces the earlier staged bytes."""
        with self._lock:
            self._open_check()
            entry = self._entry(path)
            view = memoryview(data).cast("B")
            mode = 0o666 & ~_umask()
            try:
                old = os.lstat(entry.path)
                if stat.S_ISREG(old.st_mode):
                    mode = old.st_mode & 0o777  # keep the replaced file's permission bits (no setuid/setgid)
            except OSError:
                pass
            with self._critical():
                try:
                    fd, tmp = tempfile.mkstemp(prefix=f".{entry.path.name}.", suffix=".tmp", dir=entry.path.parent)
                except OSError as exc:
                    raise OutputError(f"cannot write {entry.what} {entry.shown}: {_reason(exc)}") from None
                previous, entry.tmp = entry.tmp, tmp  # registered before any signal handler can run
            if previous is not None:
                _unlink(previous)
            try:
                with os.fdopen(fd, "wb") as handle:
                    os.fchmod(handle.fileno(), mode)
                    handle.write(view)
                    handle.flush()
                    os.fsync(handle.fileno())
                entry.mode = mode
            except OSError as exc:
                self._drop(entry)
                raise OutputError(f"cannot write {entry.what} {entry.shown}: {_reason(exc)}") from None
            except BaseException:
                self._drop(entry)
                raise

    def _drop(self, entry: _Output) -> None:
        tmp, entry.tmp = entry.tmp, None
        if tmp is not None:
            _unlink(tmp)

    # ------------------------------------------------------------ publishing
    def _recheck(self, entry: _Output) -> None:
        try:
            info = os.lstat(entry.path)
        except FileNotFoundError:
            info = None
        except OSError as exc:
            raise OutputError(f"cannot use {entry.what} {entry.shown}: {_reason(exc)}") from None
        if info is None:
            return
        if not self.force:
            raise OutputError(f"{entry.what} {entry.shown} appeared while this run was working (another run?); "
                              "nothing was written; pass --force to overwrite it")
        if stat.S_ISLNK(info.st_mode):
            raise OutputError(f"{entry.what} {entry.shown} became a symbolic link while this run was working; "
                              "nothing was written")
        if not stat.S_ISREG(info.st_mode):
            raise OutputError(f"{entry.what} {entry.shown} became {file_kind(info.st_mode)} while this run was "
                              "working; nothing was written")
        identity = (info.st_dev, info.st_ino)
        for in_shown, _, in_id in self._inputs:
            if in_id == identity or self._identity(in_shown) == identity:
                raise OutputError(f"{entry.what} {entry.shown} became the same file as the input {in_shown}; "
                                  "nothing was written")

    def _publish(self, entry: _Output) -> None:
        tmp = entry.tmp
        assert tmp is not None  # published only after its temporary file was written
        if self.force:
            os.replace(tmp, entry.path)
        else:
            try:
                os.link(tmp, entry.path, follow_symlinks=False)
            except OSError as exc:
                if exc.errno == errno.EEXIST:
                    raise
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS,
                                     errno.EXDEV, errno.EACCES):
                    raise
                self._publish_without_link(entry)
                entry.tmp = None
                return
            _unlink(tmp)
        entry.tmp = None

    @staticmethod
    def _publish_without_link(entry: _Output) -> None:
        # no hard links here (FAT, some network file systems): claim the name exclusively, then rename over it
        fd = os.open(entry.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0), 0o600)
        os.close(fd)
        assert entry.tmp is not None
        try:
            os.replace(entry.tmp, entry.path)
        except BaseException:
            _unlink(str(entry.path))
            raise

    def commit(self) -> None:
        """Publish every staged output, in add() order. Everything is re-checked before the first publish; if
        publishing one fails after others were published, the error says which are complete and which not."""
        with self._lock:
            self._open_check()
            staged = [entry for entry in self._outputs.values() if entry.tmp is not None]
            with self._critical():  # a commit runs to its end; a SIGTERM meanwhile acts after it
                try:
                    for entry in staged:
                        self._recheck(entry)
                except BaseException:
                    self.abort()
                    raise
                done: list[_Output] = []
                for entry in staged:
                    try:
                        self._publish(entry)
                    except OSError as exc:
                        rest = [e for e in staged if e is not entry and e not in done]
                        self.abort()
                        if exc.errno == errno.EEXIST and not self.force:
                            why = "it appeared while this run was working (another run?)"
                        else:
                            why = _reason(exc)
                        message = f"cannot write {entry.what} {entry.shown}: {why}"
                        if done:
                            message += "; already written: " + ", ".join(f"{e.what} {e.shown}" for e in done)
                        skipped = rest
                        if skipped:
                            message += "; not written: " + ", ".join(f"{e.what} {e.shown}" for e in skipped)
                        if self.force:
                            message += " (files not written keep their old content)"
                        raise OutputError(message) from None
                    done.append(entry)
                _fsync_dirs({entry.path.parent for entry in done})
                self._committed = True
                self._closed = True

    def abort(self) -> None:
        """Remove every temporary file, then each directory add_dir() created if it is empty again (``rmdir``:
        never anything the user put there meanwhile); nothing is published. Safe to call more than once (and
        from a handler)."""
        for entry in list(self._outputs.values()):
            self._drop(entry)
        created, self._created = self._created, []
        for folder in reversed(created):
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        self._closed = True

    def staged(self, path: PathLike) -> Path:
        """The temporary file that holds ``path``'s staged bytes (to read them back before the commit)."""
        entry = self._entry(path)
        if entry.tmp is None:
            raise OutputError(f"internal error: {entry.what} {entry.shown} is not staged")
        return Path(entry.tmp)

    def temp_files(self) -> list[str]:
        """The temporary files staged now (for tests and diagnostics)."""
        return [entry.tmp for entry in self._outputs.values() if entry.tmp is not None]

    # ------------------------------------------------------------ context manager and signals
    def __enter__(self) -> OutputSet:
        self._install_handlers()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if not self._committed:
                self.abort()
        finally:
            self._restore_handlers()

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _SIGNALS:
            try:
                previous = signal.getsignal(signum)
                if previous is signal.SIG_IGN or previous is None:  # ignored (e.g. nohup) or set outside Python
                    continue
                signal.signal(signum, self._on_signal)
            except (ValueError, OSError):
                continue
            self._previous[signum] = previous

    def _restore_handlers(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(signum, handler)

    @contextlib.contextmanager
    def _critical(self):
        """Signals are blocked (and a handler that still runs only records its signal) until the end."""
        blocked = _block_signals()
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            _unblock_signals(blocked)  # a signal that arrived meanwhile is delivered now ...
            if not self._busy and self._pending:  # ... or was recorded by the handler: act on it now
                signum = self._pending.pop(0)
                self._pending.clear()
                self._on_signal(signum, None)

    def _on_signal(self, signum, frame) -> None:
        if self._busy:
            self._pending.append(signum)
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        self.abort()
        self._restore_handlers()
        if callable(previous):
            previous(signum, frame)  # e.g. default_int_handler -> KeyboardInterrupt; an outer OutputSet
            return
        if previous == signal.SIG_IGN:
            return
        signal.signal(signum, signal.SIG_DFL)  # default action: die of the same signal
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
        os.kill(os.getpid(), signum)


def _block_signals() -> set:
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return set()
    return signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


def _unblock_signals(previous: set) -> None:
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        return
    to_unblock = set(_SIGNALS) - set(previous)
    if to_unblock:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, to_unblock)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass


def _fsync_dirs(dirs) -> None:
    for folder in dirs:
        try:
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            continue
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)
