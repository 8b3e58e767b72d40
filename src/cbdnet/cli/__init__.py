"""Floor 6 of cbdnet: the ``cbdnet`` command line (parse, build the config, call the library, print) and the
demo. The only place that knows argparse.

:func:`main` parses first with :mod:`.parser`, which imports no torch, so that ``--help``, ``--version`` and
usage errors answer at once; only a command that runs loads :mod:`.commands` (and with it torch)."""

from __future__ import annotations

from .parser import build_parser, parse_only

__all__ = ["main", "build_parser"]


def main(argv: list[str] | None = None) -> int:
    """The ``cbdnet`` command: its exit code (0 done, 1 internal error or failed check, 2 bad input or usage)."""
    code = parse_only(argv)
    if code is not None:
        return code
    from .commands import main as run

    return run(argv)
