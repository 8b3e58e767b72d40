"""Rate/accuracy of cbdnet against NNCodec on ResNet-20: top-1 over whole-file bits per weight, one plot.

    .venv/bin/python bench/rate_accuracy_plot.py --cbdnet POINTS.json -o docs/rate_accuracy_resnet20.png

NNCodec's curve comes from bench/results/nncodec_resnet20.json (bench/nncodec_resnet20.py). cbdnet's points are a
JSON list of ``{"label", "file_bits_per_weight", "top1"}`` (optionally ``"bytes"``, and ``"series"`` to draw
points as one line per series; else bytes =
file_bits_per_weight * weights / 8). For each cbdnet point it prints NNCodec's bytes at the same top-1,
interpolated linearly in top-1 between the measured QPs on NNCodec's monotone front (the fewest bytes that reach
each top-1), and the ratio cbdnet bytes / NNCodec bytes. A second table takes every accuracy level, not only
cbdnet's points: for each top-1 that either tool measured, the smallest real file of each that reaches it (per
cbdnet series), and prints the worst ratio and the levels only NNCodec reaches.

Top-1 on the 10,000 test images is noisy (sigma about 0.4 points for a single model) and NNCodec's top-1 is
not monotone in QP, so the monotone front keeps NNCodec's luckiest QPs while each cbdnet point is one draw: the
denser NNCodec is sampled, the better its front looks. A second estimate is printed beside it: each curve
(NNCodec's QPs; each cbdnet series) replaced by its isotonic fit (least-squares non-decreasing top-1 in bytes,
pool-adjacent-violators: neighbours that break the order are averaged, not dropped), and the ratio taken at
the cbdnet point's fitted top-1 on NNCodec's fitted curve. Neither estimate is tuned: both are printed.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from cbdnet.sweep.plot import place_labels

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nncodec", type=Path, default=REPO / "bench" / "results" / "nncodec_resnet20.json")
    p.add_argument("--cbdnet", type=Path, help="JSON list of {label, file_bits_per_weight, top1[, bytes]}, or a "
                                                "`cbdnet sweep` results.json (its finished points)")
    p.add_argument("-o", "--out", type=Path, help="write the plot here, e.g. docs/rate_accuracy_resnet20.png")
    return p.parse_args()


def monotone_front(points: list[dict]) -> list[dict]:
    """NNCodec's points by increasing bytes, keeping only those whose top-1 beats every smaller file: top-1 is
    then strictly increasing in bytes, so bytes is a function of top-1."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: p["bytes"]):
        if p["top1"] > best:
            front.append(p)
            best = p["top1"]
    return front


def bytes_at(front: list[dict], top1: float) -> float | None:
    """NNCodec's bytes at ``top1``, piecewise-linear in top-1 on the front; None outside its measured range."""
    accs = np.array([p["top1"] for p in front])
    if len(front) == 0 or top1 < accs[0] or top1 > accs[-1]:
        return None
    return float(np.interp(top1, accs, [p["bytes"] for p in front]))


def isotonic(values: list[float]) -> list[float]:
    """The least-squares non-decreasing fit of ``values`` (in their order): pool adjacent violators."""
    blocks: list[list[float]] = []  # [mean, count]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, n1), (m2, n2) = blocks.pop(-2), blocks.pop(-1)
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(int(n))]


def fitted_curve(points: list[dict]) -> list[tuple[int, float]]:
    """``(bytes, fitted top-1)`` by increasing bytes."""
    ordered = sorted(points, key=lambda p: p["bytes"])
    return list(zip([p["bytes"] for p in ordered], isotonic([p["top1"] for p in ordered]), strict=True))


def bytes_at_fitted(curve: list[tuple[int, float]], top1: float) -> float | None:
    """The fewest bytes at which the fitted curve reaches ``top1`` (linear between fitted points); None
    outside its range."""
    if not curve or top1 < curve[0][1] or top1 > curve[-1][1]:
        return None
    for (b0, a0), (b1, a1) in zip([curve[0]] + curve[:-1], curve, strict=True):
        if a1 >= top1:
            return float(b1) if a1 == a0 else float(b0 + (b1 - b0) * (top1 - a0) / (a1 - a0))
    return None


