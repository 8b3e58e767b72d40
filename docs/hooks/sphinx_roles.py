"""MkDocs hook: Sphinx cross-reference roles in cbdnet's docstrings become links in the API reference.

The docstrings are written for Sphinx (``:class:`CBDConfig```, ``:func:`~cbdnet.codec.gf2.rank```). Markdown
renders such a role as the role's name followed by a code span; this hook finds that pattern in every page's
HTML and replaces it with an *optional* mkdocs-autorefs reference to the object it names: a link where the API
reference documents that object, the plain code span where it does not (a private helper), and never a
warning, so ``mkdocs build --strict`` stays meaningful for the links the pages write themselves.
"""

from __future__ import annotations

import html
import re
from functools import lru_cache
from pathlib import Path

ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj|const):<code>(~?)(\.*[A-Za-z_][\w.]*)(\(\))?</code>")
SRC = Path(__file__).resolve().parents[2] / "src"


@lru_cache(maxsize=1)
def _paths() -> tuple[frozenset[str], dict[str, list[str]]]:
    """Every object path in the cbdnet package, and an index from each dotted suffix to the paths ending so."""
    import griffe

    root = griffe.load("cbdnet", search_paths=[str(SRC)], resolve_aliases=False)
    paths: set[str] = set()

    def walk(obj) -> None:
        for member in obj.members.values():
            paths.add(member.path)
            if not member.is_alias and (member.is_module or member.is_class):
                walk(member)

    paths.add(root.path)
    walk(root)
    by_suffix: dict[str, list[str]] = {}
    for path in paths:
        parts = path.split(".")
        for i in range(1, len(parts)):
            by_suffix.setdefault(".".join(parts[i:]), []).append(path)
    for candidates in by_suffix.values():
        candidates.sort(key=lambda p: (p.count("."), p))  # the shortest path is the public one (cbdnet.compress)
    return frozenset(paths), by_suffix


def resolve(target: str) -> str | None:
    """The full path of the object a role names, or None where the package has no such object. A relative name
    (``.v2``, Sphinx's "this package" form) is looked up by its dotted suffix."""
    paths, by_suffix = _paths()
    target = target.lstrip(".")
    if target in paths:
        return target
    if f"cbdnet.{target}" in paths:
        return f"cbdnet.{target}"
    candidates = by_suffix.get(target)
    return candidates[0] if candidates else None


def _replace(match: re.Match) -> str:
    tilde, target, call = match.group(1), match.group(2), match.group(3) or ""
    shown = (target.rsplit(".", 1)[-1] if tilde else target.lstrip(".")) + call
    code = f"<code>{shown}</code>"
    path = resolve(target)
    if path is None:
        return code
    return f'<autoref identifier="{html.escape(path)}" optional>{code}</autoref>'


def on_page_content(content: str, page, config, files) -> str:  # noqa: ARG001 (MkDocs hook signature)
    return ROLE.sub(_replace, content)
