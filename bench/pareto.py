"""Bits/weight vs top-1 on CIFAR-10 ResNet-20: the paper's algorithm, RTN per channel, RTN per tensor and
cbdnet's best (``--target-bits`` with calibration: GPTQ-rounded per-channel grids, per-layer bits chosen by
predicted calibration loss). Prints a markdown table (with command, machine and date) and writes a PNG.

    PYTHONPATH=src python bench/pareto.py --out docs/pareto_resnet20.png

Bits/weight are counted as the .cbd file stores them (``Report.bits_per_weight``); top-1 is on the 10,000
test images of ../shared; calibration uses only the 1,000 training images of cifar10_calib1000.npz.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import cbdnet  # noqa: E402
from cbdnet.zoo.data import calibration_data, load_spec  # noqa: E402
from cbdnet.zoo.metrics import evaluate_classification  # noqa: E402
from cbdnet.zoo.models import build, load_weights  # noqa: E402


def _evaluate(model, data) -> float:
    return evaluate_classification(model, data, progress=False)["top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=str(ROOT.parent / "shared/models/cifar10_resnet20.th"))
    parser.add_argument("--test", default=str(ROOT.parent / "shared/data/cifar10_test.npz"))
    parser.add_argument("--calib", default=str(ROOT.parent / "shared/data/cifar10_calib1000.npz"))
    parser.add_argument("--out", default=str(ROOT / "docs/pareto_resnet20.png"))
    parser.add_argument("--paper-planes", type=int, nargs="*", default=[3, 4, 5, 6])
    parser.add_argument("--rtn-channel", type=int, nargs="*", default=[3, 4, 5, 6])
    parser.add_argument("--rtn-tensor", type=int, nargs="*", default=[4, 5, 6, 8])
    parser.add_argument("--targets", type=float, nargs="*", default=[2.5, 3.0, 3.5, 4.0, 5.0])
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    test = load_spec(f"cifar10-npz:{args.test}")
    base = build("cifar-resnet20")
    load_weights(base, args.weights)
    base.eval()
    rows = [("FP32", "float", 32.0, _evaluate(base, test))]

    def run(series, label, config, calibration=None):
        model, report = cbdnet.compress(copy.deepcopy(base), config, calibration=calibration, progress=False)
        rows.append((series, label, report.bits_per_weight, _evaluate(model, test)))
        print(f"{series:<24} {label:<22} {rows[-1][2]:7.3f} {rows[-1][3]:.4f}", flush=True)

    for planes in args.paper_planes:
        run("paper (per tensor)", f"J={planes}, b=0.3", cbdnet.CBDConfig(planes=planes, fallback="size"))
    for planes in args.paper_planes:
        run("cbd, distortion rule", f"J={planes}, b=0.3", cbdnet.CBDConfig(planes=planes))
    for bits in args.rtn_channel:
        run("RTN per channel", f"{bits} bits", cbdnet.RTNConfig(bits=bits))
    for bits in args.rtn_tensor:
        run("RTN per tensor", f"{bits} bits", cbdnet.RTNConfig(bits=bits, granularity="tensor"))
    start = time.perf_counter()
    calib = calibration_data(f"cifar10-npz:{args.calib}")
    for target in args.targets:  # the CLI's defaults: GPTQ, bias correction where it lowers the loss
        run("cbdnet --target-bits", f"{target} (calibrated)", cbdnet.BudgetConfig(target_bits=target), calib)
    prep = time.perf_counter() - start
    _table(rows, prep)
    _plot(rows, args.out)


def _table(rows, prep: float) -> None:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"\n`PYTHONPATH=src python bench/pareto.py` on {platform.node()} ({platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, 2-core CPU), {now}; calibration statistics + candidates "
          f"{prep:.0f} s\n")
    print("| method | setting | bits/weight | top-1 |")
    print("| --- | --- | --- | --- |")
    for series, label, bits, top1 in rows:
        print(f"| {series} | {label} | {bits:.3f} | {top1:.4f} |")


def _plot(rows, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    fp32 = next(r[3] for r in rows if r[0] == "FP32")
    for series, marker in (("paper (per tensor)", "s"), ("cbd, distortion rule", "D"), ("RTN per channel", "o"),
                           ("RTN per tensor", "v"), ("cbdnet --target-bits", "*")):
        points = sorted((r[2], r[3]) for r in rows if r[0] == series)
        if points:
            ax.plot(*zip(*points, strict=True), marker=marker, label=series, markersize=9 if marker == "*" else 6)
    ax.axhline(fp32, color="gray", linestyle="--", linewidth=1, label=f"FP32 ({fp32:.4f})")
    ax.set_xlabel("bits / weight (as stored in the .cbd file)")
    ax.set_ylabel("top-1 (CIFAR-10 test, 10k JPEG images)")
    ax.set_title("ResNet-20: accuracy vs storage, training-free")
    ax.set_ylim(max(0.0, min(r[3] for r in rows) - 0.02), fp32 + 0.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
