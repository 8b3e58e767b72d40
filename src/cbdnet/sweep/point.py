"""The work of one sweep point, run on a Dask worker: build the model, compress it as ``cbdnet compress`` would,
save the ``.cbd`` file, load it back from disk and evaluate what was loaded.

:func:`run_point` and :func:`run_fp32` are module-level so that worker processes import them by name. A task is
a plain dict: the point's options (spec key names) plus ``arch``, ``weights`` (an absolute path or
``"random"``), ``seed``, ``eval_data``, ``calib_data`` (absolute data specs; ``calib_data`` is None unless the
point calibrates), ``files_dir`` (where the ``.cbd`` goes) and ``key``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..calib.configs import config_from_options
from ..format import atomic_write, compress_encoded
from ..zoo import load
from ..zoo.data import calibration_data, load_spec
from ..zoo.metrics import evaluate
from ..zoo.models import build, load_weights
from .spec import POINT_KEYS, point_options

__all__ = ["run_point", "run_fp32", "build_model", "metrics_of"]

_METRICS = ("top1", "top5", "miou", "pixel_acc", "map50", "n")


def build_model(task: dict) -> torch.nn.Module:
    """The float model of a task: ``arch`` with its checkpoint, or seeded random weights (as the CLI's
    ``--weights random --seed N``: the seed is set right before the one build)."""
    if task["weights"] == "random":
        torch.manual_seed(task.get("seed", 0))
        return build(task["arch"], allow_import=True).eval()
    return load_weights(build(task["arch"], allow_import=True), task["weights"]).eval()


def metrics_of(result: dict) -> dict:
    """The scalar metrics of an evaluation result (per-class IoU and the like left out)."""
    return {k: result[k] for k in _METRICS if k in result}


def run_fp32(task: dict) -> dict:
    """The uncompressed model's metrics on the eval data, keyed once per sweep."""
    start = time.perf_counter()
    with torch.no_grad():
        result = evaluate(build_model(task), load_spec(task["eval_data"]), progress=False)
    return {**metrics_of(result), "seconds": round(time.perf_counter() - start, 3)}


def run_point(task: dict) -> dict:
    """Compress, save, reload, evaluate one point; returns its sizes and metrics.

    ``file_bits_per_weight`` is the whole file (header, codes and float tensors) in bits over the compressed
    layers' weights; ``bits_per_weight`` counts the codes only, as the paper counts them (fixed-length planes),
    and ``coded_bits_per_weight`` as the file stores them (entropy-coded levels)."""
    start = time.perf_counter()
    options = point_options(task_options(task))
    config, settings = config_from_options(options)
    calib = calibration_data(task["calib_data"]) if options.get("calib") else None
    with torch.no_grad():
        model, report, encoded = compress_encoded(build_model(task), config, calibration=calib,
                                                  calibration_config=settings, skip=task.get("skip") or (),
                                                  progress=False)
        compress_seconds = time.perf_counter() - start
        path = Path(task["files_dir"]) / f"{task['key']}.cbd"
        atomic_write(path, encoded)  # what save(model, path) would write, without encoding the model again
        file_bytes = len(encoded)
        del model, encoded
        result = evaluate(load(path), load_spec(task["eval_data"]), progress=False)
    return {"file_bits_per_weight": file_bytes * 8 / report.params, "file_bytes": file_bytes,
            "bits_per_weight": report.bits_per_weight, "coded_bits_per_weight": report.coded_bits_per_weight,
            "weights": report.params, **metrics_of(result),
            "compress_seconds": round(compress_seconds, 3), "seconds": round(time.perf_counter() - start, 3),
            "file": str(path)}


def task_options(task: dict) -> dict:
    """The point part of a task: its spec keys."""
    return {k: task[k] for k in POINT_KEYS if k in task}
