"""Is the first conv's mIoU cost a matter of error size? Random errors of a code's size on SegNet-Basic's first conv.

For the trained SegNet-Basic, codes the first conv (3->64) alone with the composite code (the paper's size rule)
and with the uniform code at J planes, and compares the mIoU with that of Gaussian perturbations scaled to each
code's exact squared error (several seeds), every other layer in float.
Usage: PYTHONPATH=src python bench/segnet_first_layer_noise.py [--split test] [--planes 5] [--seeds 3]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, header, shared  # noqa: E402

from cbdnet.codec import encode_weight  # noqa: E402
from cbdnet.zoo.data import load_spec  # noqa: E402
from cbdnet.zoo.metrics import evaluate_segmentation  # noqa: E402
from cbdnet.zoo.models import build, load_weights  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", default="test")
    parser.add_argument("--planes", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(header())
    torch.set_grad_enabled(False)
    model = load_weights(build("segnet-basic"), ROOT / "models/segnet_basic_camvid.pt").eval()
    data = load_spec(f"camvid-npz:{shared('data/camvid_240x180.npz')}:{args.split}")
    conv = model.encoders[0][0]
    weight = conv.weight.detach().numpy().copy()

    def miou_with(first: np.ndarray) -> float:
        trial = copy.deepcopy(model)
        trial.encoders[0][0].weight.copy_(torch.from_numpy(first.astype(np.float32)))
        return evaluate_segmentation(trial, data, batch_size=8, progress=False)["miou"]

    print(f"| first conv ({args.split} split, J={args.planes}) | squared error | mIoU |\n| --- | ---: | ---: |")
    print(f"| float | 0 | {miou_with(weight):.4f} |", flush=True)
    for label, kwargs in (("composite code (size rule)", {"fallback": "size"}), ("uniform code", {"mode": "uniform"})):
        decoded = encode_weight(weight, args.planes, 0.3, **kwargs).decode()
        error = float(((decoded - weight) ** 2).sum())
        print(f"| {label} | {error:.5f} | {miou_with(decoded):.4f} |", flush=True)
        for seed in range(args.seeds):
            noise = np.random.default_rng(seed).standard_normal(weight.shape)
            noise *= np.sqrt(error / (noise**2).sum())
            print(f"| Gaussian error of that size, seed {seed} | {error:.5f} | {miou_with(weight + noise):.4f} |",
                  flush=True)


if __name__ == "__main__":
    main()
