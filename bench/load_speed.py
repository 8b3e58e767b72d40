"""Load time of format-2 ``.cbd`` files against format 1 (same model, same codes), random weights.

    PYTHONPATH=src python bench/load_speed.py [--arch resnet18 vgg16] [--bits 4] [--repeat 3]

Each model is compressed once (per-channel RTN, fast), written in both formats, and ``cbdnet.load`` is timed
alternately on the two files (interleaved); prints the median seconds and the file sizes."""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import cbdnet
from cbdnet.format.cbdfile import atomic_write, encode_file
from cbdnet.zoo.models import build


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", nargs="+", default=["resnet18", "vgg16"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as folder:
        for arch in args.arch:
            torch.manual_seed(0)
            model, report = cbdnet.compress(build(arch).eval(), cbdnet.RTNConfig(bits=args.bits), progress=False)
            paths = {}
            for version in (1, 2):
                paths[version] = Path(folder) / f"{arch}.v{version}.cbd"
                atomic_write(paths[version], encode_file(model, arch=arch, version=version))
            times = {1: [], 2: []}
            for _ in range(args.repeat):
                for version in (1, 2):
                    start = time.perf_counter()
                    cbdnet.load(paths[version])
                    times[version].append(time.perf_counter() - start)
            sizes = {v: p.stat().st_size for v, p in paths.items()}
            print(f"{arch} rtn{args.bits}/ch, {report.params:,} weights: "
                  f"v1 {sizes[1]:,} B load {statistics.median(times[1]):.3f} s | "
                  f"v2 {sizes[2]:,} B ({8 * sizes[2] / report.params:.3f} file bits/w) "
                  f"load {statistics.median(times[2]):.3f} s")


if __name__ == "__main__":
    main()
