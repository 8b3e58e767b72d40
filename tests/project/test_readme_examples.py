"""The README's Python and command-line examples run verbatim on a machine without ``../shared``.

Each block is taken from README.md as it is written and run in a fresh temporary folder, with
``CBDNET_SHARED`` and torch's cache pointing at empty folders (so no data, checkpoint or download can help), and
``cbdnet`` on the PATH meaning this interpreter's cbdnet.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def _blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text(encoding="utf-8")) if lang == language]


def python_example() -> str:
    """The README's Python example: the python block that compresses a model."""
    found = [block for block in _blocks("python") if "cbdnet.compress(" in block]
    assert len(found) == 1, f"expected one Python example calling cbdnet.compress in README.md, found {len(found)}"
    return found[0]


def cli_example() -> list[str]:
    """The README's command-line example: the bash block whose every line is a ``cbdnet`` command."""
    found = [block for block in _blocks("bash")
             if block.strip() and all(line.startswith("cbdnet ") for line in block.strip().splitlines())]
    assert len(found) == 1, f"expected one block of cbdnet commands in README.md, found {len(found)}"
    return found[0].strip().splitlines()


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A working folder and an environment in which nothing outside it can supply data or weights."""
    work = tmp_path / "work"
    work.mkdir()
    nowhere = tmp_path / "no-shared"  # never created: ../shared is absent
    torch_home = tmp_path / "torch-home"
    torch_home.mkdir()
    shim = tmp_path / "bin"
    shim.mkdir()
    launcher = shim / "cbdnet"
    launcher.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m cbdnet "$@"\n')
    launcher.chmod(0o755)
    env = {**os.environ, "CBDNET_SHARED": str(nowhere), "TORCH_HOME": str(torch_home),
           "PATH": f"{shim}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    return work, env


def _run(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{argv[-1][:200]!r} failed ({result.returncode}):\n{result.stderr[-3000:]}"
    return result


def test_readme_has_both_examples_and_stays_short():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert text.splitlines()[:5] == ["# cbdnet", "", "```", "make demo", "make test"]  # the two commands come first
    assert len(python_example().strip().splitlines()) <= 14
    assert len(cli_example()) <= 4
    assert "../shared" not in python_example() + "\n".join(cli_example())


@pytest.mark.slow
def test_readme_python_example_runs(sandbox):
    work, env = sandbox
    script = work / "example.py"
    script.write_text(python_example(), encoding="utf-8")
    result = _run([sys.executable, str(script)], work, env)
    assert "whole file:" in result.stdout and "paper's code count" in result.stdout  # the table and totals
    assert (work / "squeezenet.cbd").stat().st_size > 1000


@pytest.mark.slow
def test_readme_cli_example_runs(sandbox):
    work, env = sandbox
    for line in cli_example():
        _run(["/bin/sh", "-c", line], work, env)
    report = json.loads((work / "sq.json").read_text())
    assert report["file_bytes"] == (work / "sq.cbd").stat().st_size
    assert 0 < report["file_bits_per_weight"] < 32
    assert (work / "sq.onnx").stat().st_size > 1000
