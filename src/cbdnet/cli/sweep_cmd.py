"""``cbdnet sweep SPEC -o DIR``: the spec's points on Dask workers, then DIR/results.csv|json and DIR/pareto.png."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import CBDError
from ..sweep import load_spec, plot_pareto, run_sweep
from ..sweep.engine import PLOT

__all__ = ["cmd_sweep"]


def _check_output(path: str) -> None:
    """DIR may exist as a folder (resume); a file or a symlink there is refused, nothing is written."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise CBDError(f"cannot use output folder {path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(mode):
        raise CBDError(f"output folder {path} is a symbolic link; give a real folder")
    if not stat.S_ISDIR(mode):
        raise CBDError(f"output {path} exists and is not a folder")


def cmd_sweep(args) -> int:
    if args.workers is not None and args.workers < 1:
        raise CBDError("--workers must be at least 1")
    if args.workers is not None and args.cluster:
        raise CBDError("--workers sizes the local cluster; with --cluster the scheduler's workers run the points")
    _check_output(args.output)
    spec = load_spec(args.spec)  # every problem of the spec before the output folder is touched
    rows = run_sweep(spec, args.output, cluster=args.cluster, workers=args.workers, progress=not args.quiet,
                     force=args.force, extra_outputs=(PLOT,))
    metric = args.metric or ("miou" if any("miou" in r for r in rows) else "top1")
    png = plot_pareto(rows, Path(args.output) / PLOT, metric=metric,
                      title=f"{spec.arch}: {metric} vs whole-file size")
    failed = [r for r in rows if r["status"] == "failed"]
    if not args.quiet:
        print(f"{len(rows) - len(failed)} of {len(rows)} points done, {len(failed)} failed: "
              f"{Path(args.output) / 'results.csv'}, {png}")
    for row in failed[:10]:
        print(f"cbdnet: point #{row['index']} ({row['series']}) failed: {row['error']}")
    return 1 if failed else 0
