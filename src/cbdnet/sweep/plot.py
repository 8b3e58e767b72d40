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

__all__ = ["plot_pareto", "pareto_front", "noise_sigma", "place_labels", "point_setting"]

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


# A point's settings in a few characters, for the label beside its marker: the options that vary within a series.
_SHORT = (("target-bits", "t{}"), ("bits", "{}b"), ("planes", "J{}"), ("bottleneck", "b{}"),
          ("calib-images", "n{}"), ("adaround", "ar{}"))


def point_setting(row: dict) -> str:
    """The label of a point on the plot: its size settings in short, e.g. ``t3.0`` (``--target-bits 3``),
    ``4b`` (rtn 4 bits), ``J5 b0.3`` (cbd planes and bottleneck)."""
    return " ".join(form.format(row[key]) for key, form in _SHORT if row.get(key) not in (None, False))


# Where a label may go around its point, in points (x, y), tried in this order: right, above, below, left, further.
_OFFSETS = ((5, 4), (5, -11), (-6, 7), (-6, -14), (9, 14), (9, -21), (-14, 17), (-14, -24), (5, 26), (5, -33),
            (-14, 29), (-14, -36), (5, 38), (5, -45), (-14, 41), (5, 50), (-14, 53), (5, 62))


def place_labels(ax, points: list[tuple[float, float]], texts: list[str], colors: list[str] | None = None,
                 fontsize: float = 6.5) -> list:
    """Write ``texts`` beside their ``points`` (data coordinates) where they overlap neither another label nor
    any marker: each label takes the first offset of :data:`_OFFSETS` that is free, else the least covered one.
    Returns the annotations."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    to_pixels = ax.transData.transform
    pad = 3.5 * fig.dpi / 72  # about a marker's half size
    taken = [(x - pad, y - pad, x + pad, y + pad) for x, y in (to_pixels(p) for p in points)]
    frame = ax.get_window_extent(renderer)
    inside = (frame.x0, frame.y0, frame.x1, frame.y1)
    placed = []
    for i, (point, text) in enumerate(zip(points, texts, strict=True)):
        if not text:
            continue
        best, best_cover = None, None
        for dx, dy in _OFFSETS:
            note = ax.annotate(text, xy=point, xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                               color=(colors or ["0.3"] * len(texts))[i], ha="left" if dx >= 0 else "right",
                               annotation_clip=False)
            extent = note.get_window_extent(renderer)
            box = (extent.x0, extent.y0, extent.x1, extent.y1)
            outside = (box[2] - box[0]) * (box[3] - box[1]) - _overlap(box, inside)  # off the axes: as bad
            cover = outside + sum(_overlap(box, other) for other in taken)
            if best is None or cover < best_cover:
                if best is not None:
                    best[0].remove()
                best, best_cover = (note, box), cover
            else:
                note.remove()
            if cover == 0:
                break
        assert best is not None  # _OFFSETS is not empty, so one placement was tried
        taken.append(best[1])
        placed.append(best[0])
    return placed


def _overlap(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    return width * height if width > 0 and height > 0 else 0.0


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
                 below: list[tuple[float, float]], labels: list[tuple[tuple[float, float], str, str]]) -> None:
    rows = sorted(rows, key=lambda r: r["file_bits_per_weight"])
    x = np.array([r["file_bits_per_weight"] for r in rows], float)
    y = np.array([r[metric] for r in rows], float)
    ax.plot(x, np.maximum(y, bottom), "-", color=color, alpha=0.35, lw=1)
    inside = y >= bottom
    ax.plot(x[inside], y[inside], marker, color=color, label=name if inside.any() else None, ls="none", ms=5)
    if (~inside).any():  # off the bottom of the range: an arrow on the edge, the value beside it
        ax.plot(x[~inside], np.full(int((~inside).sum()), bottom), "v", color=color, ms=8, clip_on=False,
                label=None if inside.any() else name)
        below.extend((float(bx), float(by)) for bx, by in zip(x[~inside], y[~inside], strict=True))
    for row, px, py in zip(rows, x, y, strict=True):  # each point: its settings, and its value if off the range
        text = point_setting(row) + ("" if py >= bottom else f" ({py:.3g})")
        labels.append(((float(px), float(max(py, bottom))), text.strip(), color))


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
    labels: list[tuple[tuple[float, float], str, str]] = []
    for i, (name, members) in enumerate(groups.items()):
        _draw_series(ax, name, members, metric, bottom, colors[i % len(colors)], _MARKERS[i % len(_MARKERS)], below,
                     labels)
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
                  f"{min(v for _, v in below):.3g}), values in brackets"
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    if labels:  # after the layout: the labels are placed in the final pixel coordinates
        points, texts, label_colors = zip(*labels, strict=True)
        place_labels(ax, list(points), list(texts), list(label_colors))
    buffer = io.BytesIO()
    fig.savefig(buffer, format=Path(path).suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    out = Path(path)
    with OutputSet(force=True) as files:  # the output policy: staged + renamed; no link/device/folder replaced
        files.write(files.add(out, what="plot"), buffer.getvalue())
        files.commit()
    return out
