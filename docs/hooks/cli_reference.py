"""MkDocs hook: the command-line reference, generated from cbdnet's own argparse parser at build time.

A page holding the marker ``<!-- cli-reference -->`` gets, in its place, one section per command and
subcommand with the exact ``--help`` text the installed parser prints, so the reference can never drift from
the code: a renamed flag, a new group or a new subcommand shows up on the next build.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

MARKER = "<!-- cli-reference -->"
HELP_WIDTH = "80"  # argparse wraps to $COLUMNS; a fixed width keeps the page the same on every machine


def _parser() -> argparse.ArgumentParser:
    from cbdnet import cli

    build = getattr(cli, "build_parser", None)
    if build is None:  # the parser's home moved within cli/: find it rather than fail the build
        from cbdnet.cli import commands

        build = commands.build_parser
    return build()


def _subcommands(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:  # argparse exposes subparsers only through this private list
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


def _sections(parser: argparse.ArgumentParser, depth: int = 2) -> Iterator[str]:
    yield f"{'#' * depth} `{parser.prog}`\n"
    yield "```text\n" + parser.format_help().rstrip() + "\n```\n"
    for _name, sub in _subcommands(parser):
        yield from _sections(sub, depth + 1 if depth < 3 else depth)


def render() -> str:
    """The whole reference as Markdown: ``cbdnet --help``, then every subcommand's ``--help``."""
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        return "\n".join(_sections(_parser()))
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def on_page_markdown(markdown: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs hook signature)
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, render())
