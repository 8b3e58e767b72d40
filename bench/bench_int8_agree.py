"""ResNet-20 ``--int8`` ONNX files against the float ``.cbd`` model and the PyTorch int8 runtime.

``--calib-check``: on the 1,000 calibration images only (never the test set), each ONNX file's logits against
the float ``.cbd`` model's (relative L2) and top-1, run by ONNX Runtime fused (all optimisations: integer
kernels) and op by op (optimisations off: the QDQ graph as float simulation). A gap between the two is the
integer kernels' own error (e.g. int16 saturation).
Default: top-1 on the full CIFAR-10 test set of ``cbdnet.load(cbd, runtime="int8", calibration=<the 1,000
calibration images>)`` and of each ONNX file, and the share of test images where both predict the same class.

usage: CBDNET_SHARED=../shared PYTHONPATH=src nice python bench/bench_int8_agree.py [--calib-check] R20.cbd X.onnx ...
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

import cbdnet
from cbdnet.export import OnnxModel
from cbdnet.export.runtime import session
from cbdnet.zoo.data import load_spec


def _data(name: str):
    return load_spec(f"cifar10-npz:{os.environ.get('CBDNET_SHARED', '../shared')}/data/{name}.npz")


def _logits(run, images: torch.Tensor, batch: int = 250) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([run(images[i:i + batch]) for i in range(0, len(images), batch)])


def calib_check(cbd: str, files: list[str]) -> None:
    calib = _data("cifar10_calib1000")
    y = calib.labels.numpy()
    ref = _logits(lambda b: cbdnet.load(cbd)(b).numpy(), calib.images)
    print(f"float .cbd top-1 on the calibration images {(ref.argmax(1) == y).mean():.4f}")
    for path in files:
        for opt in ("all", "none"):
            sess = session(path, 1, opt)
            out = _logits(lambda b, s=sess: s.run(None, {"input": b.numpy()})[0], calib.images)
            rel = np.linalg.norm(out - ref) / np.linalg.norm(ref)
            print(f"{path} ORT optimisation {opt}: rel. logit error {rel:.4f}, top-1 {(out.argmax(1) == y).mean():.4f}")


def agreement(cbd: str, files: list[str]) -> None:
    torch.set_num_threads(1)
    calib, test = _data("cifar10_calib1000"), _data("cifar10_test")
    start = time.time()
    qmodel = cbdnet.load(cbd, runtime="int8", calibration=calib)
    layers = len(qmodel.cbdnet_int8_report.int8_layers)
    print(f"int8 runtime built in {time.time() - start:.1f} s, {layers} layers int8")
    y = test.labels.numpy()
    torch_pred = _logits(lambda b: qmodel(b).numpy(), test.images).argmax(1)
    print(f"torch int8 runtime top-1 {(torch_pred == y).mean():.4f}")
    for path in files:
        model = OnnxModel(path)
        pred = _logits(lambda b, m=model: m(b).numpy(), test.images).argmax(1)
        same = (pred == torch_pred).mean()
        print(f"{path}: ONNX top-1 {(pred == y).mean():.4f}; same class as torch int8 {same:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cbd")
    parser.add_argument("onnx", nargs="+")
    parser.add_argument("--calib-check", action="store_true")
    args = parser.parse_args()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, "
          f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    (calib_check if args.calib_check else agreement)(args.cbd, args.onnx)


if __name__ == "__main__":
    main()