def _size(c: dict, weights: int) -> float:
    return c.get("bytes") or c["file_bits_per_weight"] * weights / 8


def fitted_top1(cbd: list[dict], weights: int) -> list[float]:
    """Each cbdnet point's top-1 on its series' isotonic fit (a point without a series is its own)."""
    series: dict[str, list[int]] = {}
    for i, c in enumerate(cbd):
        series.setdefault(c.get("series") or f"#{i}", []).append(i)
    fitted = [c["top1"] for c in cbd]
    for members in series.values():
        order = sorted(members, key=lambda i: _size(cbd[i], weights))
        for i, value in zip(order, isotonic([cbd[i]["top1"] for i in order]), strict=True):
            fitted[i] = value
    return fitted


def _ratio(size: float, ref: float | None) -> tuple[str, str]:
    return ("outside NNCodec's range", "—") if ref is None else (f"{ref:,.0f} B", f"{size / ref:.3f}")


def compare(cbd: list[dict], front: list[dict], weights: int, nnc_points: list[dict] | None = None) -> list[str]:
    """One markdown row per cbdnet point: its bytes, NNCodec's bytes at the same top-1 and the ratio, on the
    monotone front and (given ``nnc_points``) on the isotonic fits of both curves."""
    curve = fitted_curve(nnc_points) if nnc_points else None
    fitted = fitted_top1(cbd, weights)
    head = "| cbdnet point | file bits per weight | whole file | top-1 | NNCodec at equal top-1 | cbdnet / NNCodec |"
    rule = "| --- | ---: | ---: | ---: | ---: | ---: |"
    if curve:
        head += " fitted top-1 | NNCodec at it (isotonic fits) | cbdnet / NNCodec (fits) |"
        rule += " ---: | ---: | ---: |"
    rows = [head, rule]
    for c, fit in zip(cbd, fitted, strict=True):
        size = _size(c, weights)
        peer, ratio = _ratio(size, bytes_at(front, c["top1"]))
        row = f"| {c['label']} | {c['file_bits_per_weight']:.3f} | {size:,.0f} B | {c['top1']:.4f} | {peer} | {ratio} |"
        if curve:
            fit_peer, fit_ratio = _ratio(size, bytes_at_fitted(curve, fit))
            row += f" {fit:.4f} | {fit_peer} | {fit_ratio} |"
        rows.append(row)
    return rows


def smallest_reaching(points: list[tuple[float, float]], top1: float) -> float | None:
    """The fewest bytes of a file (``(bytes, top-1)`` pairs) whose top-1 is at least ``top1``; None if none."""
    sizes = [size for size, acc in points if acc >= top1]
    return min(sizes) if sizes else None


def every_level(cbd: list[dict], nnc_points: list[dict], weights: int) -> list[str]:
    """The ratio at *every* accuracy level, not only at cbdnet's points: for each top-1 ``a`` measured by either
    tool, the smallest file of each that reaches ``a`` (real files, no interpolation), per cbdnet series; the
    worst ratio and where it is, and the levels only one tool reaches."""
    nnc = [(float(p["bytes"]), p["top1"]) for p in nnc_points]
    series: dict[str, list[tuple[float, float]]] = {}
    for c in cbd:
        series.setdefault(c.get("series") or c["label"], []).append((_size(c, weights), c["top1"]))
    rows = ["| cbdnet series | points | worst cbdnet / NNCodec (real files, every top-1 both reach) | at top-1 |"
            " top-1 only NNCodec reaches |", "| --- | ---: | ---: | ---: | --- |"]
    for name, points in series.items():
        levels = sorted({acc for _, acc in points} | {acc for _, acc in nnc})
        worst, where, only = 0.0, None, []
        for level in levels:
            mine, theirs = smallest_reaching(points, level), smallest_reaching(nnc, level)
            if mine is None and theirs is not None:
                only.append(f"{level:.4f}")
            elif mine is not None and theirs is not None and mine / theirs > worst:
                worst, where = mine / theirs, level
        rows.append(f"| {name} | {len(points)} | {worst:.3f} | {where:.4f} | {', '.join(only) or 'none'} |")
    return rows


