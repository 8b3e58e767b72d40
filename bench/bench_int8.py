"""The int8 runtime against the float loaded model: latency (1 thread, interleaved) and top-1.

    PYTHONPATH=src nice python bench/bench_int8.py resnet18 [--rounds 7]
    PYTHONPATH=src nice python bench/bench_int8.py resnet20 [--rounds 5] [--cbd r20_t4.cbd]

``resnet18``: torchvision ResNet-18, random weights (seed 0), ``RTNConfig(bits=4)``, saved and loaded twice:
``cbdnet.load(path)`` (FP32) and ``cbdnet.load(path, runtime="int8", calibration=8 random batches of 2)``;
batch 1 and 16 at 224x224. A plain ``torch.ao`` FX int8 model of the same float weights (its own weight
observers) is timed too, as the ceiling of this CPU's int8 kernels. ``resnet20``: the pretrained CIFAR
ResNet-20 compressed with ``BudgetConfig(target_bits=4.0)`` and the 1,000 calibration images (as
``--target-bits 4.0 --calib``), top-1 on the full 10k test set for the float and the int8 runtime (activation
scales from the same calibration images), and latency at batch 64. ``--cbd FILE`` skips that compression and
uses a file made by ``cbdnet compress --arch cifar-resnet20 --target-bits 4.0 --calib ...`` (the same file that
bench_runtime.py and bench_int8_agree.py read, so their top-1 compare like with like).
Latencies are medians over rounds of the thread's CPU time (robust to preemption on a shared box), the
models interleaved within each round; wall-clock medians are printed beside them.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, shared  # noqa: E402

import cbdnet  # noqa: E402
from cbdnet.runtime import model_bytes  # noqa: E402
from cbdnet.zoo import build, load_weights  # noqa: E402
from cbdnet.zoo.data import load_spec  # noqa: E402

warnings.filterwarnings("ignore")


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next(line.split(":", 1)[1].split() for line in handle if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = []
    wanted = [f for f in flags if f.startswith(("avx2", "avx512", "avx_vnni", "amx"))]
    return (f"CPU flags: {' '.join(wanted) or 'none of avx2/avx512/vnni/amx'}; "
            f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}")


def timed(model, x, reps: int) -> tuple[float, float]:
    """(wall ms, thread CPU ms) per call."""
    with torch.no_grad():
        wall, cpu = time.perf_counter(), time.thread_time()
        for _ in range(reps):
            model(x)
        return (time.perf_counter() - wall) / reps * 1e3, (time.thread_time() - cpu) / reps * 1e3


def interleaved(models: dict, x: torch.Tensor, rounds: int, reps: int) -> dict[str, tuple[float, float]]:
    """Per model: (median thread CPU ms, median wall ms)."""
    with torch.no_grad():
        for model in models.values():
            model(x)
    times: dict[str, list] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(timed(model, x, reps))
    return {name: (statistics.median(t[1] for t in v), statistics.median(t[0] for t in v)) for name, v in times.items()}


def fp32_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + \
        sum(b.numel() * b.element_size() for b in model.buffers())


def plain_ao(model, calibration: list[torch.Tensor]):
    """torch.ao FX int8 of the float model with its own weight observers (reference only)."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from cbdnet.nn import CBDConv2d, CBDLinear

    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, (CBDConv2d, CBDLinear)):
            module.__class__ = torch.nn.Conv2d if isinstance(module, CBDConv2d) else torch.nn.Linear
            module.__dict__.pop("code_source", None)
            module.__dict__.pop("_code", None)
            module.__dict__.pop("_coded_weight", None)
    prepared = prepare_fx(plain, get_default_qconfig_mapping("x86"), (calibration[0][:1],))
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    return convert_fx(prepared)


def report_models(loaded, qmodel, seconds: float) -> None:
    report = qmodel.cbdnet_int8_report
    floats = [f"{layer.name} ({layer.reason})" for layer in report.layers if layer.runtime != "int8"]
    print(f"int8 layers {len(report.int8_layers)}/{len(report.layers)}; float: {floats or 'none'}; "
          f"int8 build {seconds:.1f} s")
    fp32, int8 = fp32_bytes(loaded), model_bytes(qmodel)
    weights, fp32_weights = report.weight_bytes, report.fp32_weight_bytes
    print(f"bytes: FP32 params+buffers {fp32 / 2**20:.2f} MiB, int8 model {int8 / 2**20:.2f} MiB "
          f"({int8 / fp32:.3f}x); int8 weights {weights / 2**20:.2f} MiB vs FP32 weights "
          f"{fp32_weights / 2**20:.2f} MiB ({weights / fp32_weights:.3f}x)")


