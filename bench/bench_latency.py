"""Loading and inference speed of a compressed torchvision ResNet-18 against its FP32 original, one run.

    PYTHONPATH=src python bench/bench_latency.py [--cbd resnet18.cbd] [--batches 1,32] [--rounds 15]

Compresses a seeded random ResNet-18 (or reads ``--cbd``, which must come from the same seed), times
``cbdnet.load(path, model=skeleton)`` (parse, checksum, decode every layer), then times the FP32 model and
the decoded model in interleaved rounds at each batch size (median per model). The latency ratio is
``fp32 time / decoded time``: 1.0 means the same speed, >= 0.95 is the target.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import cbdnet


def build(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).eval()


def run_time(model: torch.nn.Module, batch: torch.Tensor, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        model(batch)
    return (time.perf_counter() - start) / iterations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cbd", help="a .cbd of bench_compress.py's resnet18 (same seed); else compress now")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--loads", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("# command: python " + " ".join(sys.argv))
    print(f"# date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
    print(f"# machine: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"torch threads {torch.get_num_threads()}, load avg {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    fp32 = build(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.cbd) if args.cbd else Path(tmp) / "resnet18.cbd"
        if not args.cbd:
            compressed, _ = cbdnet.compress(build(args.seed), progress=False)
            cbdnet.save(compressed, path)
        cbdnet.load(path, model=build(args.seed))  # warm the numba kernels (compiled once per machine)
        loads = []
        for _ in range(args.loads):
            skeleton = build(args.seed)
            start = time.perf_counter()
            decoded = cbdnet.load(path, model=skeleton)
            loads.append(time.perf_counter() - start)
        print(f"load {path.name} ({path.stat().st_size / 2**20:.1f} MiB): median {statistics.median(loads):.3f} s, "
              f"min {min(loads):.3f} s over {args.loads} loads (target < 1 s)")
    with torch.inference_mode():
        for size in (int(b) for b in args.batches.split(",")):
            batch = torch.randn(size, 3, 224, 224, generator=torch.Generator().manual_seed(1))
            iterations = 10 if size == 1 else 1
            for model in (fp32, decoded):  # warm-up
                run_time(model, batch, iterations)
            times: dict[str, list[float]] = {"fp32": [], "cbd": []}
            for index in range(args.rounds):  # interleaved, alternating which goes first
                order = [("fp32", fp32), ("cbd", decoded)]
                for key, model in order if index % 2 == 0 else order[::-1]:
                    times[key].append(run_time(model, batch, iterations))
            fp32_ms, cbd_ms = (statistics.median(times[k]) * 1e3 for k in ("fp32", "cbd"))
            print(f"batch {size:>3}: fp32 {fp32_ms:8.2f} ms, decoded {cbd_ms:8.2f} ms, "
                  f"latency ratio fp32/decoded {fp32_ms / cbd_ms:.3f} (target >= 0.95)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
