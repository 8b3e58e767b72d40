"""The paper's five networks through compress -> save -> load -> verify, on seeded *random* weights (no
pretrained ImageNet/COCO weights can be downloaded here), recording per network: parameters covered by CBD
codes, bits/weight, .cbd file size, compression time on this machine, and whether the reloaded model's
output equals that of the float model with the decoded weights set directly.

    PYTHONPATH=src python bench/zoo.py [ARCH ...] [--threads 1] [--planes 5] [--bottleneck 0.3]

Random weights are roughly Gaussian, not a trained network's distribution: bits/weight and time are those of
random weights, and say so in the output.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from cbdnet import CBDConfig, compress, load, save, verify  # noqa: E402  # noqa: E402
from cbdnet.nn import CBDModule  # noqa: E402
from cbdnet.zoo.models import build  # noqa: E402

ZOO = {"resnet18": (1, 3, 224, 224), "vgg16": (1, 3, 224, 224), "densenet121": (1, 3, 224, 224),
       "ssd300": (1, 3, 300, 300), "segnet": (1, 3, 180, 240), "segnet-basic": (1, 3, 180, 240)}


def outputs(model: torch.nn.Module, shape: tuple[int, ...]):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(list(x)) if shape[2] == 300 else model(x)


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))


def run(arch: str, planes: int, bottleneck: float, check: bool, fallback: str = "distortion") -> dict:
    torch.manual_seed(0)
    model = build(arch).eval()
    total = sum(p.numel() for p in model.parameters())
    reference = copy.deepcopy(model) if check else None
    start = time.perf_counter()
    model, report = compress(model, CBDConfig(planes=planes, bottleneck=bottleneck, fallback=fallback), progress=False)
    seconds = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{arch}.cbd"
        file_bytes = save(model, path, arch=arch)
        problems = verify(path)
        equal = None
        if check:
            for name, module in model.named_modules():
                if isinstance(module, CBDModule):
                    reference.get_submodule(name).weight.data.copy_(module.weight.data)
            equal = same(outputs(load(path), ZOO[arch]), outputs(reference, ZOO[arch]))
    row = {"arch": arch, "weights": "random (seed 0)", "params_total": total, "params_covered": report.params,
           "covered_fraction": report.params / total, "bits_per_weight": report.bits_per_weight,
           "file_bytes": file_bytes, "fp32_bytes": 4 * total, "compress_seconds": seconds,
           "verify_ok": not problems, "reload_equal": equal, "cbd_layers": len(report.layers),
           "uniform_layers": sum(layer.mode == "uniform" for layer in report.layers), "fallback": fallback,
           "float_layers": sorted({f"{f['type']}: {f['reason']}" for f in report.float_layers}),
           "float_layer_params": sum(f["params"] for f in report.float_layers)}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("archs", nargs="*", default=["resnet18", "vgg16", "densenet121", "ssd300", "segnet"])
    parser.add_argument("--planes", type=int, default=5)
    parser.add_argument("--bottleneck", type=float, default=0.3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--fallback", choices=("distortion", "size"), default="distortion")
    parser.add_argument("--no-check", action="store_true", help="skip the reload-equality forward passes")
    parser.add_argument("--json", default="bench/out/zoo.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# cbdnet zoo bench, J={args.planes}, bottleneck={args.bottleneck}, fallback={args.fallback}, "
          f"RANDOM weights (seed 0), "
          f"{args.threads} thread(s), {os.cpu_count()} CPUs, {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"{'arch':<13} {'params':>11} {'covered':>11} {'cov%':>6} {'bits/w':>7} {'file MB':>8} {'fp32 MB':>8} "
          f"{'ratio':>6} {'time s':>7} verify reload uniform")
    rows = []
    for arch in args.archs:
        row = run(arch, args.planes, args.bottleneck, not args.no_check, args.fallback)
        rows.append(row)
        print(f"{arch:<13} {row['params_total']:>11,} {row['params_covered']:>11,} "
              f"{100 * row['covered_fraction']:>5.2f}% {row['bits_per_weight']:>7.3f} {row['file_bytes'] / 1e6:>8.2f} "
              f"{row['fp32_bytes'] / 1e6:>8.2f} {row['fp32_bytes'] / row['file_bytes']:>6.2f} "
              f"{row['compress_seconds']:>7.1f} {'ok' if row['verify_ok'] else 'FAIL':>6} "
              f"{row['reload_equal']} {row['uniform_layers']}/{row['cbd_layers']}", flush=True)
        for reason in row["float_layers"]:
            print(f"    float: {reason}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
