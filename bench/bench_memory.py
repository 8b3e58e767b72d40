"""Memory of a loaded model: RSS and tensor bytes of the FP32 model, of ``cbdnet.load`` (float runtime) and of
the int8 runtime (``cbdnet.load(..., runtime="int8")``), each measured in a fresh subprocess.

    PYTHONPATH=src nice python bench/bench_memory.py [--models resnet18 convnext_tiny] [--dir /tmp/cbdnet_mem]

Files: ``torchvision:NAME`` with random (seeded) weights, compressed with ``cbdnet.RTNConfig(bits=4)`` (no
calibration) and saved under ``--dir`` (reused when present). Each measurement is a new Python process:
RSS after the imports (baseline), then after building the model (FP32: ``cbdnet.zoo.build``, its random
weights) or after ``cbdnet.load``; the figure is the growth over the baseline (``/proc/self/statm``, no
``malloc_trim``: what a user sees). Tensor bytes: parameters + buffers (+ each layer's stored code, the packed
bit planes and scales, for a ``cbdnet.load`` model; + quantized weights for int8).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header  # noqa: E402

CALIB_BATCHES = 4


def rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def code_bytes(model) -> int:
    from cbdnet.nn import CBDModule

    held = [m.__dict__.get("_code") for m in model.modules() if isinstance(m, CBDModule)]  # not re-read ones
    return sum(sum(t.nbytes for t in code.tensors().values()) for code in held if code is not None)


def tensor_bytes(model) -> int:
    from cbdnet.runtime import model_bytes

    return model_bytes(model)


def measure(arch: str, mode: str, path: str) -> dict:
    """One measurement (run in a fresh process)."""
    import gc

    import torch

    import cbdnet
    from cbdnet.zoo import build

    torch.set_num_threads(1)
    gc.collect()
    base = rss_mb()
    if mode == "fp32":
        torch.manual_seed(0)
        model = build(f"torchvision:{arch}").eval()
        extra = 0
    elif mode == "load":
        model = cbdnet.load(path)
        extra = code_bytes(model)
    else:
        size = 224
        calib = [torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(i))
                 for i in range(CALIB_BATCHES)]
        base = rss_mb()
        model = cbdnet.load(path, runtime="int8", calibration=calib)
        del calib
        extra = 0
    gc.collect()
    grown = rss_mb() - base
    return {"arch": arch, "mode": mode, "rss_mb": round(grown, 1), "tensor_bytes": tensor_bytes(model) + extra,
            "code_bytes": extra}


def prepare(arch: str, folder: Path) -> Path:
    import torch

    import cbdnet
    from cbdnet.zoo import build

    path = folder / f"{arch}_rtn4.cbd"
    if not path.exists():
        torch.manual_seed(0)
        model = build(f"torchvision:{arch}").eval()
        cbdnet.compress(model, cbdnet.RTNConfig(bits=4), progress=False)
        cbdnet.save(model, path)
    return path


def child(arch: str, mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", arch, mode, str(path)], capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "convnext_tiny"])
    parser.add_argument("--modes", nargs="+", default=["fp32", "load", "int8"])
    parser.add_argument("--dir", default="/tmp/cbdnet_mem")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    print(header())
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    print("| model | FP32 model: RSS growth, tensor bytes | cbdnet.load: RSS growth, tensor bytes (codes) | "
          "int8 runtime: RSS growth, tensor bytes |")
    print("| --- | --- | --- | --- |")
    for arch in args.models:
        path = prepare(arch, folder)
        rows = {mode: child(arch, mode, path) for mode in args.modes}
        fp32 = rows.get("fp32", {}).get("tensor_bytes")
        cells = []
        for mode in ("fp32", "load", "int8"):
            row = rows.get(mode)
            if row is None:
                cells.append("-")
                continue
            ratio = f" ({row['tensor_bytes'] / fp32:.3f}× FP32)" if fp32 else ""
            codes = f", codes {row['code_bytes'] / 2**20:.1f} MiB" if row["code_bytes"] else ""
            cells.append(f"+{row['rss_mb']:.0f} MB, {row['tensor_bytes'] / 2**20:.1f} MiB{ratio}{codes}")
        print(f"| {arch} ({path.stat().st_size / 2**20:.1f} MiB file) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
