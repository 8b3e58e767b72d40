"""``cbdnet demo``: the embedded default job, what cbdnet is for, in about a minute. Needs nothing outside the
installed package (scikit-learn's bundled 8x8 digits; no download, no ../shared).

It trains a small CNN, then compresses it three ways and compares them at equal size: the paper's code
(composite binary decomposition, J planes, the paper's size rule), the plain baseline (round-to-nearest, K bits
per channel, no data) and cbdnet's calibrated budget (``--target-bits`` with ``--calib`` training images: the
best code per layer within the paper's file size, exactly). Every file is saved, reloaded from disk and scored
on the test images: top-1, and fidelity to the float model (agreement of the top-1 decisions, and the KL
divergence of the float model's predictions to the compressed one's). One table, led by the whole file's bits
per weight, and a plot.
"""

from __future__ import annotations

import contextlib
import copy
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..calib import BudgetConfig, CalibrationConfig, CBDConfig, RTNConfig
from ..fileio import OutputSet
from ..format import compress_encoded
from ..zoo import load
from ..zoo.data import digits
from ..zoo.models import build

# (kind, K): the paper's code with J=K planes (bottleneck 0.3, per tensor, the paper's size rule), the baseline
# round-to-nearest with K bits per channel, and the calibrated budget held to the size of the paper's J=K file
SETTINGS = (("paper", 2), ("paper", 3), ("rtn", 2), ("rtn", 3), ("budget", 2), ("budget", 3))
CALIBRATION_IMAGES = 512  # of the 1,257 training images: GPTQ's cost grows with them, the result hardly
PLOT = "cbdnet-demo.png"

__all__ = ["run_demo", "train_digits_cnn", "SETTINGS"]
LABELS = {"paper": "paper's code J={}", "rtn": "baseline rtn {} bits", "budget": "calibrated budget"}


def train_digits_cnn(seed: int = 0, epochs: int = 8, quiet: bool = False) -> torch.nn.Module:
    """A DigitsCNN trained with Adam on the digits train split (~99% test accuracy; the training loss is below
    0.001 after 8 epochs, so more buy nothing but time)."""
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


def run_demo(out_dir: str | None = None, quiet: bool = False, seed: int = 0, force: bool = False,
             plot: str | None = None) -> list[dict]:
    """Train, compress at each setting, report; returns the table's rows. The ``.cbd`` files go to ``out_dir``
    (default: a temp folder, removed at the end) under the output policy (:class:`cbdnet.fileio.OutputSet`):
    all checked before training, all published together at the end; existing files are replaced only with
    ``force``. The plot goes to ``plot`` (default: ``out_dir``/cbdnet-demo.png, or cbdnet-demo.png in the
    current folder when no ``out_dir`` is given, left as it is if it exists there; ``""``: no plot)."""
    keep = out_dir is not None
    folder = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="cbdnet-demo-"))
    try:  # a failed run leaves no folder it created (OutputSet.add_dir; the temp dir here), an old one as it was
        with OutputSet(force=force) as out:
            out.add_dir(folder, what="demo output directory")
            paths = [out.add(folder / _file_name(*setting), what="demo model") for setting in SETTINGS]
            plot_path = _plot_target(out, plot, folder if keep else None, force)
            rows = _run(out, paths, plot_path, quiet, seed)
            out.commit()
    finally:
        if not keep:
            with contextlib.suppress(OSError):
                shutil.rmtree(folder)
    if not quiet:
        where = f"files in {folder}" if keep else "the .cbd files were in a temporary folder, now removed " \
                                                  "(--out-dir DIR keeps them)"
        if plot_path is not None:
            where += f"; plot: {plot_path}"
        elif plot is None:
            where += f"; {PLOT} exists here: left as it is (--force replaces it)"
        print(where, flush=True)
    return rows


def _file_name(kind: str, k: int) -> str:
    return f"digits_{kind}_{k}.cbd"