def plot(nnc: dict, cbd: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = sorted(nnc["points"], key=lambda p: p["bytes"])
    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    ax.plot([p["file_bits_per_weight"] for p in pts], [p["top1"] for p in pts], "o-", color="tab:gray",
            label=f"{nnc['tool'].replace('nncodec', 'NNCodec')} (data-free, QP {pts[-1]['qp']} … {pts[0]['qp']})")
    groups: dict[str, list[dict]] = {}
    for c in cbd:  # points with a "series" are drawn as one line per series, the others one by one
        groups.setdefault(c.get("series") or c["label"], []).append(c)
    for i, (name, members) in enumerate(groups.items()):
        members = sorted(members, key=lambda c: c["file_bits_per_weight"])
        ax.plot([c["file_bits_per_weight"] for c in members], [c["top1"] for c in members],
                "sDo^v"[i % 5] + ("-" if len(members) > 1 else ""), color=f"C{i % 10}", label=f"cbdnet {name}")
    if nnc.get("fp32"):
        ax.axhline(nnc["fp32"]["top1"], color="k", lw=0.8, ls="--", label=f"FP32 {nnc['fp32']['top1']:.4f}")
    accs = [p["top1"] for p in pts] + [c["top1"] for c in cbd] + ([nnc["fp32"]["top1"]] if nnc.get("fp32") else [])
    ax.set_ylim(max(min(accs) - 0.02, 0.0), max(accs) + 0.01)
    ax.set_xlabel(f"whole file bits per Conv/Linear weight (file bytes × 8 / {nnc['weights_counted']:,})")
    ax.set_ylabel("CIFAR-10 test top-1")
    ax.set_title("ResNet-20: rate/accuracy, cbdnet vs NNCodec")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    # NNCodec's QP beside each of its points, clear of every marker (cbdnet's included) and of the other labels
    obstacles = [(p["file_bits_per_weight"], p["top1"]) for p in pts] + \
        [(c["file_bits_per_weight"], c["top1"]) for c in cbd]
    place_labels(ax, obstacles, [str(p["qp"]) for p in pts] + [""] * len(cbd), ["tab:gray"] * len(obstacles),
                 fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def points_of(entries: list[dict]) -> list[dict]:
    """cbdnet points from a points list or a sweep's results.json (finished points with a file size)."""
    out = []
    for entry in entries:
        if "status" not in entry:
            out.append(entry)
        elif entry["status"] == "done" and entry.get("file_bytes"):
            label = " ".join(f"{key}={entry[key]}" for key in ("target-bits", "method", "bits", "planes")
                             if key in entry)
            out.append({"label": label, "series": entry["series"], "bytes": entry["file_bytes"],
                        "file_bits_per_weight": entry["file_bits_per_weight"], "top1": entry["top1"]})
    return out


def main() -> None:
    args = parse_args()
    nnc = json.loads(args.nncodec.read_text())
    cbd = points_of(json.loads(args.cbdnet.read_text())) if args.cbdnet else []
    front = monotone_front(nnc["points"])
    print(f"NNCodec front: {len(front)} of {len(nnc['points'])} QPs, top-1 {front[0]['top1']:.4f} … "
          f"{front[-1]['top1']:.4f} ({front[0]['bytes']:,} … {front[-1]['bytes']:,} B)")
    if cbd:
        print("\n".join(compare(cbd, front, nnc["weights_counted"], nnc["points"])))
        print()
        print("\n".join(every_level(cbd, nnc["points"], nnc["weights_counted"])))
    if args.out:
        plot(nnc, cbd, args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