def print_times(label: str, med: dict) -> None:
    fp32 = med["fp32"][0]
    parts = [f"{name} {cpu:.1f} ms (wall {wall:.1f})" for name, (cpu, wall) in med.items()]
    ratios = ", ".join(f"fp32/{name} {fp32 / cpu:.2f}x" for name, (cpu, _) in med.items() if name != "fp32")
    print(f"{label}: {'; '.join(parts)}; speed-up {ratios}")


def bench_resnet18(args, folder: Path) -> None:
    torch.manual_seed(0)
    model = build("torchvision:resnet18").eval()
    cbdnet.compress(model, cbdnet.RTNConfig(bits=4), progress=False)
    path = folder / "resnet18.cbd"
    cbdnet.save(model, path)
    generator = torch.Generator().manual_seed(1)
    calibration = [torch.randn(2, 3, 224, 224, generator=generator) for _ in range(8)]
    loaded = cbdnet.load(path)
    start = time.perf_counter()
    qmodel = cbdnet.load(path, runtime="int8", calibration=calibration)
    report_models(loaded, qmodel, time.perf_counter() - start)
    ao = plain_ao(loaded, calibration)
    x = torch.randn(16, 3, 224, 224, generator=generator)
    with torch.no_grad():
        ref, out = loaded(x), qmodel(x)
    print(f"logits max|int8 - fp32| {float((out - ref).abs().max()):.4f} (max |logit| {float(ref.abs().max()):.3f}); "
          f"top-1 agreement {float((out.argmax(1) == ref.argmax(1)).float().mean()):.3f} on 16 random images")
    for batch, reps in ((1, 10), (16, 1)):
        med = interleaved({"fp32": loaded, "int8": qmodel, "torch.ao": ao}, x[:batch], args.rounds, reps)
        print_times(f"batch {batch} ({args.rounds} rounds x {reps})", med)


def accuracy(model, data, batch: int = 500) -> float:
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch):
            labels = data.labels[start:start + batch]
            correct += int((model(data.images[start:start + batch]).argmax(1) == labels).sum())
    return correct / len(data)


def bench_resnet20(args, folder: Path) -> None:
    model = load_weights(build("cifar-resnet20"), shared("models/cifar10_resnet20.th")).eval()
    fp32_model = copy.deepcopy(model)
    calibration = load_spec(f"cifar10-npz:{shared('data/cifar10_calib1000.npz')}")
    if args.cbd:
        path = Path(args.cbd)
        size = path.stat().st_size
    else:
        cbdnet.compress(model, cbdnet.BudgetConfig(target_bits=4.0), calibration=calibration, progress=False)
        path = folder / "resnet20_tb4.cbd"
        size = cbdnet.save(model, path)
    loaded = cbdnet.load(path)
    start = time.perf_counter()
    qmodel = cbdnet.load(path, runtime="int8", calibration=calibration)
    report_models(loaded, qmodel, time.perf_counter() - start)
    test = load_spec(f"cifar10-npz:{shared('data/cifar10_test.npz')}")
    torch.set_num_threads(args.eval_threads)
    top1 = {name: accuracy(m, test) for name, m in (("fp32 original", fp32_model), ("float loaded", loaded),
                                                      ("int8 runtime", qmodel))}
    torch.set_num_threads(1)
    print(f"file {size} bytes; top-1 on {len(test)} test images: "
          + ", ".join(f"{name} {value:.4f}" for name, value in top1.items()))
    med = interleaved({"fp32": loaded, "int8": qmodel}, test.images[:64], args.rounds, 5)
    print_times(f"batch 64 ({args.rounds} rounds x 5)", med)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", choices=["resnet18", "resnet20"])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cbd", help="resnet20: use this .cbd (made by cbdnet compress --target-bits 4.0 --calib) "
                                      "instead of compressing here")
    parser.add_argument("--eval-threads", type=int, default=1, help="resnet20: threads for the top-1 (not timed)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(header())
    print(cpu_flags())
    with tempfile.TemporaryDirectory() as folder:
        (bench_resnet18 if args.which == "resnet18" else bench_resnet20)(args, Path(folder))


if __name__ == "__main__":
    main()
