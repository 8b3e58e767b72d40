"""Time format 2's stream coding of one big layer: VGG-16's fc6 (4096 x 25088, 102.8M weights, seeded random
weights) under the paper's code (J=5, bottleneck 0.3), ``encode_stream`` called twice (the first call pays the
page faults of its big temporaries), bytes printed so runs of two versions can be checked for equal output.

    PYTHONPATH=src nice python bench/stream_speed.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torchvision

from cbdnet.codec import encode_weight
from cbdnet.codec.stream import encode_stream

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    print(header())
    torch.manual_seed(0)
    weight = torchvision.models.vgg16(weights=None).classifier[0].weight.detach().numpy()
    code = encode_weight(weight, 5, 0.3, name="fc6")
    levels = code.signed_magnitudes()
    for call in range(args.repeat):
        start = time.perf_counter()
        stream = encode_stream(levels, code.exponents, code.planes)
        print(f"call {call + 1}: encode_stream {time.perf_counter() - start:.2f} s, {stream.coding}, "
              f"{stream.nbytes:,} bytes")


if __name__ == "__main__":
    main()
