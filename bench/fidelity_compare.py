"""Fidelity to FP32 of cbdnet's and NNCodec's ResNet-20 files: agreement and KL on the test images, by file size.

    .venv/bin/python bench/fidelity_compare.py --sweep out/r20_budget/results.json \
        --nncodec-dir bench/out/nncodec -o bench/results/fidelity_resnet20.json --plot docs/fidelity_resnet20.png

Top-1 on 10,000 test images moves by about 0.4 points (one sigma) between two files of nearly the same quality,
and NNCodec's top-1 is not monotone in its QP, so "the smallest file at each accuracy level" read from top-1
compares lucky draws. Measured against the FP32 model's own outputs on the same images, fidelity is far less
noisy and falls monotonically with the rate for both tools: *agreement* (the share of images where the file's
model predicts FP32's class) and KL(FP32 || file's model) averaged over the images. This script evaluates every
file of both tools on the same images and prints, besides each file's figures, the ratio of the smallest cbdnet
file to the smallest NNCodec file that reach each fidelity level either tool measured (agreement at least,
KL at most). It does not replace the top-1 comparison (bench/rate_accuracy_plot.py); both are printed.

cbdnet's files: the finished points' ``file`` of one or more ``cbdnet sweep`` results.json (``--sweep``,
repeatable: e.g. a sweep and a denser one at a few rates). NNCodec's: the decoded checkpoints
``resnet20_nncodec_qp{QP}.pt`` that bench/nncodec_resnet20.py leaves in its work folder, with the bitstream bytes
from its JSON (bench/results/nncodec_resnet20.json).

Every point records the SHA-256 of the file it evaluated. ``--reuse PREVIOUS.json`` takes a point's figures from
an earlier output instead of evaluating it again where the tool, setting and SHA-256 are the same (points
without a digest are evaluated), so adding a few files to a comparison is one command, not a re-run of all.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import cbdnet
from cbdnet.zoo.data import load_spec
from cbdnet.zoo.models import build, load_weights

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CBDNET_SHARED", REPO.parent / "shared"))  # the data and checkpoints beside the clone
ARCH = "cifar-resnet20"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", type=Path, action="append", required=True,
                   help="a `cbdnet sweep` results.json of ResNet-20 files (repeatable)")
    p.add_argument("--extra", action="append", default=[], metavar="SETTING=FILE.cbd",
                   help="another cbdnet file of the same curve (e.g. a CLI run beside the sweep), repeatable")
    p.add_argument("--nncodec", type=Path, default=REPO / "bench" / "results" / "nncodec_resnet20.json")
    p.add_argument("--nncodec-dir", type=Path, default=REPO / "bench" / "out" / "nncodec",
                   help="decoded NNCodec checkpoints (bench/nncodec_resnet20.py's --work)")
    p.add_argument("--weights", default=str(SHARED / "models" / "cifar10_resnet20.th"))
    p.add_argument("--data", default=f"cifar10-npz:{SHARED / 'data' / 'cifar10_test.npz'}")
    p.add_argument("--reuse", type=Path, help="an earlier output: its points of the same file (SHA-256) are reused")
    p.add_argument("-o", "--out", type=Path, help="write every file's figures here (JSON)")
    p.add_argument("--plot", type=Path, help="agreement and KL over file bits per weight, both tools")
    return p.parse_args()


class Reference:
    """The test images, their labels and the FP32 model's logits on them."""

    def __init__(self, weights: str, data: str, batch: int = 1000):
        self.batch = batch
        images, labels = zip(*load_spec(data).batches(batch), strict=True)
        self.images, self.labels = torch.cat(images), torch.cat(labels)
        self.fp32 = load_weights(build(ARCH), weights).eval()
        self.logits = self.run(self.fp32)

    @torch.no_grad()
    def run(self, model: torch.nn.Module) -> torch.Tensor:
        model.eval()
        return torch.cat([model(self.images[i:i + self.batch]) for i in range(0, len(self.images), self.batch)])

    def fidelity(self, model: torch.nn.Module) -> dict:
        return fidelity(self.run(model), self.logits, self.labels)


