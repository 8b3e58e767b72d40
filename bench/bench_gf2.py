"""GF(2) rank table: plain reference vs galois vs M4RI (passagemath binding) vs cbdnet.gf2, same run.

    PYTHONPATH=src python bench/bench_gf2.py [--sizes 192,384,...] [--densities 0.01,0.1,0.5]

Random square 0/1 matrices (seeded) of each size and density. Every method's rank is checked against the
others (the script exits 1 on any mismatch). Times are the best of ``--repeat`` wall-clock runs; the plain
reference and galois are slow, so they are timed up to ``--ref-max`` / ``--galois-max`` and *extrapolated*
above that (marked ``~``) along the power law through the two largest timed sizes of the same density.
M4RI and galois are timed on their own matrix objects (conversion from numpy not counted); cbdnet is timed
through its public API from a bool numpy array (packing included).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gf2_reference import reference_rank  # noqa: E402

from cbdnet.codec import gf2  # noqa: E402


def machine() -> str:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{platform.node()} {model}, {os.cpu_count()} cores, {platform.python_version()}, load avg {load}"


def best_time(fn, repeat: int) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def optional_backends() -> dict:
    backends = {}
    try:
        import galois

        field = galois.GF(2)
        backends["galois"] = (lambda a: field(a), lambda x: int(np.linalg.matrix_rank(x)), galois.__version__)
    except ImportError as exc:
        print(f"# galois: not installed ({exc})")
    try:
        from sage.all__sagemath_modules import GF, MatrixSpace

        def to_m4ri(a):
            return MatrixSpace(GF(2), *a.shape)(a)

        def m4ri_rank(m):  # Matrix_mod2_dense caches its rank: time a fresh copy each call
            return int(m.__copy__().rank())

        from importlib.metadata import version
        backends["m4ri"] = (to_m4ri, m4ri_rank, "passagemath-m4ri-m4rie " + version("passagemath-m4ri-m4rie"))
    except ImportError as exc:
        print(f"# M4RI (passagemath-m4ri-m4rie): not installed ({exc})")
    return backends


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="192,384,768,1536,2048,3072,4096")
    parser.add_argument("--densities", default="0.01,0.1,0.5")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--ref-max", type=int, default=1536, help="largest size the plain reference is timed on")
    parser.add_argument("--galois-max", type=int, default=1536, help="largest size galois is timed on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    densities = [float(d) for d in args.densities.split(",")]
    print("# command: python " + " ".join(sys.argv))
    print(f"# date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M UTC}")
    print(f"# machine: {machine()}")
    backends = optional_backends()
    print("# versions: numpy " + np.__version__ + "; " + "; ".join(f"{k} {v[2]}" for k, v in backends.items()))
    rng = np.random.default_rng(args.seed)
    warm = rng.random((70, 70)) < 0.5
    gf2.rank(warm), gf2.factor(warm)  # compile outside the timings
    for convert, rank_of, _ in backends.values():
        rank_of(convert(warm.astype(np.uint8)))
    rows, failures = [], 0
    head = (f"{'dens':>5} {'n':>5} {'rank':>5} {'reference s':>12} {'galois s':>11} {'m4ri ms':>9} {'cbdnet ms':>10} "
            f"{'factor ms':>10} {'ref/galois':>10} {'ref/m4ri':>9} {'ref/cbdnet':>11} {'m4ri/cbdnet':>11}")
    print(head)
    for density in densities:
        timed_ref: list[tuple[int, float]] = []
        timed_gal: list[tuple[int, float]] = []
        for n in sizes:
            bits = rng.random((n, n)) < density
            ranks = {}
            t_cbd, ranks["cbdnet"] = best_time(lambda b=bits: gf2.rank(b), args.repeat)
            t_fac, (left, right) = best_time(lambda b=bits: gf2.factor(b), max(1, args.repeat // 2))
            ranks["factor"] = left.shape[1]
            row = {"density": density, "n": n, "cbdnet_s": t_cbd, "cbdnet_factor_s": t_fac}
            if n <= args.ref_max:
                row["reference_s"], ranks["reference"] = best_time(lambda b=bits: reference_rank(b), 1)
                timed_ref.append((n, row["reference_s"]))
            elif timed_ref:
                row["reference_s_extrapolated"] = _extrapolate(timed_ref, n)
            for name, (convert, rank_of, _) in backends.items():
                if name == "galois" and n > args.galois_max:
                    if timed_gal:
                        row["galois_s_extrapolated"] = _extrapolate(timed_gal, n)
                    continue
                obj = convert(bits.astype(np.uint8))
                row[f"{name}_s"], ranks[name] = best_time(lambda o=obj, f=rank_of: f(o),
                                                          args.repeat if name == "m4ri" else 1)
                if name == "galois":
                    timed_gal.append((n, row["galois_s"]))
            row["rank"] = ranks["cbdnet"]
            row["ranks_agree"] = len(set(ranks.values())) == 1
            if not row["ranks_agree"]:
                failures += 1
                print(f"# RANK MISMATCH at density {density} n {n}: {ranks}")
            rows.append(row)
            print(_line(row), flush=True)
    print("# '~' = extrapolated (not measured) along the power law through the two largest timed sizes; "
          "ratios are time(a)/time(b)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"# ranks agree across all methods: {'yes' if failures == 0 else f'NO ({failures} mismatches)'}")
    return 1 if failures else 0


def _extrapolate(timed: list[tuple[int, float]], n: int) -> float:
    """Time at size ``n`` on the power law through the two largest timed sizes (n^3 if only one)."""
    (n1, t1), (n2, t2) = (timed[-2], timed[-1]) if len(timed) > 1 else ((timed[-1][0] / 2, timed[-1][1] / 8),
                                                                        timed[-1])
    exponent = np.log(t2 / t1) / np.log(n2 / n1)
    return t2 * (n / n2) ** exponent


def _pick(row: dict, key: str) -> tuple[float | None, str]:
    if f"{key}_s" in row:
        return row[f"{key}_s"], ""
    if f"{key}_s_extrapolated" in row:
        return row[f"{key}_s_extrapolated"], "~"
    return None, ""


def _line(row: dict) -> str:
    ref, ref_mark = _pick(row, "reference")
    gal, gal_mark = _pick(row, "galois")
    m4ri, _ = _pick(row, "m4ri")
    cbd = row["cbdnet_s"]

    def fmt(value, mark, scale, width, digits):
        return f"{'-':>{width}}" if value is None else f"{mark}{value * scale:.{digits}f}".rjust(width)

    def ratio(a, b, mark, width):
        if a is None or b is None:
            return f"{'-':>{width}}"
        return f"{mark}{a / b:.{0 if a / b >= 10 else 2}f}x".rjust(width)

    return (f"{row['density']:>5} {row['n']:>5} {row['rank']:>5} {fmt(ref, ref_mark, 1, 12, 3)} "
            f"{fmt(gal, gal_mark, 1, 11, 3)} {fmt(m4ri, '', 1e3, 9, 2)} {cbd * 1e3:>10.2f} "
            f"{row['cbdnet_factor_s'] * 1e3:>10.2f} {ratio(ref, gal, ref_mark or gal_mark, 10)} "
            f"{ratio(ref, m4ri, ref_mark, 9)} {ratio(ref, cbd, ref_mark, 11)} {ratio(m4ri, cbd, '', 11)}")


if __name__ == "__main__":
    raise SystemExit(main())
