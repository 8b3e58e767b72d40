"""The documentation site builds without warnings, and every page renders in a real browser with no broken link.

The site is built afresh (``mkdocs build --strict`` into a temporary folder, as ``make docs`` does); every HTML
page is then opened in headless Chromium, which runs the theme's JavaScript, and the DOM it ends with is checked:
the page has its main heading, and every internal ``href``/``src`` (another page, an image, a stylesheet, a
script, an anchor on this or another page) resolves to a file of the site and, for an anchor, to an element
with that id. Chromium comes from Debian (``scripts/install-system-deps.sh``, which CI runs); the test runs that
script itself where chromium is missing, and skips only where it still cannot be had.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
INSTALL = ROOT / "scripts" / "install-system-deps.sh"
# pages the site must have, and a string that shows each one rendered its real content
EXPECTED = {
    "index.html": "composite binary decomposition",
    "getting-started.html": "Deploy to ONNX Runtime",
    "how-it-works.html": "GF(2)",
    "format.html": "Levels blob",
    "reference/cli.html": "cbdnet compress",
    "reference/api.html": "cbdnet.compress",
    "reference/internals.html": "cbdnet.codec",
    "benchmarks.html": "NNCodec",
    "findings.html": "constant number of bits",
    "changelog.html": "Unreleased",
    "history/benchmarks-log.html": "Benchmark log",
}
# a role in prose that the site's hook did not turn into a link or code (inside a literal block it stays as written)
UNRENDERED_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):<code>")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def _chromium() -> str:
    found = shutil.which("chromium")
    if found is None and INSTALL.exists() and shutil.which("apt-get") and (os.geteuid() == 0 or shutil.which("sudo")):
        subprocess.run(["bash", str(INSTALL)], capture_output=True, timeout=900)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("chromium is not installed and scripts/install-system-deps.sh could not install it "
                    "(it needs root and Debian's package archive)")
    return found


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("the docs extra is not installed (make docs installs it: pip install -e '.[docs]')")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                             "-d", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    return out


class _Page(HTMLParser):
    """The ids, the internal references (tag, attribute, value) and the h1 texts of one rendered page."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.ids: set[str] = set()
        self.refs: list[tuple[str, str, str]] = []
        self.h1: list[str] = []
        self._in_h1 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for key in ("id", "name") if tag == "a" else ("id",):
            if values.get(key):
                self.ids.add(values[key])
        for key in ("href", "src"):
            if values.get(key) is not None:
                self.refs.append((tag, key, values[key]))
        if tag == "h1":
            self._in_h1 = True
            self.h1.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "h1":
            self._in_h1 = False

    def handle_data(self, data: str) -> None:
        if self._in_h1:
            self.h1[-1] += data


def _render(chromium: str, page: Path, profile: Path) -> str:
    result = subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "<html" in result.stdout, f"chromium did not open {page}: {result.stderr[-500:]}"
    return result.stdout


def _is_external(value: str) -> bool:
    parts = urlsplit(value)
    return bool(parts.scheme and parts.scheme != "file") or value.startswith("//")


@pytest.fixture(scope="module")
def rendered(site: Path, tmp_path_factory) -> dict[str, tuple[str, _Page]]:
    chromium = _chromium()
    pages = sorted(p for p in site.rglob("*.html") if "assets" not in p.relative_to(site).parts)
    profiles = tmp_path_factory.mktemp("chromium")

    def one(item: tuple[int, Path]) -> tuple[str, tuple[str, _Page]]:
        index, page = item
        dom = _render(chromium, page, profiles / str(index))
        parsed = _Page()
        parsed.feed(dom)
        return page.relative_to(site).as_posix(), (dom, parsed)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, enumerate(pages)))


@pytest.mark.slow
def test_every_page_renders(rendered):
    missing = sorted(set(EXPECTED) - set(rendered))
    assert not missing, f"pages missing from the site: {missing}"
    for name, (dom, page) in rendered.items():
        if name == "404.html":
            continue
        assert page.h1 and page.h1[0].strip(), f"{name}: no main heading in the rendered page"
        assert "js-focus-visible" in dom, f"{name}: the theme's script did not run"
        if name in EXPECTED:
            assert EXPECTED[name] in dom, f"{name}: {EXPECTED[name]!r} not in the rendered page"
        left = UNRENDERED_ROLE.search(dom)
        assert left is None, f"{name}: a Sphinx role was left unrendered: {left.group(0) if left else ''}"


