#!/usr/bin/env bash
# Build the bench-only virtualenv for NNCodec 2.1.3 (ISO/IEC 15938-17, DeepCABAC): bench/.nncodec-venv.
#
# NNCodec 2.1.3 requires numpy<2 and cbdnet pins numpy 2.x, so it cannot live in cbdnet's environment or in
# the `bench` extra. This venv has its own numpy 1.26.4 and NNCodec's other dependencies (pinned in
# bench/nncodec-requirements.txt, installed with --no-deps), and reuses the torch 2.14.1 / torchvision of
# cbdnet's venv (default: the repository's .venv) through a .pth file, so no second multi-GB torch is installed.
# A .pth entry is appended to sys.path AFTER the venv's own site-packages, so the venv's numpy 1.26.4 wins.
# NNCodec builds a C++ extension (DeepCABAC, pybind11): about 5 minutes on 2 cores.
#
# usage: bash bench/nncodec_env.sh [TORCH_VENV]     (rerunning it reuses an existing venv)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/.nncodec-venv"
torch_venv="${1:-$here/../.venv}"
torch_site="$("$torch_venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
base_python="$("$torch_venv/bin/python" -c 'import sys; print(sys._base_executable)')"

[ -x "$venv/bin/python" ] || "$base_python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
# everything is installed before the torch path is added, so pip never sees (or touches) cbdnet's packages
rm -f "$venv"/lib/python3*/site-packages/zz_cbdnet_torch.pth
"${pip[@]}" install --no-deps -r "$here/nncodec-requirements.txt"
"${pip[@]}" install --no-deps nncodec==2.1.3
own_site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$torch_site" > "$own_site/zz_cbdnet_torch.pth"

"$venv/bin/python" - <<'PY'
import numpy, torch, torchvision
from nncodec.nn import encode, decode  # noqa: F401  (the documented data-free entry points)
import nncodec.extensions.deepCABAC  # noqa: F401
from importlib.metadata import version
assert numpy.__version__.startswith("1."), numpy.__version__
print(f"nncodec {version('nncodec')}, numpy {numpy.__version__} ({numpy.__file__}), torch {torch.__version__}, "
      f"torchvision {torchvision.__version__}: torch.from_numpy ok = {torch.from_numpy(numpy.ones(3)).sum().item() == 3}")
PY
