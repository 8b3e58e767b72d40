"""Packaging: the wheel built from this tree installs like a library into an environment that already has torch
(kept, not replaced), its metadata declares ranges, an SPDX licence and the LICENSE file, and the build prints
no deprecation warning. ``__version__`` comes from the installed metadata.

The environment "with torch already installed" is a fresh venv whose site-packages has a ``.pth`` pointing at a
folder of links to this interpreter's installed distributions, every one but cbdnet's own: so the fresh venv
sees exactly the project's torch, torchvision, numpy, ... and no cbdnet until the wheel is installed. pip runs
with ``--no-index`` and no configuration: it can only keep what is there, never fetch or replace it."""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment minus anything that would put this tree's sources or another package source in reach."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    env.update({"PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}, **extra)
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, str]:
    """The wheel, built with setuptools' PEP 517 backend from a copy of the tree (so the build writes nothing
    into the checkout), and everything the build printed."""
    work = tmp_path_factory.mktemp("build")
    tree = work / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    dist = work / "dist"
    dist.mkdir()
    run = subprocess.run([sys.executable, "-W", "default", "-c",
                          "import sys; from setuptools import build_meta; print(build_meta.build_wheel(sys.argv[1]))",
                          str(dist)], cwd=tree, env=_clean_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    wheel = dist / run.stdout.strip().splitlines()[-1]
    assert wheel.is_file()
    return wheel, run.stdout + run.stderr


def _metadata(wheel: Path):
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        licences = [n for n in zf.namelist() if n.endswith(".dist-info/licenses/LICENSE")]
        return email.parser.Parser().parsestr(zf.read(name).decode()), licences, zf.namelist()


def test_wheel_metadata_declares_ranges_spdx_licence_and_builds_without_deprecation(built):
    wheel, log = built
    meta, licences, names = _metadata(wheel)
    assert meta["Name"] == "cbdnet" and meta["Version"] == PYPROJECT["project"]["version"]
    assert meta["License-Expression"] == "MIT" and meta.get_all("License-File") == ["LICENSE"] and licences
    requires = [r for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    assert len(requires) == len(PYPROJECT["project"]["dependencies"])
    assert not [r for r in requires if "==" in r], requires  # ranges, not exact pins
    torch_req = next(r for r in requires if r.startswith("torch") and not r.startswith("torchvision"))
    assert ">=" in torch_req and "<3" in torch_req
    assert "cbdnet/py.typed" in names and "cbdnet/_version.py" in names
    assert "deprecat" not in log.lower(), log  # e.g. setuptools' banner on a `license = {text = ...}` table


def test_constraints_pin_every_runtime_dependency_within_its_range():
    """constraints.txt (what make and CI install) pins each declared dependency exactly, inside its range."""
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            assert len(req.specifier) == 1 and next(iter(req.specifier)).operator == "==", line
            pins[req.name.lower()] = next(iter(req.specifier)).version
    deps = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    deps += [Requirement(d) for d in PYPROJECT["project"]["optional-dependencies"]["dev"]]
    for dep in deps:
        assert dep.name.lower() in pins, f"{dep.name} is not pinned in constraints.txt"
        assert dep.specifier.contains(pins[dep.name.lower()]), f"{dep.name}=={pins[dep.name.lower()]} not in {dep}"
        for extra in dep.extras:  # dask[distributed]: pip constraints cannot name extras, so the extra's own pin
            assert extra in pins


def _env_with_torch(root: Path) -> Path:
    """A fresh venv (no pip) that sees this interpreter's installed packages, cbdnet's own excluded."""
    deps = root / "deps"
    deps.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if "cbdnet" in entry.name.lower() or entry.suffix == ".pth" or entry.name == "__pycache__":
            continue
        (deps / entry.name).symlink_to(entry)
    fresh = root / "fresh"
    venv.EnvBuilder(with_pip=False).create(fresh)
    fresh_python = fresh / "bin" / "python"
    fresh_site = subprocess.run([str(fresh_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                capture_output=True, text=True, check=True, env=_clean_env()).stdout.strip()
    (Path(fresh_site) / "_project_packages.pth").write_text(f"{deps}\n")
    return fresh


@pytest.mark.slow
def test_wheel_installs_into_an_env_with_torch_and_keeps_it(built, tmp_path):
    wheel, _ = built
    fresh = _env_with_torch(tmp_path)
    python, pip = fresh / "bin" / "python", [sys.executable, "-m", "pip", "--python", str(fresh / "bin" / "python")]
    probe = "import importlib.metadata as m, torch; print(torch.__file__, m.version('torch'))"
    before = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=_clean_env(), cwd=tmp_path)
    assert before.returncode == 0, before.stderr[-2000:]  # torch is there before cbdnet
    missing = subprocess.run([str(python), "-c", "import cbdnet"], capture_output=True, env=_clean_env(), cwd=tmp_path)
    assert missing.returncode != 0  # and cbdnet is not

    install = subprocess.run([*pip, "install", "--no-index", "--find-links", str(wheel.parent), "cbdnet"],
                             capture_output=True, text=True, env=_clean_env(), cwd=tmp_path, timeout=300)
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    assert "Successfully installed cbdnet-" in install.stdout and "Uninstalling" not in install.stdout
    after = subprocess.run([str(python), "-c", probe], capture_output=True, text=True, env=_clean_env(), cwd=tmp_path)
    assert after.stdout == before.stdout  # the same torch, same place, same version

    version = subprocess.run([str(fresh / "bin" / "cbdnet"), "--version"], capture_output=True, text=True,
                             env=_clean_env(), cwd=tmp_path, timeout=120)
    assert version.returncode == 0, version.stderr[-2000:]
    assert version.stdout.strip() == f"cbdnet {PYPROJECT['project']['version']}"
    where = subprocess.run([str(python), "-c", "import cbdnet; print(cbdnet.__file__, cbdnet.__version__)"],
                           capture_output=True, text=True, env=_clean_env(), cwd=tmp_path)
    path, reported = where.stdout.split()
    assert Path(path).is_relative_to(fresh) and reported == PYPROJECT["project"]["version"]

    check = subprocess.run([*pip, "check"], capture_output=True, text=True, env=_clean_env(), cwd=tmp_path)
    assert "cbdnet" not in check.stdout.lower(), check.stdout  # every requirement of cbdnet is met as installed


def test_version_comes_from_the_installed_metadata():
    from importlib.metadata import version

    import cbdnet
    from cbdnet._version import __version__

    assert cbdnet.__version__ == __version__ == version("cbdnet")
