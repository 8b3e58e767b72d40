"""FP32 vs CBD mIoU of the trained SegNet-Basic on the CamVid test split (../shared, 240x180).

    PYTHONPATH=src python bench/segnet_table.py [--weights models/segnet_basic_camvid.pt] [--threads 1]

Each setting compresses a fresh copy of the float model (the ``cbdnet compress`` path), writes the .cbd under
bench/out/, reloads it from the file and evaluates the reloaded model, so the figures are those of the file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cbdnet import CBDConfig, UniformConfig, compress, load, save  # noqa: E402  # noqa: E402
from cbdnet.zoo.data import load_spec  # noqa: E402
from cbdnet.zoo.metrics import evaluate_segmentation  # noqa: E402
from cbdnet.zoo.models import build, load_weights  # noqa: E402

# (method, J, bottleneck, layers kept in float, fallback rule). The first conv (3->64, 1,728 weights) is the one
# layer whose composite J=5 code costs this net mIoU (measured layer by layer): the distortion rule (default)
# stores it uniform; the paper's size rule keeps its composite code; the table also shows it kept in float.
FIRST = ("encoders.0.0",)
SETTINGS = [("cbd", 5, 0.3, (), "distortion"), ("cbd", 4, 0.3, (), "distortion"), ("cbd", 3, 0.3, (), "distortion"),
            ("cbd", 6, 0.3, (), "distortion"), ("uniform", 4, 0.3, (), "distortion"),
            ("uniform", 5, 0.3, (), "distortion"),
            ("cbd", 5, 0.3, (), "size"), ("cbd", 4, 0.3, (), "size"), ("cbd", 5, 0.3, FIRST, "size")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(ROOT / "models/segnet_basic_camvid.pt"))
    parser.add_argument("--data", default=f"camvid-npz:{ROOT.parent / 'shared/data/camvid_240x180.npz'}:test")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench/out"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    data = load_spec(args.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def fresh():
        return load_weights(build("segnet-basic"), args.weights).eval()

    fp32 = evaluate_segmentation(fresh(), data, progress=False)
    print(f"# SegNet-Basic on {data.name} (n={len(data)}), weights {args.weights}; {os.cpu_count()} CPUs, "
          f"{args.threads} thread(s), {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC")
    split = args.data.rsplit(":", 1)[-1] if args.data.count(":") >= 2 else "test"
    print(f"| setting | bits/weight (coded layers) | bits/weight (all conv weights) | file bytes | {split} mIoU | "
          "pixel acc | mIoU drop (points) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| FP32 | 32 | 32 | {os.path.getsize(args.weights):,} (state dict) | {fp32['miou']:.4f} | "
          f"{fp32['pixel_acc']:.4f} | - |", flush=True)
    rows = [{"setting": "fp32", **fp32}]
    for method, planes, bottleneck, skip, fallback in SETTINGS:
        start = time.perf_counter()
        model, report = compress(fresh(), UniformConfig(planes=planes) if method == "uniform" else
                                 CBDConfig(planes=planes, bottleneck=bottleneck, fallback=fallback), skip=skip,
                                 progress=False)
        kept = sum(model.get_submodule(name).weight.numel() for name in skip)
        overall = (report.weight_bits + 32 * kept) / (report.params + kept)
        path = out / f"segnet_basic_{method}_J{planes}_b{bottleneck}_{fallback}{'_skip' if skip else ''}.cbd"
        size = save(model, path, arch="segnet-basic")
        seconds = time.perf_counter() - start
        scores = evaluate_segmentation(load(path), data, progress=False)
        label = f"CBD J={planes}, b={bottleneck}" if method == "cbd" else f"uniform J={planes}"
        label += ", paper's size rule" if method == "cbd" and fallback == "size" else ""
        label += f", {'+'.join(skip)} in float" if skip else ""
        print(f"| {label} | {report.bits_per_weight:.3f} | {overall:.3f} | {size:,} | {scores['miou']:.4f} | "
              f"{scores['pixel_acc']:.4f} | {100 * (fp32['miou'] - scores['miou']):.2f} |", flush=True)
        rows.append({"setting": label, "bits_per_weight": report.bits_per_weight, "bits_per_weight_all": overall,
                     "file_bytes": size,
                     "compress_seconds": seconds, **scores})
    (out / "segnet_table.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