@pytest.mark.slow
def test_every_internal_link_resolves(site: Path, rendered):
    broken = []
    for name, (_dom, page) in rendered.items():
        here = (site / name).parent
        for tag, attr, value in page.refs:
            if not value or _is_external(value) or value.startswith(("mailto:", "data:", "javascript:", "blob:")):
                continue
            parts = urlsplit(value)
            if parts.scheme == "file":
                target = Path(unquote(parts.path))
            elif parts.path.startswith("/"):  # root-relative (the 404 page's, served from the site's root)
                target = (site / unquote(parts.path).lstrip("/")).resolve()
            elif parts.path:
                target = (here / unquote(parts.path)).resolve()
            else:
                target = (site / name).resolve()
            if target.is_dir():
                target = target / "index.html"
            if site.resolve() not in (target, *target.parents):
                broken.append(f"{name}: <{tag} {attr}={value!r}> points outside the site")
                continue
            if not target.exists():
                broken.append(f"{name}: <{tag} {attr}={value!r}> -> missing {target.relative_to(site.resolve())}")
                continue
            fragment = unquote(parts.fragment)
            if fragment and target.suffix == ".html":
                key = target.relative_to(site.resolve()).as_posix()
                ids = rendered[key][1].ids if key in rendered else set()
                if fragment not in ids:
                    broken.append(f"{name}: <{tag} {attr}={value!r}> -> no element with id {fragment!r} in {key}")
    assert not broken, f"{len(broken)} broken internal links:\n" + "\n".join(broken[:40])


def _subcommands() -> list[str]:
    from cbdnet.cli import build_parser

    parser = build_parser()
    names = [name for action in parser._actions if hasattr(action, "choices") and isinstance(action.choices, dict)
             for name in action.choices]
    assert names, "the parser has no subcommands"
    return names


@pytest.mark.slow
def test_cli_reference_lists_every_subcommand(rendered):
    dom = rendered["reference/cli.html"][0]
    for name in _subcommands():
        assert f"cbdnet {name}" in dom, f"the CLI reference lacks `cbdnet {name}`"


def _hook(name: str):
    spec = importlib.util.spec_from_file_location(f"docs_hook_{name}", ROOT / "docs" / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_hook_renders_each_subcommands_help():
    """Fast twin of the browser tests for the generated CLI page: the hook's Markdown has every subcommand's
    exact --help text, and leaves pages without the marker alone."""
    hook = _hook("cli_reference")
    markdown = hook.on_page_markdown(f"# CLI\n\n{hook.MARKER}\n", None, None, None)
    for name in _subcommands():
        assert f"## `cbdnet {name}`" in markdown
    assert "--target-bits" in markdown and "usage: cbdnet compress" in markdown
    assert hook.on_page_markdown("no marker here", None, None, None) == "no marker here"


def test_sphinx_roles_become_links_or_code():
    hook = _hook("sphinx_roles")
    html = hook.on_page_content(
        "see :class:<code>CBDConfig</code>, :func:<code>~cbdnet.codec.gf2.rank</code>, :mod:<code>.v2</code> and "
        ":func:<code>no_such_thing</code>", None, None, None)
    assert '<autoref identifier="cbdnet.CBDConfig" optional><code>CBDConfig</code></autoref>' in html
    assert '<autoref identifier="cbdnet.codec.gf2.rank" optional><code>rank</code></autoref>' in html
    assert '<autoref identifier="cbdnet.format.v2" optional><code>v2</code></autoref>' in html
    assert "<code>no_such_thing</code>" in html and ":func:" not in html and ":class:" not in html


def test_benchmark_pages_name_no_path_outside_the_repository():
    """The benchmarks (today's page, the historical log and the BENCHMARKS.md pointer) name no absolute path of a
    machine and no folder beside the clone: data and checkpoints are `$DATA`/`$MODELS`."""
    outside = re.compile(r"(?<![\w.$])(/work/|/tmp/|/home/|/root/|\.\./shared|\.\./\.\./)")
    for path in (ROOT / "BENCHMARKS.md", ROOT / "docs" / "benchmarks.md", ROOT / "docs/history/benchmarks-log.md"):
        text = path.read_text(encoding="utf-8")
        found = [line.strip()[:120] for line in text.splitlines() if outside.search(line)]
        assert not found, f"{path.relative_to(ROOT)} names paths outside the repository: {found[:5]}"
