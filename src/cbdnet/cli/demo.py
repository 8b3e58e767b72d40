"""``cbdnet demo``: the embedded default main job. Needs nothing outside the installed package.

Trains a small CNN on scikit-learn's bundled 8x8 digits (seconds on a CPU), compresses it at three CBD
settings and the plain uniform baseline, saves and reloads each ``.cbd`` file, and prints the per-layer
table, accuracy before/after and the file sizes.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..calib import CBDConfig, UniformConfig
from ..fileio import OutputSet
from ..format import compress_encoded
from ..zoo import load
from ..zoo.data import digits
from ..zoo.metrics import evaluate_classification
from ..zoo.models import build

# (method, J, bottleneck, fallback rule): the paper's algorithm (size rule), cbdnet's default (distortion rule),
# and the plain uniform baselines at about the same bits
SETTINGS = (("cbd", 4, 0.3, "size"), ("cbd", 5, 0.3, "size"), ("cbd", 4, 0.3, "distortion"),
            ("cbd", 5, 0.3, "distortion"), ("uniform", 3, 0.0, "size"), ("uniform", 4, 0.0, "size"))


def train_digits_cnn(seed: int = 0, epochs: int = 12, quiet: bool = False) -> torch.nn.Module:
    """A DigitsCNN trained with Adam on the digits train split (~97-99% test accuracy)."""
    torch.manual_seed(seed)
    model = build("digits-cnn")
    train = digits("train")
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with torch.enable_grad():
        _fit(model, train, optimiser, generator, epochs, quiet)
    return model.eval()


def _fit(model, train, optimiser, generator, epochs: int, quiet: bool) -> None:
    for epoch in range(epochs):
        order = torch.randperm(len(train), generator=generator)
        total = 0.0
        for start in range(0, len(train), 64):
            index = order[start:start + 64]
            loss = F.cross_entropy(model(train.images[index]), train.labels[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += loss.item() * len(index)
        if not quiet and (epoch + 1) % 4 == 0:
            print(f"  epoch {epoch + 1:2d}/{epochs}: train loss {total / len(train):.4f}", flush=True)


def run_demo(out_dir: str | None = None, quiet: bool = False, seed: int = 0, force: bool = False) -> list[dict]:
    """Train, compress at each setting and report. The ``.cbd`` files go to ``out_dir`` (default: a new temp
    dir) under the output policy (:class:`cbdnet.fileio.OutputSet`): all checked before training, all published
    together at the end; existing files are replaced only with ``force``."""
    folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="cbdnet-demo-"))
    try:  # a failed run leaves no folder it created (OutputSet.add_dir; the temp dir here), an old one as it was
        with OutputSet(force=force) as out:
            out.add_dir(folder, what="demo output directory")
            paths = [out.add(folder / _file_name(*setting), what="demo model") for setting in SETTINGS]
            rows = _run(out, paths, folder, quiet, seed)
            out.commit()
    except BaseException:
        if out_dir is None:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    return rows


def _file_name(method: str, planes: int, bottleneck: float, fallback: str) -> str:
    return f"digits_{method}_J{planes}_b{bottleneck}_{fallback}.cbd"


def _run(out: OutputSet, paths: list[Path], folder: Path, quiet: bool, seed: int) -> list[dict]:
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    start = time.perf_counter()
    say("cbdnet demo: training a small CNN on scikit-learn's 8x8 digits (1,257 train / 540 test images)")
    model = train_digits_cnn(seed=seed, quiet=quiet)
    test = digits("test")
    with torch.no_grad():
        fp32 = evaluate_classification(model, test, progress=False)
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters()) + 4 * sum(b.numel() for b in model.buffers())
    say(f"float32 model: top-1 {fp32['top1']:.4f}, {fp32_bytes:,} bytes of float32 tensors "
        f"(trained in {time.perf_counter() - start:.1f} s)")
    rows = []
    for (method, planes, bottleneck, fallback), path in zip(SETTINGS, paths, strict=True):
        config = UniformConfig(planes=planes) if method == "uniform" else \
            CBDConfig(planes=planes, bottleneck=bottleneck, fallback=fallback)
        compressed, report, encoded = compress_encoded(copy.deepcopy(model), config, progress=not quiet)
        uniform_layers = [layer for layer in report.layers if layer.mode == "uniform"]
        label = f"uniform J={planes} (baseline)" if method == "uniform" else \
            f"{'paper' if fallback == 'size' else 'cbdnet'} J={planes} b={bottleneck}"
        out.write(path, encoded)
        size = len(encoded)
        reloaded = load(out.staged(path))  # the very bytes that will be published
        with torch.no_grad():
            result = evaluate_classification(reloaded, test, progress=False)
        if (method, planes, fallback) == ("cbd", 5, "size"):
            say(f"\nper-layer report, {label} (the paper's algorithm):")
            say(report.table())
        if (method, planes, fallback) == ("cbd", 5, "distortion") and uniform_layers:
            say(f"\n{label}, cbdnet's default rule: {len(uniform_layers)} of {len(report.layers)} layers stored "
                f"with the uniform code instead, where the composite code's error costs more than its bits save:")
            for layer in uniform_layers:
                say(f"  {layer.name}: {layer.reason}")
        rows.append({"setting": label, "bits_per_weight": report.bits_per_weight, "file_bytes": size,
                     "file_bits_per_weight": 8 * size / report.params,
                     "uniform_layers": len(uniform_layers) if method == "cbd" else len(report.layers),
                     "top1": result["top1"], "path": str(path)})
    say(f"\n{'setting':<28} {'bits/weight':>11} {'file bits/w':>11} {'file bytes':>11} {'top-1':>7} "
        f"{'uniform layers':>14}")
    say(f"{'float32':<28} {32.0:>11.3f} {'':>11} {fp32_bytes:>11,} {fp32['top1']:>7.4f} {'-':>14}")
    for row in rows:  # bits/weight: the paper's count of the codes; file bits/w: the whole .cbd file
        say(f"{row['setting']:<28} {row['bits_per_weight']:>11.3f} {row['file_bits_per_weight']:>11.3f} "
            f"{row['file_bytes']:>11,} {row['top1']:>7.4f} {row['uniform_layers']:>14}")
    say(f"\nfiles in {folder} (each reloaded from disk before evaluation); total {time.perf_counter() - start:.1f} s")
    return rows
