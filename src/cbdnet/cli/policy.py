"""The CLI's one output policy, in one call per command: every file a run writes goes through an
:class:`cbdnet.fileio.OutputSet` over the run's inputs, registered before any work and published together at
the end (see README, "Reliability")."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import stat
import sys
from pathlib import Path

from ..errors import CBDError
from ..fileio import OutputSet, is_stdout, json_safe
from ..zoo.data import spec_path
from ..zoo.models import torchvision_weights_file

__all__ = ["json_bytes", "run_inputs", "open_outputs", "finish", "stdout_closed", "refuse_closed_stdout"]


def json_bytes(payload: dict) -> bytes:
    """A report as strict JSON (NaN/Inf become null: no bare NaN), UTF-8, one trailing newline."""
    return (json.dumps(json_safe(payload), indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


def run_inputs(args) -> list[str]:
    """The files a run reads (checkpoint, .cbd, data paths of the specs): no output may be one of them."""
    paths = [getattr(args, "file", None)]
    weights = getattr(args, "weights", None)
    if weights not in (None, "random", "torchvision"):
        paths.append(weights)
    elif weights == "torchvision" and getattr(args, "arch", None):
        with contextlib.suppress(CBDError):  # reported when the weights are loaded
            paths.append(str(torchvision_weights_file(args.arch)[0]))
    paths += [spec_path(spec) for spec in (getattr(args, "data", None), getattr(args, "calib", None)) if spec]
    return [p for p in paths if p]


def open_outputs(args, files: list[tuple[str | None, str]]) -> tuple[OutputSet, list]:
    """The one output policy of the CLI, in one call, before any work: an :class:`OutputSet` over the run's
    inputs (:func:`run_inputs`) with ``--force``, and each ``(path, what)`` of ``files`` registered in order
    (None: not asked for -> None; ``-`` for a JSON report: standard output -> ``"-"``). Use it as a context
    manager; ``out.write(path, bytes)`` each output, then :func:`finish`. (``export``/``sweep`` adopt it so.)"""
    out = OutputSet(inputs=run_inputs(args), force=getattr(args, "force", False))
    targets: list[Path | str | None] = []  # None: not asked for; "-": standard output
    for path, what in files:
        if path is None:
            targets.append(None)
        elif what == "JSON report" and is_stdout(path):
            targets.append("-")
        else:
            targets.append(out.add(path, what=what))
    return out, targets


def finish(out: OutputSet, json_target, payload: dict | None) -> None:
    """Stage the JSON report (a file, or ``-``: printed after the files), then publish every output at once."""
    data = json_bytes(payload) if json_target is not None and payload is not None else None
    if data is not None and json_target != "-":
        out.write(json_target, data)
    refuse_closed_stdout()  # nobody reads what the run says: publish nothing (``| true`` must not replace files)
    out.commit()
    if data is not None and json_target == "-":
        sys.stdout.write(data.decode())
        sys.stdout.flush()




def stdout_closed() -> bool:
    """Whether standard output is a pipe or socket whose reader has gone (``cbdnet ... | true``): poll reports
    an error condition on its write end. A terminal or file is never closed in this sense."""
    try:
        fd = sys.stdout.fileno()
        if not (stat.S_ISFIFO(os.fstat(fd).st_mode) or stat.S_ISSOCK(os.fstat(fd).st_mode)):
            return False
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
    except (AttributeError, ValueError, OSError):  # no real stdout (captured, closed): nothing to tell
        return False


def refuse_closed_stdout() -> None:
    """Raise BrokenPipeError when standard output's reader has gone, before anything is published; the CLI ends
    such a run quietly (exit 141, as a process killed by SIGPIPE), its outputs left as they were."""
    if stdout_closed():
        raise BrokenPipeError(errno.EPIPE, "standard output was closed")
