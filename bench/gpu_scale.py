"""The calibrated budget on a GPU: torchvision ResNet-50 (random, seeded weights), N generated calibration
images, ``--target-bits 3.0 --calib --device cuda``, through the CLI as a user runs it.

    PYTHONPATH=src python bench/gpu_scale.py [--images 1024] [--arch torchvision:resnet50] [--device cuda]
        [--target-bits 3.0] [--workdir DIR] [--extra "--no-gptq"]

Writes N random 224x224 PNG images into an ``imagefolder:`` (4 classes; nothing is downloaded), runs
``cbdnet compress`` in a child process, and prints the command, the machine (CPU, GPU, torch/CUDA versions),
the wall time, the child's peak RSS, the peak GPU memory the child reports (``torch.cuda.max_memory_allocated``
read in the child via ``CBDNET_BENCH_GPU_PEAK``) and the file's bits per weight and coded share from its JSON
report. The issue's target: ResNet-50 with 1,024 images at 3.0 bits/weight in at most 3 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# run in the child: cbdnet's CLI, then the peak GPU memory it used, as one JSON line on stderr
CHILD = """
import atexit, json, sys, torch
def _peak():
    if torch.cuda.is_available():
        sys.stderr.write("CBDNET_BENCH_GPU_PEAK " + json.dumps(torch.cuda.max_memory_allocated()) + "\\n")
atexit.register(_peak)
from cbdnet.cli import main
sys.exit(main(sys.argv[1:]))
"""


def make_images(root: Path, count: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index in range(count):
        folder = root / f"c{index % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(folder / f"{index}.png")


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    return (f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, {gpu}, torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, Python {platform.python_version()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="torchvision:resnet50")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--target-bits", default="3.0")
    parser.add_argument("--workdir", default=None, help="keep the images and outputs here (default: a temp dir)")
    parser.add_argument("--extra", default="", help="more compress flags, e.g. '--no-gptq'")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="cbdnet-gpu-"))
    images = work / f"calib{args.images}"
    if not images.exists():
        make_images(images, args.images)
    out, report = work / "model.cbd", work / "model.json"
    command = ["compress", "--arch", args.arch, "--weights", "random", "--seed", "0", "--target-bits",
               args.target_bits, "--calib", f"imagefolder:{images}", "--device", args.device, "-o", str(out),
               "--json", str(report), "--force", "--quiet", *shlex.split(args.extra)]
    print("command: cbdnet " + " ".join(shlex.quote(part) for part in command))
    print("machine:", machine())
    start = time.perf_counter()
    child = subprocess.run([sys.executable, "-c", CHILD, *command], capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    gpu_peak = next((int(line.split()[1]) for line in child.stderr.splitlines()
                     if line.startswith("CBDNET_BENCH_GPU_PEAK")), None)
    errors = [line for line in child.stderr.splitlines() if not line.startswith("CBDNET_BENCH_GPU_PEAK")]
    if child.returncode != 0:
        print(f"failed (exit {child.returncode}) after {wall:.1f} s: {' | '.join(errors[-3:])}")
        return 1
    result = json.loads(report.read_text())
    coded = result["params"] / (result["params"] + sum(row["params"] for row in result.get("float_layers", [])))
    print(f"images {args.images}, wall {wall:.1f} s, peak RSS {peak_rss:,.0f} MiB, "
          f"peak GPU memory {'n/a' if gpu_peak is None else f'{gpu_peak / 2**20:,.0f} MiB'}")
    print(f"file {result['file_bytes']:,} bytes = {result['file_bits_per_weight']:.3f} bits/weight, "
          f"{result['params']:,} weights coded ({100 * coded:.2f} % of the parameters)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