def _plot_target(out: OutputSet, plot: str | None, folder: Path | None, force: bool) -> Path | None:
    """The plot's path, registered with the other outputs; the default in the current folder is skipped (not
    refused) where a file is there already and ``force`` is not given, so that a second demo run works."""
    if plot == "":
        return None
    if plot is not None:
        return out.add(Path(plot), what="demo plot")
    if folder is not None:
        return out.add(folder / PLOT, what="demo plot")
    default = Path(PLOT)
    if (default.exists() or default.is_symlink()) and not force:
        return None
    return out.add(default, what="demo plot")


def _config(kind: str, k: int, sizes: dict[tuple[str, int], float]):
    if kind == "paper":
        return CBDConfig(planes=k, bottleneck=0.3, fallback="size")
    if kind == "rtn":
        return RTNConfig(bits=k)
    return BudgetConfig(target_bits=sizes.get(("paper", k), k + 0.5))  # equal size: the paper's J=k file


def _scores(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor) -> dict:
    """Top-1, and fidelity to the float model: the share of images where both decide alike, and the mean
    KL(float || compressed) of their predicted distributions, in nats."""
    with torch.no_grad():
        logp = F.log_softmax(model(images).float(), dim=1)
    decided = logp.argmax(1)
    kl = (reference.exp() * (reference - logp)).sum(1).mean().item()
    return {"top1": (decided == labels).float().mean().item(),
            "agreement": (decided == reference.argmax(1)).float().mean().item(), "kl": max(kl, 0.0)}


def _run(out: OutputSet, paths: list[Path], plot_path: Path | None, quiet: bool, seed: int) -> list[dict]:
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    start = time.perf_counter()
    say("cbdnet demo: training a small CNN on scikit-learn's 8x8 digits (1,257 train / 540 test images)")
    model = train_digits_cnn(seed=seed, quiet=quiet)
    test, train = digits("test"), digits("train")
    with torch.no_grad():
        reference = F.log_softmax(model(test.images).float(), dim=1)
    fp32 = _scores(model, test.images, test.labels, reference)
    say(f"float32 model: top-1 {fp32['top1']:.4f} (trained in {time.perf_counter() - start:.1f} s); compressing "
        f"it {len(SETTINGS)} ways, each file reloaded from disk and scored")
    calibration = CalibrationConfig(images=CALIBRATION_IMAGES)
    rows: list[dict] = []
    sizes: dict[tuple[str, int], float] = {}
    for (kind, k), path in zip(SETTINGS, paths, strict=True):
        config = _config(kind, k, sizes)
        _, report, encoded = compress_encoded(copy.deepcopy(model), config, progress=False,
                                              calibration=train if kind == "budget" else None,
                                              calibration_config=calibration if kind == "budget" else None)
        out.write(path, encoded)
        reloaded = load(out.staged(path))  # the very bytes that will be published
        bits = 8 * len(encoded) / report.params
        sizes[(kind, k)] = bits
        label = LABELS[kind].format(k) + (f" (at paper J={k}'s size)" if kind == "budget" else "")
        rows.append({"setting": label, "kind": kind, "k": k, "file_bits_per_weight": bits,
                     "file_bytes": len(encoded), "bits_per_weight": report.bits_per_weight,
                     "seconds": report.seconds, "path": str(path),
                     **_scores(reloaded, test.images, test.labels, reference)})
    _print_table(say, rows, fp32, model)
    _print_verdict(say, rows)
    if plot_path is not None:
        out.write(plot_path, _plot_bytes(rows, fp32))
    say(f"total {time.perf_counter() - start:.1f} s")
    return rows