def fidelity(logits: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict:
    """Top-1 on ``labels``, agreement with the reference model's class, and KL(reference || model) averaged
    over the images."""
    kl = F.kl_div(F.log_softmax(logits, 1), F.log_softmax(reference, 1), log_target=True, reduction="batchmean")
    count = len(labels)
    return {"top1": int((logits.argmax(1) == labels).sum()) / count,
            "agreement": int((logits.argmax(1) == reference.argmax(1)).sum()) / count, "kl": float(kl)}


def file_digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Evaluated:
    """Figures of the files evaluated before (``--reuse``), by tool, setting and SHA-256."""

    def __init__(self, previous: Path | None):
        points = json.loads(previous.read_text())["points"] if previous else []
        self.known = {(p["tool"], p["setting"], p["sha256"]): p for p in points if "sha256" in p}

    def fidelity(self, ref: Reference, tool: str, setting: str, path, model) -> dict:
        digest = file_digest(path)
        done = self.known.get((tool, setting, digest))
        if done is not None:
            return {"sha256": digest, **{k: done[k] for k in ("top1", "agreement", "kl")}, "reused": True}
        return {"sha256": digest, **ref.fidelity(model())}


def cbdnet_points(sweeps: list[Path], extra: list[str], ref: Reference, seen: Evaluated) -> list[dict]:
    entries = [(f"--target-bits {e.get('target-bits')}", e["file"], e["top1"]) for sweep in sweeps
               for e in json.loads(sweep.read_text()) if e.get("status") == "done" and e.get("file")]
    for item in extra:
        setting, sep, path = item.rpartition("=")
        if not sep or not setting:
            raise SystemExit(f"--extra takes SETTING=FILE.cbd, got {item!r}")
        entries.append((setting, path, None))
    settings = [setting for setting, _, _ in entries]
    if len(set(settings)) != len(settings):
        raise SystemExit(f"a setting appears twice among the sweeps: {sorted(settings)}")
    points = []
    for setting, path, top1 in entries:
        figures = seen.fidelity(ref, "cbdnet", setting, path, lambda p=path: cbdnet.load(p, model=build(ARCH)))
        point = {"tool": "cbdnet", "setting": setting, "bytes": Path(path).stat().st_size, **figures}
        if top1 is not None and abs(point["top1"] - top1) > 1e-9:
            raise SystemExit(f"{path}: top-1 {point['top1']} here, {top1} in the sweep")
        points.append(point)
        print(f"  cbdnet {point['setting']}: {point['bytes']:,} B agreement {point['agreement']:.4f} "
              f"KL {point['kl']:.4f}{' (reused)' if point.get('reused') else ''}", flush=True)
    return points


def nncodec_points(results: Path, folder: Path, ref: Reference, seen: Evaluated) -> list[dict]:
    points = []
    for entry in json.loads(results.read_text())["points"]:
        checkpoint = folder / f"resnet20_nncodec_qp{entry['qp']}.pt"
        if not checkpoint.exists():
            raise SystemExit(f"{checkpoint} is missing: run bench/nncodec_resnet20.py --qps {entry['qp']} first")
        setting = f"qp {entry['qp']}"
        figures = seen.fidelity(ref, "nncodec", setting, checkpoint,
                                lambda c=checkpoint: load_weights(build(ARCH), str(c)))
        point = {"tool": "nncodec", "setting": setting, "bytes": entry["bytes"], **figures}
        if abs(point["top1"] - entry["top1"]) > 1e-9:
            raise SystemExit(f"{checkpoint}: top-1 {point['top1']} here, {entry['top1']} in {results}")
        points.append(point)
        print(f"  NNCodec {point['setting']}: {point['bytes']:,} B agreement {point['agreement']:.4f} "
              f"KL {point['kl']:.4f}{' (reused)' if point.get('reused') else ''}", flush=True)
    return points


def smallest(points: list[dict], reaches) -> int | None:
    sizes = [p["bytes"] for p in points if reaches(p)]
    return min(sizes) if sizes else None


def every_level(cbd: list[dict], nnc: list[dict], key: str, better) -> list[dict]:
    """For each level of ``key`` either tool measured, the smallest file of each reaching it and their ratio
    (``better(value, level)``: the file is at least as faithful as the level)."""
    rows = []
    for level in sorted({p[key] for p in cbd + nnc}):
        mine = smallest(cbd, lambda p, lv=level: better(p[key], lv))
        theirs = smallest(nnc, lambda p, lv=level: better(p[key], lv))
        rows.append({"level": level, "cbdnet_bytes": mine, "nncodec_bytes": theirs,
                     "ratio": mine / theirs if mine and theirs else None})
    return rows


def summary(rows: list[dict], key: str) -> str:
    both = [r for r in rows if r["ratio"] is not None]
    worst = max(both, key=lambda r: r["ratio"]) if both else None
    only_nnc = [r["level"] for r in rows if r["cbdnet_bytes"] is None and r["nncodec_bytes"] is not None]
    only_cbd = [r["level"] for r in rows if r["nncodec_bytes"] is None and r["cbdnet_bytes"] is not None]
    text = f"{key}: {len(both)} levels both reach"
    if worst:
        text += f", worst cbdnet / NNCodec {worst['ratio']:.3f} at {worst['level']:.4f}"
    text += f"; only NNCodec reaches {len(only_nnc)} level(s) {only_nnc}; only cbdnet {len(only_cbd)}"
    above = sorted((r for r in both if r["ratio"] > 0.7), key=lambda r: r["level"])
    return text + "".join(f"\n  above 0.7 at {r['level']:.4f}: cbdnet {r['cbdnet_bytes']:,} B / NNCodec "
                          f"{r['nncodec_bytes']:,} B = {r['ratio']:.3f}" for r in above)


def table(cbd: list[dict], nnc: list[dict], weights: int) -> list[str]:
    lines = ["| tool | setting | whole file | file bits/weight | top-1 | agreement with FP32 | KL(FP32 ‖ file) |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for p in sorted(cbd, key=lambda p: p["bytes"]) + sorted(nnc, key=lambda p: p["bytes"]):
        lines.append(f"| {p['tool']} | {p['setting']} | {p['bytes']:,} B | {p['bytes'] * 8 / weights:.3f} | "
                     f"{p['top1']:.4f} | {p['agreement']:.4f} | {p['kl']:.4f} |")
    return lines


def plot(cbd: list[dict], nnc: list[dict], weights: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for points, label, marker in ((cbd, "cbdnet --target-bits --calib", "o"), (nnc, "NNCodec 2.1.3 (QPs)", "s")):
        ordered = sorted(points, key=lambda p: p["bytes"])
        bits = [p["bytes"] * 8 / weights for p in ordered]
        axes[0].plot(bits, [p["agreement"] for p in ordered], marker=marker, label=label)
        axes[1].semilogy(bits, [p["kl"] for p in ordered], marker=marker, label=label)
    axes[0].set_ylabel("agreement with FP32 (test images)")
    axes[1].set_ylabel("KL(FP32 || file), test images")
    for ax in axes:
        ax.set_xlabel("whole-file bits per weight")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle("ResNet-20: fidelity to FP32 by file size")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.machine()} ({os.cpu_count()} cores)"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(2)
    command = " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])
    print(f"command: {command}\nmachine: {cpu_name()}, {torch.get_num_threads()} torch threads\n"
          f"date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
          flush=True)
    ref = Reference(args.weights, args.data)
    weights = json.loads(args.nncodec.read_text())["weights_counted"]
    seen = Evaluated(args.reuse)
    cbd = cbdnet_points(args.sweep, args.extra, ref, seen)
    nnc = nncodec_points(args.nncodec, args.nncodec_dir, ref, seen)
    print("\n".join(table(cbd, nnc, weights)))
    agreement = every_level(cbd, nnc, "agreement", lambda value, level: value >= level)
    kl = every_level(cbd, nnc, "kl", lambda value, level: value <= level)
    print(summary(agreement, "agreement"))
    print(summary(kl, "KL"))
    if args.out:
        args.out.write_text(json.dumps({"command": command, "date": f"{datetime.date.today()}", "weights": weights,
                                        "points": cbd + nnc, "every_agreement_level": agreement,
                                        "every_kl_level": kl}, indent=1) + "\n")
    if args.plot:
        plot(cbd, nnc, weights, args.plot)


if __name__ == "__main__":
    main()
