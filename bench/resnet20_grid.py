"""The paper's algorithm on the pretrained CIFAR-10 ResNet-20: J in {4,5,6} x bottleneck in {0.3,0.5,0.7}.

Prints bits/weight, file bytes and top-1 on the 10k CIFAR-10 test images (JPEG copy in ../shared),
beside FP32 and the plain uniform code at the same J, under both fallback rules (the paper's ``size`` rule and
the ``distortion`` rule, cbdnet's default). Usage: python bench/resnet20_grid.py
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, shared  # noqa: E402

import cbdnet  # noqa: E402
from cbdnet.zoo.data import load_spec  # noqa: E402
from cbdnet.zoo.metrics import evaluate_classification  # noqa: E402
from cbdnet.zoo.models import build, load_weights  # noqa: E402


def main() -> None:
    print(header())
    torch.set_grad_enabled(False)
    model = load_weights(build("cifar-resnet20"), shared("models/cifar10_resnet20.th")).eval()
    data = load_spec(f"cifar10-npz:{shared('data/cifar10_test.npz')}")
    fp32 = evaluate_classification(model, data, progress=False)
    print("\n| setting | bits/weight | file bytes | top-1 | compress s |\n| --- | --- | --- | --- | --- |")
    print(f"| FP32 | 32 | {4 * sum(p.numel() for p in model.parameters()):,} (tensors) | {fp32['top1']:.4f} | - |")
    folder = Path(tempfile.mkdtemp(prefix="cbdnet-grid-"))
    rows = [("cbd", j, b, rule) for rule in ("size", "distortion") for j in (4, 5, 6) for b in (0.3, 0.5, 0.7)]
    rows += [("uniform", j, 0.0, "size") for j in (4, 5, 6)]
    for method, planes, bottleneck, rule in rows:
        start = time.perf_counter()
        compressed, report = cbdnet.compress(
            copy.deepcopy(model), cbdnet.UniformConfig(planes=planes) if method == "uniform"
            else cbdnet.CBDConfig(planes=planes, bottleneck=bottleneck, fallback=rule), progress=False)
        seconds = time.perf_counter() - start
        path = folder / f"{method}_{planes}_{bottleneck}.cbd"
        size = cbdnet.save(compressed, path)
        result = evaluate_classification(cbdnet.load(path), data, progress=False)
        label = f"CBD J={planes}, bottleneck {bottleneck}, {rule} rule" if method == "cbd" \
            else f"uniform J={planes} (baseline)"
        uniform_layers = sum(layer.mode == "uniform" for layer in report.layers)
        label += f" ({uniform_layers} of {len(report.layers)} layers uniform)" if method == "cbd" else ""
        print(f"| {label} | {report.bits_per_weight:.3f} | {size:,} | {result['top1']:.4f} | {seconds:.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
