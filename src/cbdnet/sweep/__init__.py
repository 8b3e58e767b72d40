"""Floor 6 of cbdnet, below the CLI: rate/accuracy sweeps (``cbdnet sweep SPEC -o DIR``) run as Dask tasks.

:mod:`.spec` reads and checks a TOML spec and keys its points, :mod:`.point` is the work of one point on a
worker (compress, save, reload, evaluate), :mod:`.engine` runs the points on a local or existing Dask cluster
and keeps the results in DIR, :mod:`.plot` draws the Pareto plot.
"""

from .engine import run_sweep
from .plot import noise_sigma, pareto_front, plot_pareto
from .point import run_fp32, run_point
from .spec import Spec, SpecError, SweepError, content_digests, expand_points, load_spec, point_key, series_label

__all__ = ["Spec", "SpecError", "SweepError", "load_spec", "expand_points", "content_digests", "point_key",
           "series_label", "run_sweep", "run_point", "run_fp32", "plot_pareto", "pareto_front",
           "noise_sigma"]
