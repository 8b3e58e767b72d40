"""Floor 6 of cbdnet: the ``cbdnet`` command line (parse, build the config, call the library, print) and the
demo. The only place that knows argparse."""

from .commands import build_parser, main

__all__ = ["main", "build_parser"]