def _print_table(say, rows: list[dict], fp32: dict, model: torch.nn.Module) -> None:
    fp32_bytes = 4 * sum(p.numel() for p in model.parameters())
    say(f"\n{'whole-file bits/weight':>22}  {'file bytes':>10}  {'setting':<40} {'top-1':>6} {'agreement':>9} "
        f"{'KL':>8}  {'paper count':>11}")
    say(f"{'32 (float)':>22}  {fp32_bytes:>10,}  {'float32 (the reference)':<40} {fp32['top1']:>6.4f} "
        f"{1.0:>9.4f} {0.0:>8.5f}  {'-':>11}")
    for row in sorted(rows, key=lambda r: r["file_bits_per_weight"]):
        say(f"{row['file_bits_per_weight']:>22.3f}  {row['file_bytes']:>10,}  {row['setting']:<40} "
            f"{row['top1']:>6.4f} {row['agreement']:>9.4f} {row['kl']:>8.5f}  {row['bits_per_weight']:>11.3f}")
    say("whole-file bits/weight: the .cbd file's bytes x 8 / compressed weights (header and float tensors "
        "included); agreement: test images where the compressed model decides as the float one; KL: mean "
        "KL(float || compressed) in nats; paper count: the paper's fixed-length count of the codes\n")


def _print_verdict(say, rows: list[dict]) -> None:
    """One line per budget file: what the paper's code scores at the same size, and the baseline at the
    smallest size at least as large."""
    for row in (r for r in rows if r["kind"] == "budget"):
        paper = next((r for r in rows if r["kind"] == "paper" and r["k"] == row["k"]), None)
        if paper is None:
            continue
        size = row["file_bits_per_weight"]
        text = (f"at {size:.2f} bits/weight: calibrated budget top-1 {row['top1']:.4f} KL {row['kl']:.5f}; "
                f"paper's code (J={paper['k']}, {paper['file_bits_per_weight']:.2f}) {paper['top1']:.4f} "
                f"KL {paper['kl']:.5f}")
        larger = [r for r in rows if r["kind"] == "rtn" and r["file_bits_per_weight"] >= size]
        if larger:
            best = min(larger, key=lambda r: r["file_bits_per_weight"])
            text += (f"; baseline ({best['k']} bits, larger: {best['file_bits_per_weight']:.2f}) "
                     f"{best['top1']:.4f} KL {best['kl']:.5f}")
        say(text)


def _plot_bytes(rows: list[dict], fp32: dict) -> bytes:
    """Top-1 and KL over whole-file bits per weight, one line per kind, each point labelled with its setting."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..sweep.plot import place_labels

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.0, 6.0), dpi=110, sharex=True)
    styles = {"paper": ("C1", "D"), "rtn": ("C0", "s"), "budget": ("C2", "o")}
    names = {"paper": "paper's code (CBD, J planes)", "rtn": "baseline: round-to-nearest, K bits",
             "budget": "cbdnet: calibrated budget (--target-bits --calib)"}
    marks: dict = {top: [], bottom: []}
    for kind, (color, marker) in styles.items():
        members = sorted((r for r in rows if r["kind"] == kind), key=lambda r: r["file_bits_per_weight"])
        if not members:
            continue
        x = [r["file_bits_per_weight"] for r in members]
        top.plot(x, [r["top1"] for r in members], marker + "-", color=color, label=names[kind])
        bottom.plot(x, [max(r["kl"], 1e-5) for r in members], marker + "-", color=color)
        for r in members:
            text = f"J={r['k']}" if kind == "paper" else f"{r['k']} bits" if kind == "rtn" else f"size of J={r['k']}"
            marks[top].append(((r["file_bits_per_weight"], r["top1"]), text, color))
            marks[bottom].append(((r["file_bits_per_weight"], max(r["kl"], 1e-5)), text, color))
    top.axhline(fp32["top1"], color="k", lw=0.8, ls="--", label=f"float32 {fp32['top1']:.4f}")
    top.set_ylabel("test top-1")
    top.set_title("digits CNN: the three at equal size")
    top.legend(fontsize=7, loc="lower right")
    bottom.set_yscale("log")
    bottom.set_ylabel("KL(float || compressed)")
    bottom.set_xlabel("whole-file bits per weight (file bytes x 8 / compressed weights)")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    for ax, found in marks.items():
        if found:
            points, texts, colors = zip(*found, strict=True)
            place_labels(ax, list(points), list(texts), list(colors))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()

