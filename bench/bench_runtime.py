"""Runtime of the deployed model: FP32 torch, FP32 ONNX Runtime, ORT's own quantize_static (QDQ per channel,
int8 and uint8 activations) and cbdnet's ONNX export (weight-only and --int8).

ResNet-20 (pretrained, from a .cbd made with ``cbdnet compress --arch cifar-resnet20 --weights
../shared/models/cifar10_resnet20.th --target-bits 4.0 --calib cifar10-npz:../shared/data/cifar10_calib1000.npz``):
top-1 on the full CIFAR-10 test set, latency at each --batches x --threads (interleaved rounds, medians, ratios
against FP32 ORT of the same run), file size, RSS of a fresh process after building the session and one run.
ResNet-18 / VGG-16 (random weights, RTN 4-bit per channel, calibrated on random normal images): latency and size.

usage: nice python bench/bench_runtime.py --cbd r20.cbd [--out DIR] [--models resnet20 resnet18 vgg16]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import cbdnet
from cbdnet.export import export_onnx
from cbdnet.export.runtime import session
from cbdnet.zoo.data import load_spec
from cbdnet.zoo.models import build, load_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, shared  # noqa: E402

RSS_CHILD = """
import sys, numpy as np
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) * 1024
kind, path, shape = sys.argv[1], sys.argv[2], [int(s) for s in sys.argv[3].split(',')]
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
if kind == 'torch':
    import torch; torch.set_num_threads(1)
    from cbdnet.zoo.models import build, load_weights
    arch, weights = path.split('|')
    before = rss(); m = build(arch).eval()
    if weights != 'random': load_weights(m, weights)
    with torch.no_grad(): m(torch.from_numpy(x))
else:
    import onnxruntime as ort
    o = ort.SessionOptions(); o.intra_op_num_threads = 1
    before = rss(); s = ort.InferenceSession(path, o, providers=['CPUExecutionProvider'])
    s.run(None, {s.get_inputs()[0].name: x})
