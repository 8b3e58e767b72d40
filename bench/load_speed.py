"""Load time of format-2 ``.cbd`` files against format 1 (same model, same codes), random weights.

    PYTHONPATH=src python bench/load_speed.py [--arch resnet18 vgg16] [--bits 4] [--repeat 3] [--kernel-contexts]

Each model is compressed once (per-channel RTN, fast), written in both formats, and ``cbdnet.load`` is timed
alternately on the two files (interleaved); prints the median seconds and the file sizes.

Random kernels have no structure for kernel contexts to use, so the writer keeps their levels under one table
(``ans``). ``--kernel-contexts`` writes a third file with every convolution of kh*kw > 1 forced to ``ans-kernel``
(``KERNEL_MIN_SAVING`` set so that the writer keeps the kernel coding even where it is larger), as a trained
network's file would have them, and times it in the same interleaved loop: the decoding cost of kernel contexts
at full size, which random weights would otherwise hide."""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import cbdnet
from cbdnet.codec import stream
from cbdnet.format.cbdfile import atomic_write, encode_file
from cbdnet.zoo.models import build


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", nargs="+", default=["resnet18", "vgg16"])
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--kernel-contexts", action="store_true",
                        help="also time a file with every kh*kw > 1 convolution coded 'ans-kernel'")
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
            if args.kernel_contexts:
                paths["2k"] = Path(folder) / f"{arch}.v2-kernel.cbd"
                atomic_write(paths["2k"], _forced_kernel_file(arch, args.bits))
            times = {v: [] for v in paths}
            for _ in range(args.repeat):
                for version, path in paths.items():
                    start = time.perf_counter()
                    cbdnet.load(path)
                    times[version].append(time.perf_counter() - start)
            sizes = {v: p.stat().st_size for v, p in paths.items()}
            line = (f"{arch} rtn{args.bits}/ch, {report.params:,} weights: "
                    f"v1 {sizes[1]:,} B load {statistics.median(times[1]):.3f} s | "
                    f"v2 {sizes[2]:,} B ({8 * sizes[2] / report.params:.3f} file bits/w) "
                    f"load {statistics.median(times[2]):.3f} s")
            if "2k" in paths:
                line += (f" | v2 all ans-kernel {sizes['2k']:,} B ({8 * sizes['2k'] / report.params:.3f}) "
                         f"load {statistics.median(times['2k']):.3f} s")
            print(line)


def _forced_kernel_file(arch: str, bits: int) -> bytes:
    """The same model and codes as the timed files (same seed), written with every eligible convolution coded
    ``ans-kernel``, however large (compressed again under the changed rule: a code keeps the stream it was
    first coded with, and the report codes every layer)."""
    kept = stream.KERNEL_MIN_SAVING
    stream.KERNEL_MIN_SAVING = -1e9
    try:
        torch.manual_seed(0)
        model, _ = cbdnet.compress(build(arch).eval(), cbdnet.RTNConfig(bits=bits), progress=False)
        return encode_file(model, arch=arch, version=2)
    finally:
        stream.KERNEL_MIN_SAVING = kept


if __name__ == "__main__":
    main()
