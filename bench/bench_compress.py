"""Whole-model compression time: torchvision ResNet-18 and VGG-16 (random, seeded weights) on this machine.

    PYTHONPATH=src python bench/bench_compress.py [--models resnet18,vgg16] [--workers 2] [--save DIR]

Builds each model with ``weights=None`` after ``torch.manual_seed(seed)`` (nothing is downloaded), runs
``cbdnet.compress`` with a per-layer progress bar on stderr, and prints the wall time, the slowest layers,
the bits per weight and the operation counts. ``--save DIR`` also writes ``DIR/<model>.cbd``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torchvision

import cbdnet
from cbdnet.nn.walk import default_workers

INPUTS = {"resnet18": (1, 3, 224, 224), "vgg16": (1, 3, 224, 224)}  # ImageNet-sized input, batch 1
TARGETS = {"resnet18": 60.0, "vgg16": 600.0}


def build(name: str, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return getattr(torchvision.models, name)(weights=None).eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,vgg16")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--planes", type=int, default=5)
    parser.add_argument("--bottleneck", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", help="directory for the .cbd files")
    args = parser.parse_args()
    print("# command: python " + " ".join(sys.argv))
    print(f"# date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
    print(f"# machine: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, workers {args.workers or default_workers()}, "
          f"load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name in args.models.split(","):
        model = build(name, args.seed)
        start = time.perf_counter()
        model, report = cbdnet.compress(model, cbdnet.CBDConfig(planes=args.planes, bottleneck=args.bottleneck),
                                        workers=args.workers, progress=True, input_shape=INPUTS[name])
        seconds = time.perf_counter() - start
        calls = sum(layer.rank_calls for layer in report.layers)
        print(f"{name}: compress {seconds:.1f} s (target <= {TARGETS.get(name, float('nan')):.0f} s) for "
              f"{len(report.layers)} layers, {report.params:,} weights, {report.bits_per_weight:.3f} bits/weight, "
              f"{calls} eliminations")
        for layer in sorted(report.layers, key=lambda item: -item.seconds)[:4]:
            print(f"    {layer.name:<24} {layer.h}x{layer.w:<6} {layer.mode:<7} {layer.seconds:6.1f} s "
                  f"({layer.rank_calls} eliminations)")
        ops = report.ops()
        print(f"    storage {ops['storage_bits'] / 8 / 2**20:.1f} MiB of weight codes (fp32 "
              f"{ops['fp32_storage_bits'] / 8 / 2**20:.1f} MiB); per {INPUTS[name]} sample: dense "
              f"{ops['dense_macs'] / 1e9:.2f} G MACs (= FP32), bit-serial {ops['bitserial_adds'] / 1e9:.2f} G adds "
              f"+ {ops['bitserial_mults'] / 1e6:.1f} M mults")
        if args.save:
            path = Path(args.save) / f"{name}.cbd"
            start = time.perf_counter()
            size = cbdnet.save(model, path)
            print(f"    saved {path} ({size / 2**20:.1f} MiB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
