"""The rate/accuracy plot of a sweep: one series per method, whole-file bits per weight on x, a y range around
the FP32 metric, the FP32 line and the band of evaluation noise."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np

from ..fileio import OutputSet
from .spec import series_label

__all__ = ["plot_pareto", "pareto_front", "noise_sigma"]

_MARKERS = "osD^vP*Xh<>p"


def pareto_front(xy: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both size (lower) and metric (higher), by increasing size."""
    front, best = [], -math.inf
    for x, y in sorted(xy, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def noise_sigma(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` (a fraction) measured on ``n`` images: sqrt(p(1-p)/n).
    Two models' accuracies on the same images differ by less than about 2 sigma from evaluation noise alone."""
    p = min(max(p, 0.0), 1.0)
    return math.sqrt(p * (1 - p) / n)


def _good(rows: list[dict], metric: str) -> list[dict]:
    return [r for r in rows if not r.get("error") and isinstance(r.get(metric), (int, float))
            and isinstance(r.get("file_bits_per_weight"), (int, float))]


def _y_range(ys: list[float], fp32: float | None, window: float) -> tuple[float, float]:
    if fp32 is not None:
        return max(min(ys, default=fp32) - 0.01, fp32 - window), fp32 + 0.015
    if ys:
        span = max(max(ys) - min(ys), 0.01)
        return min(ys) - 0.05 * span, max(ys) + 0.05 * span
    return 0.0, 1.0


def _draw_series(ax, name: str, rows: list[dict], metric: str, bottom: float, color: str, marker: str,
                 below: list[tuple[float, float]]) -> None:
    rows = sorted(rows, key=lambda r: r["file_bits_per_weight"])
    x = np.array([r["file_bits_per_weight"] for r in rows], float)
    y = np.array([r[metric] for r in rows], float)
    ax.plot(x, np.maximum(y, bottom), "-", color=color, alpha=0.35, lw=1)
    inside = y >= bottom
    ax.plot(x[inside], y[inside], marker, color=color, label=name if inside.any() else None, ls="none", ms=5)
    if (~inside).any():  # off the bottom of the range: an arrow on the edge, the value beside it
        ax.plot(x[~inside], np.full(int((~inside).sum()), bottom), "v", color=color, ms=8, clip_on=False,
                label=None if inside.any() else name)
        for bx, by in zip(x[~inside], y[~inside], strict=True):
            stacked = sum(1 for px, _ in below if abs(px - bx) < 1e-9)
            ax.annotate(f"{by:.3g}", xy=(bx, bottom), xytext=(6, 3 + 9 * stacked), textcoords="offset points",
                        fontsize=7, color=color, annotation_clip=False)
            below.append((float(bx), float(by)))


def plot_pareto(rows: list[dict], path: str | os.PathLike, *, metric: str = "top1", fp32: float | None = None,
                n_eval: int | None = None, window: float = 0.10, title: str | None = None,
                series: list[str] | None = None) -> Path:
    """``metric`` (a fraction) against whole-file bits per weight, one series per row series (or only those
    named in ``series``), with the Pareto front, the FP32 line (default: the rows' ``fp32_<metric>``) and a
    +-2 sigma band of binomial noise on ``n_eval`` images (default: the rows' ``n``). The y range runs from
    max(lowest point, FP32 - ``window``) to just above FP32; points below it are arrows on the bottom edge.
    The file is written under the output policy (an existing regular file is replaced atomically; a symbolic
    link, folder, device or FIFO at ``path`` is refused, never written through)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in _good(rows, metric) if series is None or (r.get("series") or series_label(r)) in series]
    if fp32 is None:
        ref = [r[f"fp32_{metric}"] for r in rows if isinstance(r.get(f"fp32_{metric}"), (int, float))]
        fp32 = float(np.median(ref)) if ref else None
    if n_eval is None:
        n_eval = max((r["n"] for r in good if isinstance(r.get("n"), int) and r["n"] > 0), default=None)
    bottom, top = _y_range([float(r[metric]) for r in good], fp32, window)
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    groups: dict[str, list[dict]] = {}
    for r in good:
        groups.setdefault(r.get("series") or series_label(r), []).append(r)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    below: list[tuple[float, float]] = []
    for i, (name, members) in enumerate(groups.items()):
        _draw_series(ax, name, members, metric, bottom, colors[i % len(colors)], _MARKERS[i % len(_MARKERS)], below)
    front = pareto_front([(r["file_bits_per_weight"], float(r[metric])) for r in good])
    if len(front) > 1:
        fx, fy = zip(*front, strict=True)
        ax.step(fx, np.maximum(fy, bottom), where="post", color="0.5", ls=":", lw=1, label="Pareto front")
    if fp32 is not None:
        ax.axhline(fp32, color="k", lw=1, label=f"FP32 {fp32:.4f}")
        if n_eval:
            band = 2 * noise_sigma(fp32, n_eval)
            ax.axhspan(fp32 - band, fp32 + band, color="k", alpha=0.08, lw=0,
                       label=f"±2σ noise (n={n_eval}): ±{band:.4f}")
    ax.set_ylim(bottom, top)
    xlabel = "whole-file bits per weight (file bytes x 8 / compressed weights)"
    if below:
        xlabel += f"\n▼ {len(below)} point(s) below the y range (< {bottom:.3g}; lowest " \
                  f"{min(v for _, v in below):.3g}), values beside"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    out = Path(path)
    with OutputSet(force=True) as files:  # the output policy: staged + renamed; no link/device/folder replaced
        files.write(files.add(out, what="plot"), buffer.getvalue())
        files.commit()
    return out
