"""The calibrated budget on the shared CIFAR ResNets: time, memory, file size and fidelity to FP32 per target.

    python bench/cifar_fidelity.py --model cifar-resnet20 --model cifar-resnet44 --target-bits 3.0 \
        -o bench/results/cifar_fidelity.json

For each model and target, ``cbdnet compress --arch MODEL --weights SHARED/models/cifar10_resnetN.th
--target-bits T --calib cifar10-npz:SHARED/data/cifar10_calib1000.npz`` runs once in a subprocess under
``/usr/bin/time -v`` (wall, CPU seconds, peak RSS of the whole process); its file is then loaded with
:func:`cbdnet.load` and evaluated on the 10,000 test images of ``cifar10_test.npz`` against the FP32 model:
top-1, agreement (the share of images where the file's model predicts FP32's class) and KL(FP32 || file), the
mean over the images. The command line, machine and every figure are printed and written to ``-o``. On a
shared machine the wall time includes waiting for a core: the CPU seconds are the comparable figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CBDNET_SHARED", REPO.parent / "shared"))
sys.path.insert(0, str(REPO / "bench"))

from fidelity_compare import fidelity  # noqa: E402  (bench/ is not a package)
from scale import machine, time_figures  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="cifar-resnetN (N of a checkpoint in SHARED)")
    p.add_argument("--target-bits", type=float, action="append", required=True, help="repeatable")
    p.add_argument("--shared", type=Path, default=SHARED, help="folder with models/ and data/")
    p.add_argument("--extra", default="", help="more compress flags")
    p.add_argument("--keep", type=Path, help="keep the .cbd files in this folder")
    p.add_argument("-o", "--out", type=Path, help="write the rows here (JSON)")
    return p.parse_args()


@torch.no_grad()
def logits_of(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i:i + 1000]) for i in range(0, len(images), 1000)])


def compress_row(arch: str, weights: Path, target: float, args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, "-m", "cbdnet", "compress", "--arch", arch, "--weights", str(weights),
               "--target-bits", str(target), "--calib",
               f"cifar10-npz:{args.shared / 'data' / 'cifar10_calib1000.npz'}", "--quiet", "--force",
               "-o", str(out), "--json", str(out.with_suffix(".json")), *shlex.split(args.extra)]
    print("$", shlex.join(command), flush=True)
    load = os.getloadavg()[0]
    timing = out.with_suffix(".time")
    done = subprocess.run(["/usr/bin/time", "-v", "-o", str(timing), *command], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    if done.returncode:
        raise SystemExit(f"{arch} at {target}: exit {done.returncode}: {done.stderr[-2000:]}")
    report = json.loads(out.with_suffix(".json").read_text())
    return {"model": arch, "target_bits": target, "command": shlex.join(command), "load_before": load,
            **time_figures(timing.read_text()), "file_bytes": out.stat().st_size,
            "file_bits_per_weight": report.get("file_bits_per_weight"), "retries": report.get("budget_retries")}


def main() -> None:
    args = parse_args()
    import cbdnet
    from cbdnet.zoo.data import load_spec
    from cbdnet.zoo.models import build, load_weights

    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("machine:", json.dumps(machine()), flush=True)
    torch.set_num_threads(1)
    images, labels = zip(*load_spec(f"cifar10-npz:{args.shared / 'data' / 'cifar10_test.npz'}").batches(1000),
                         strict=True)
    test_images, test_labels = torch.cat(images), torch.cat(labels)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cbdnet-fidelity-") as scratch:
        folder = args.keep or Path(scratch)
        folder.mkdir(parents=True, exist_ok=True)
        for arch in args.model:
            weights = args.shared / "models" / f"cifar10_{arch.removeprefix('cifar-')}.th"
            fp32 = load_weights(build(arch), str(weights))
            reference = logits_of(fp32, test_images)
            fp32_top1 = int((reference.argmax(1) == test_labels).sum()) / len(test_labels)
            for target in args.target_bits:
                row = compress_row(arch, weights, target, args, folder / f"{arch}_{target:g}.cbd")
                model = cbdnet.load(folder / f"{arch}_{target:g}.cbd", model=build(arch))
                row.update(fidelity(logits_of(model, test_images), reference, test_labels), fp32_top1=fp32_top1)
                row.pop("command")
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        args.out.write_text(json.dumps({"command": sys.argv, "machine": machine(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
