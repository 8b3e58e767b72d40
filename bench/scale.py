"""How the calibrated budget scales: compression time and peak RSS against weights and calibration images.

    python bench/scale.py --model cifar-resnet20 --model torchvision:mobilenet_v3_large:128 \
        --model torchvision:resnet50:128 --target-bits 3.0 -o bench/results/scale.json

Each ``--model`` runs ``cbdnet compress ARCH --target-bits T --calib SPEC`` once, in a subprocess, under
``/usr/bin/time -v`` (wall seconds, CPU seconds, peak RSS of the whole process); the row records the model's
weights, the calibration images, the file's bits per weight, and the stage times the JSON report gives.

- ``cifar-resnetN``: the pretrained CIFAR ResNet of ``--shared`` (``models/cifar10_resnetN.th``) calibrated on
  ``data/cifar10_calib1000.npz`` (1,000 images; ``cifar-resnetN:K`` takes the first K with ``--calib-images``);
- ``torchvision:NAME:K``: torchvision's builder with random weights (seed 0), calibrated on K generated images
  (seeded noise in an ``imagefolder:`` of 10 classes written to a temporary folder, 256x256 JPEG files).

The command line, the machine (CPU model, cores, load average before each run) and every figure are printed
and written to ``-o``. On a machine shared with other work the wall time includes waiting for a core: compare
the CPU seconds, and rerun a baseline beside any comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="cifar-resnetN[:IMAGES] or torchvision:NAME:IMAGES")
    p.add_argument("--target-bits", type=float, default=3.0)
    p.add_argument("--shared", type=Path, default=REPO.parent / "shared", help="folder with models/ and data/")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per model before it is reported unfinished")
    p.add_argument("--extra", default="", help="more compress flags, e.g. '--no-refit'")
    p.add_argument("-o", "--out", type=Path, help="write the rows here (JSON)")
    return p.parse_args()


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        text = Path("/proc/cpuinfo").read_text()
        found = re.search(r"model name\s*:\s*(.+)", text)
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads()}


def generated_images(root: Path, count: int, seed: int = 0) -> str:
    """``count`` seeded noise images in an imagefolder of 10 classes; returns the spec."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    for index in range(count):
        folder = root / f"class{index % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        smooth = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # upsampled: some spatial structure
        picture = Image.fromarray(smooth).resize((256, 256), Image.BILINEAR)
        picture.save(folder / f"{index:05d}.jpg", quality=90)
    return f"imagefolder:{root}"


def command(spec: str, args, work: Path) -> tuple[list[str], int | None]:
    """The compress command of one ``--model`` and its weights' count (None: read from the report)."""
    parts = spec.split(":")
    base = [sys.executable, "-m", "cbdnet", "compress", "--target-bits", str(args.target_bits), "--quiet",
            "-o", str(work / "out.cbd"), "--json", str(work / "out.json"), "--force", *shlex.split(args.extra)]
    if parts[0].startswith("cifar-resnet"):
        depth = parts[0].removeprefix("cifar-resnet")
        cmd = base + ["--arch", parts[0], "--weights", str(args.shared / "models" / f"cifar10_resnet{depth}.th"),
                      "--calib", f"cifar10-npz:{args.shared / 'data' / 'cifar10_calib1000.npz'}"]
        if len(parts) > 1:
            cmd += ["--calib-images", parts[1]]
        return cmd, None
    if parts[0] == "torchvision" and len(parts) == 3:
        folder = work / "calib"
        return base + ["--arch", f"torchvision:{parts[1]}", "--weights", "random", "--seed", "0",
                       "--calib", generated_images(folder, int(parts[2]))], None
    raise SystemExit(f"--model {spec}: expected cifar-resnetN[:IMAGES] or torchvision:NAME:IMAGES")


def _time_field(text: str, name: str) -> str | None:
    found = re.search(rf"{re.escape(name)}: (.+)", text)
    return found.group(1).strip() if found else None


def _seconds(clock: str | None) -> float | None:
    if clock is None:
        return None
    value = 0.0
    for part in clock.split(":"):
        value = 60 * value + float(part)
    return value


def time_figures(text: str) -> dict:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MB) from ``/usr/bin/time -v``'s report."""
    return {"wall_s": _seconds(_time_field(text, "Elapsed (wall clock) time (h:mm:ss or m:ss)")),
            "cpu_s": sum(float(_time_field(text, f"{kind} time (seconds)") or 0) for kind in ("User", "System")),
            "peak_rss_mb": int(_time_field(text, "Maximum resident set size (kbytes)") or 0) / 1024}


def run(spec: str, args) -> dict:
    with tempfile.TemporaryDirectory(prefix="cbdnet-scale-") as tmp:
        work = Path(tmp)
        cmd, _ = command(spec, args, work)
        timed = ["/usr/bin/time", "-v", "-o", str(work / "time.txt"), *cmd]
        row = {"model": spec, "command": shlex.join(cmd), "load_before": os.getloadavg()[0]}
        print("$", row["command"], flush=True)
        try:
            done = subprocess.run(timed, capture_output=True, text=True, timeout=args.timeout,
                                  env={**os.environ, "PYTHONPATH": str(REPO / "src")})
        except subprocess.TimeoutExpired:
            return {**row, "finished": False, "why": f"not finished after {args.timeout} s"}
        text = (work / "time.txt").read_text() if (work / "time.txt").exists() else ""
        row.update({"finished": done.returncode == 0, "exit": done.returncode, **time_figures(text)})
        if done.returncode != 0:
            row["why"] = done.stderr.strip().splitlines()[-1:] if done.stderr.strip() else ""
            return row
        report = json.loads((work / "out.json").read_text())
        calib = report.get("calibration", {})
        row.update({"weights": report["params"], "images": calib.get("images"),
                    "file_bits_per_weight": report["file_bits_per_weight"], "retries": report.get("budget_retries"),
                    "stats_s": calib.get("seconds_stats"), "refit_s": (calib.get("refit") or {}).get("seconds"),
                    "exact_candidates": calib.get("exact_candidates"),
                    "candidate_families": calib.get("candidate_families")})
        return row


def main() -> None:
    args = parse_args()
    info = {"command": shlex.join([sys.executable, *sys.argv]), "machine": machine(), "rows": []}
    print("command:", info["command"])
    print("machine:", json.dumps(info["machine"]))
    for spec in args.model:
        row = run(spec, args)
        info["rows"].append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(info, indent=1) + "\n")
    print("| model | weights | calib images | wall s | CPU s | peak RSS MB | file bits/weight | exact / families |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in info["rows"]:
        if not row.get("finished"):
            print(f"| {row['model']} | | | not finished: {row.get('why')} | | | | |")
            continue
        print(f"| {row['model']} | {row['weights']:,} | {row['images']} | {row['wall_s']:.0f} | {row['cpu_s']:.0f} | "
              f"{row['peak_rss_mb']:,.0f} | {row['file_bits_per_weight']:.3f} | "
              f"{row['exact_candidates']} / {row['candidate_families']} |")


if __name__ == "__main__":
    main()
