"""SegNet-Basic on CamVid: the first conv alone under the paper's composite code vs the plain uniform code.

The paper's code at J=5/bottleneck 0.3 costs the trained SegNet-Basic 2.88 mIoU points (BENCHMARKS.md), almost
all of it in the first conv (3->64, a 192x9 matrix with rank bound 2). This prints, for that layer, the chosen
scale and planes, and the test mIoU when only that layer uses the uniform J-bit code instead.
Usage: python bench/segnet_first_layer.py
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, header, shared  # noqa: E402

import cbdnet  # noqa: E402
from cbdnet.codec import encode_weight  # noqa: E402
from cbdnet.nn import compress_layers  # noqa: E402
from cbdnet.zoo.data import load_spec  # noqa: E402
from cbdnet.zoo.metrics import evaluate_segmentation  # noqa: E402
from cbdnet.zoo.models import build, load_weights  # noqa: E402

FIRST = "encoders.0.0"


def main() -> None:
    print(header())
    torch.set_grad_enabled(False)
    model = load_weights(build("segnet-basic"), ROOT / "models/segnet_basic_camvid.pt").eval()
    data = load_spec(f"camvid-npz:{shared('data/camvid_240x180.npz')}:test")

    def first_uniform(name, weight):
        mode = "uniform" if name == FIRST else "auto"
        return encode_weight(weight, planes=5, bottleneck=0.3, name=name, mode=mode)

    print("| setting | bits/weight | test mIoU | first conv: mode, a, exponents, rel. error |")
    print("| --- | --- | --- | --- |")
    for label, encoder in (("CBD J=5, b=0.3, every layer", None), ("same, first conv uniform J=5", first_uniform)):
        if encoder is None:
            compressed, report = cbdnet.compress(copy.deepcopy(model), cbdnet.CBDConfig(planes=5),
                                                 progress=False)
        else:
            compressed, report = compress_layers(copy.deepcopy(model), encoder, progress=False)
        miou = evaluate_segmentation(compressed, data, batch_size=8, progress=False)["miou"]
        first = report.layers[0]
        print(f"| {label} | {report.bits_per_weight:.3f} | {miou:.4f} | {first.mode}, {first.scale:.3f}, "
              f"{first.exponents}, {first.rel_error:.4f} |", flush=True)


if __name__ == "__main__":
    main()
