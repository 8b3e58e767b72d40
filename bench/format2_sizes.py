"""Where the bytes of a ``.cbd`` file go, format 1 against format 2, for a few models and codes.

    CBDNET_SHARED=../shared PYTHONPATH=src python bench/format2_sizes.py

For each model and code it prints the whole file of each format and, for format 2, its parts: container
(prefix + checksum), compressed header, coded layers (entropy-coded levels + steps) and float tensors; and the
paper's fixed-length count beside the entropy-coded one. Random-weight models use per-channel RTN 4 bits; the
pretrained ResNet-20 (from ../shared, when present) also gets the paper's code (J=5, bottleneck 0.3), with and
without folding BatchNorm and float16 floats.
"""

from __future__ import annotations

import os
import platform
import struct
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

import cbdnet
from cbdnet.format.cbdfile import encode_file
from cbdnet.zoo.models import build, load_weights

CONTAINER = 24 + 32


def _row(label: str, model, report) -> str:
    v1, v2 = encode_file(model, version=1), encode_file(model)
    header = struct.unpack_from("<I", v2, 24)[0] + 4
    floats = len(v2) - CONTAINER - header - report.coded_weight_bits // 8
    params = report.params
    return (f"| {label} | {len(v1):,} | {8 * len(v1) / params:.3f} | {len(v2):,} | {8 * len(v2) / params:.3f} | "
            f"{header:,} | {floats:,} | {report.bits_per_weight:.3f} | {report.coded_bits_per_weight:.3f} | "
            f"{len(report.extra.get('folded_batchnorm', []))} |")


def main() -> None:
    print(f"command: {' '.join(sys.argv)}")
    print(f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    print("| model, code | format 1 bytes | f1 file bits/w | format 2 bytes | f2 file bits/w | f2 header | "
          "f2 floats | paper bits/w | coded bits/w | BN folded |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arch in ("digits-cnn", "cifar-resnet20", "resnet18"):
        torch.manual_seed(0)
        model, report = cbdnet.compress(build(arch).eval(), cbdnet.RTNConfig(bits=4), progress=False)
        print(_row(f"{arch} (random), rtn4/ch", model, report), flush=True)
    shared = Path(os.environ.get("CBDNET_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    weights = shared / "models" / "cifar10_resnet20.th"
    if not weights.is_file():
        print(f"(pretrained ResNet-20 rows skipped: {weights} is absent)")
        return
    for label, config, options in (
            ("ResNet-20, paper J=5 b=0.3", cbdnet.CBDConfig(planes=5, bottleneck=0.3), {}),
            ("ResNet-20, paper J=5 b=0.3, float32", cbdnet.CBDConfig(planes=5, bottleneck=0.3), {"float32": True}),
            ("ResNet-20, rtn4/ch", cbdnet.RTNConfig(bits=4), {}),
            ("ResNet-20, rtn4/ch, no BN folding", cbdnet.RTNConfig(bits=4), {"fold_bn": False})):
        model = load_weights(build("cifar-resnet20"), weights).eval()
        model, report = cbdnet.compress(model, config, progress=False, **options)
        print(_row(label, model, report), flush=True)


if __name__ == "__main__":
    main()