print(rss(), rss() - before)
"""


def fp32_onnx(model: torch.nn.Module, shape: tuple[int, ...], path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(shape),), str(path), dynamo=False, opset_version=17,
                          input_names=["input"], output_names=["output"],
                          dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})


def ort_quantize(fp32: Path, out: Path, calib: list[np.ndarray], activation: str) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.preprocess import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calib)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8 if activation == "int8" else QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    pre.unlink()


def rss(kind: str, path: str, shape: tuple[int, ...]) -> tuple[int, int]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, kind, path, ",".join(map(str, shape))],
                         capture_output=True, text=True, env=env, check=True).stdout.split()
    return int(out[0]), int(out[1])


def latency(runners: dict, x: np.ndarray, rounds: int) -> dict[str, float]:
    """Median seconds per call of each runner, interleaved: each round runs every runner once in turn."""
    for run in runners.values():
        run(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    reps = 5 if x.shape[0] == 1 else 1
    for _ in range(rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            for _ in range(reps):
                run(x)
            times[name].append((time.perf_counter() - start) / reps)
    return {k: float(np.median(v)) for k, v in times.items()}


def runners_for(paths: dict[str, Path], torch_model: torch.nn.Module, threads: int) -> dict:
    torch.set_num_threads(threads)

    def torch_run(x: np.ndarray):
        with torch.no_grad():
            return torch_model(torch.from_numpy(x))

    runners = {"FP32 torch": torch_run}
    for name, path in paths.items():
        sess = session(path, threads)
        runners[name] = lambda x, s=sess: s.run(None, {"input": x})
    return runners


def top1(path: Path, images: torch.Tensor, labels: torch.Tensor, threads: int = 2) -> float:
    sess = session(path, threads)
    hits = 0
    for i in range(0, len(labels), 500):
        logits = sess.run(None, {"input": images[i:i + 500].numpy()})[0]
        hits += int((logits.argmax(1) == labels[i:i + 500].numpy()).sum())
    return hits / len(labels)


def build_files(name: str, model_fp32, model_cbd, shape, calib: list[np.ndarray], out: Path) -> dict[str, Path]:
    paths = {"FP32 ORT": out / f"{name}_fp32.onnx"}
    fp32_onnx(model_fp32, shape, paths["FP32 ORT"])
    for act in ("int8", "uint8"):
        paths[f"ORT quantize_static ({act} act)"] = out / f"{name}_ort_qs_{act}.onnx"
        ort_quantize(paths["FP32 ORT"], paths[f"ORT quantize_static ({act} act)"], calib, act)
    paths["cbdnet weight-only"] = out / f"{name}_cbd_w8.onnx"
    export_onnx(model_cbd, paths["cbdnet weight-only"], input_shape=shape)
    paths["cbdnet --int8"] = out / f"{name}_cbd_int8.onnx"
    export_onnx(model_cbd, paths["cbdnet --int8"], input_shape=shape, int8=True,
                calibration=[torch.from_numpy(c) for c in calib])
    return paths


def bench_model(name: str, model_fp32, model_cbd, shape, calib, args, data=None, weights="random") -> dict:
    out = Path(args.out)
    paths = build_files(name, model_fp32, model_cbd, shape, calib, out)
    result: dict = {"sizes": {k: p.stat().st_size for k, p in paths.items()}, "latency": {}, "rss": {}, "top1": {}}
    if data is not None:
        images, labels = data
        with torch.no_grad():
            torch.set_num_threads(args.eval_threads)
            result["top1"]["FP32 torch"] = float(sum(int((model_fp32(images[i:i + 500]).argmax(1)
                                                           == labels[i:i + 500]).sum())
                                                      for i in range(0, len(labels), 500)) / len(labels))
        for k, p in paths.items():
            result["top1"][k] = top1(p, images, labels, args.eval_threads)
        print(name, "top-1", result["top1"], flush=True)
    arch = {"resnet20": "cifar-resnet20"}.get(name, name)
    result["rss"]["FP32 torch"] = rss("torch", f"{arch}|{weights}", (1, *shape[1:]))
    for k, p in paths.items():
        result["rss"][k] = rss("ort", str(p), (1, *shape[1:]))
    print(name, "sizes", result["sizes"], "rss", result["rss"], flush=True)
    for batch in args.batches if name == "resnet20" else args.big_batches:
        x = np.random.default_rng(1).standard_normal((batch, *shape[1:])).astype(np.float32)
        for threads in args.threads:
            t = latency(runners_for(paths, model_fp32, threads), x, args.rounds)
            result["latency"][f"batch {batch}, {threads} thread(s)"] = t
            print(name, batch, threads, {k: f"{v * 1e3:.2f} ms" for k, v in t.items()}, flush=True)
    return result


def table(name: str, result: dict) -> str:
    keys = list(result["sizes"])
    lines = [f"### {name}", ""]
    fp32 = result["sizes"]["FP32 ORT"]
    head = "| model | file bytes | vs FP32 ONNX | RSS after session (delta) |" + (
        " top-1 |" if result["top1"] else "")
    lines += [head, "| --- " * (head.count("|") - 1) + "|"]
    for k in ["FP32 torch", *keys]:
        size = result["sizes"].get(k)
        total, delta = result["rss"][k]
        row = (f"| {k} | {size:,} | {size / fp32:.3f}x |" if size else f"| {k} | (state dict) | |")
        row += f" {total / 2**20:.0f} MiB (+{delta / 2**20:.1f}) |"
        if result["top1"]:
            row += f" {result['top1'][k]:.4f} |"
        lines.append(row)
    lines += ["", "| latency (median) | " + " | ".join(["FP32 torch", *keys]) + " |",
              "| --- " * (len(keys) + 2) + "|"]
    for cfg, t in result["latency"].items():
        base = t["FP32 ORT"]
        lines.append(f"| {cfg} | " + " | ".join(f"{t[k] * 1e3:.2f} ms ({base / t[k]:.2f}x)"
                                                for k in ["FP32 torch", *keys]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cbd", help="ResNet-20 .cbd (see the docstring's compress command)")
    parser.add_argument("--out", default=None, help="where the .onnx files go (default: a temp dir)")
    parser.add_argument("--models", nargs="+", default=["resnet20", "resnet18", "vgg16"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--big-batches", type=int, nargs="+", default=[1])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--eval-threads", type=int, default=2, help="threads for top-1 (not timed)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    args.out = args.out or tempfile.mkdtemp(prefix="cbdnet_bench_")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(f"{header()}\nonnxruntime {ort.__version__}, cbdnet {cbdnet.__version__}", flush=True)
    results: dict = {}
    rng = np.random.default_rng(0)

    def done(name: str, result: dict) -> None:
        """Print the model's table and rewrite --json now, so a run cut short keeps the models it finished."""
        results[name] = result
        print(table(name, result), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    if "resnet20" in args.models:
        test = load_spec(f"cifar10-npz:{shared('data/cifar10_test.npz')}")
        calib = load_spec(f"cifar10-npz:{shared('data/cifar10_calib1000.npz')}").images.numpy()
        fp32 = build("cifar-resnet20").eval()
        load_weights(fp32, shared("models/cifar10_resnet20.th"))
        done("resnet20", bench_model("resnet20", fp32, cbdnet.load(args.cbd), (1, 3, 32, 32),
                                     [calib[i:i + 100] for i in range(0, 1000, 100)], args,
                                     data=(test.images, test.labels),
                                     weights=str(shared("models/cifar10_resnet20.th"))))
    for name in [m for m in args.models if m != "resnet20"]:
        torch.manual_seed(0)
        fp32 = build(name).eval()
        cbd, _ = cbdnet.compress(copy.deepcopy(fp32), cbdnet.RTNConfig(bits=4), calibration=None)
        calib = [rng.standard_normal((4, 3, 224, 224)).astype(np.float32) for _ in range(4)]
        done(name, bench_model(name, fp32, cbd, (1, 3, 224, 224), calib, args))


if __name__ == "__main__":
    main()
