"""Run a spec's points as Dask tasks, resumably: one result file per point, the tables regenerated from them.

Output folder::

    DIR/points/<key>.json   one per point (and one for the FP32 evaluation), written atomically when it ends
    DIR/files/<key>.cbd     the compressed model of each point (written by the worker that ran it)
    DIR/results.json|csv    regenerated from the point files after each point, rows in spec order
    DIR/results.md          the same as a markdown table (FP32 first, points by series and size)
    DIR/spec.toml           a copy of the last run's spec
    DIR/pareto.png          the plot (written by the CLI, :func:`cbdnet.sweep.plot_pareto`)

Every file is written under the output policy (:func:`publish`: staged, renamed, never through a symbolic
link, never over a folder, device or FIFO or an input, staged files removed on SIGTERM/SIGINT/SIGHUP; a staged
file a killed run left is removed by the next run). DIR is the sweep's own state: a rerun resumes it without
``--force``; ``--force`` only lets a sweep write into an existing non-empty folder that holds no sweep
(:func:`prepare_output`). It never recomputes finished points.

A rerun skips the points whose key file holds a result, retries failed ones, and computes a point again only
when its key changes (config, weights, data or cbdnet version). Killing a sweep loses the points in flight only.
Workers are a ``distributed.LocalCluster`` of processes on this machine by default, or an existing scheduler's
(``cluster="tcp://HOST:PORT"``), which must see the spec's inputs and DIR at the same absolute paths: each
worker checks that before any point is submitted.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import logging
import os
import re
import stat
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .._version import __version__
from ..fileio import OutputSet, file_kind
from .point import run_fp32, run_point
from .spec import POINT_KEYS, Spec, SweepError, content_digests, expand_points, fp32_key, point_key, series_label

__all__ = ["run_sweep", "markdown_table", "check_worker_paths", "prepare_output", "publish",
           "sweep_inputs"]

RESULT_FIRST = ("file_bits_per_weight", "file_bytes", "bits_per_weight", "weights", "top1", "top5", "miou",
                "pixel_acc", "map50", "n", "fp32_top1", "fp32_top5", "fp32_miou", "fp32_map50", "seconds",
                "compress_seconds")
_TAIL = ("status", "error", "cbdnet_version", "key")


# ---------------------------------------------------------------- worker side


def _one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _json_default(obj: Any) -> Any:
    for attr in ("item", "tolist"):  # numpy scalars and arrays, torch tensors
        if hasattr(obj, attr):
            return getattr(obj, attr)()
    raise TypeError(f"a point returned a {type(obj).__name__}, which is not JSON")


def execute(function: Callable[[dict], dict], task: dict) -> dict:
    """Runs on a worker and never raises: a failing point is a result with a one-line ``error``."""
    start = time.perf_counter()
    try:
        result = function(task)
        result = json.loads(json.dumps(result, default=_json_default))  # fail here, not on the client
    except Exception as exc:  # noqa: BLE001 - the point fails, the sweep goes on
        return {"error": _one_line(exc), "traceback": traceback.format_exc(limit=20),
                "seconds": round(time.perf_counter() - start, 3)}
    result.setdefault("seconds", round(time.perf_counter() - start, 3))
    return result


def check_worker_paths(paths: list[str], files_dir: str, version: str) -> list[str]:
    """Runs on each worker: the problems that would fail every point there (unreadable inputs, an output folder
    it cannot write, another cbdnet version)."""
    problems = [f"cannot read {p}" for p in paths if not os.access(p, os.R_OK)]
    try:
        fd, probe = tempfile.mkstemp(dir=files_dir, prefix=".probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        problems.append(f"cannot write to {files_dir} ({exc.strerror or exc})")
    if version != __version__:
        problems.append(f"runs cbdnet {__version__}, not {version}")
    return problems


# ---------------------------------------------------------------- output folder


# The files a sweep owns in DIR (besides points/<key>.json and files/<key>.cbd); the CLI adds PLOT.
RESULTS = ("results.json", "results.csv", "results.md")
SPEC_COPY = "spec.toml"
PLOT = "pareto.png"
_STALE = re.compile(r"\.[0-9a-f]{64}\.(json|cbd)\.[a-z0-9_]{8}\.tmp|\.(results\.(json|csv|md)|spec\.toml|pareto\.png)"
                    r"\.[a-z0-9_]{8}\.tmp")


def publish(files: dict[Path, str | bytes], inputs: Iterable[str | Path] = ()) -> None:
    """Write ``files`` under the output policy (:class:`cbdnet.fileio.OutputSet` with ``force``: the sweep's
    own state is regenerated): staged beside their targets and renamed together; a symbolic link, directory,
    device or FIFO in the way, or one of the sweep's inputs, is refused and left as it is; SIGTERM/SIGINT
    remove the staged files."""
    with OutputSet(inputs=inputs, force=True) as out:
        for path, data in files.items():
            out.write(out.add(path, what=f"sweep output {path.name}"),
                      data.encode("utf-8") if isinstance(data, str) else data)
        out.commit()


def _is_sweep_folder(out: Path) -> bool:
    return os.path.isdir(out / "points") and not os.path.islink(out / "points")


def prepare_output(out: Path, inputs: list, *, force: bool = False, extra: tuple[str, ...] = ()) -> None:
    """Check and create the output folder before any work.

    DIR is the sweep's own state: a new or empty folder, or one holding a sweep (a ``points/`` folder), is
    used without ``force`` (a rerun resumes it and regenerates its results). An existing folder that is not
    empty and holds no sweep is refused unless ``force``; with ``force`` the sweep writes its files into it,
    replacing regular files of its names. Never (``force`` or not): DIR, ``points/`` or ``files/`` a symbolic
    link or no folder; one of the sweep's files (``RESULTS``, ``spec.toml``, ``extra``) a symbolic link,
    directory, device or FIFO, or an input."""
    for path in inputs:
        if os.path.realpath(path) == os.path.realpath(out):
            raise SweepError(f"output folder {out} is the input {path}; give another folder")
    for folder in (out, out / "points", out / "files"):
        if os.path.islink(folder):
            raise SweepError(f"output folder {folder} is a symbolic link; give a real folder")
        if os.path.lexists(folder) and not os.path.isdir(folder):
            raise SweepError(f"output {folder} exists and is not a folder")
    if not force and out.is_dir() and any(out.iterdir()) and not _is_sweep_folder(out):
        raise SweepError(f"output folder {out} is not empty and holds no sweep (no points/ folder); give a new "
                         "folder, or pass --force to write the sweep's files into it")
    try:
        (out / "points").mkdir(parents=True, exist_ok=True)
        (out / "files").mkdir(exist_ok=True)
    except OSError as exc:
        raise SweepError(f"cannot create output folder {out}: {exc.strerror or exc}") from None
    check = OutputSet(inputs=inputs, force=True)  # the checks of add(), nothing written
    for name in (*RESULTS, SPEC_COPY, *extra):
        check.add(out / name, what=f"sweep output {name}")


def _remove_stale_temps(out: Path) -> None:
    """Staged files a killed sweep (or worker) left behind; only the sweep's own temp names, under the lock."""
    for folder in (out, out / "points", out / "files"):
        with contextlib.suppress(OSError):
            for entry in os.scandir(folder):
                if _STALE.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        os.unlink(entry.path)


def _read_record(path: Path, key: str) -> dict | None:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None  # absent or unreadable: compute it (again)
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("result"), dict):
        return None
    return record


def _rows(points: list[dict], keys: list[str], records: dict[str, dict], fp32: dict | None) -> list[dict]:
    base = {f"fp32_{k}": v for k, v in (fp32 or {}).items() if k in ("top1", "top5", "miou", "map50")}
    rows = []
    for index, (point, key) in enumerate(zip(points, keys, strict=True)):
        record = records.get(key)
        row: dict[str, Any] = {"index": index, "series": series_label(point), **point}
        if record is None:
            row["status"] = "pending"
        else:
            result = {k: v for k, v in record["result"].items() if k != "traceback"}
            row.update({k: v for k, v in result.items() if k not in row})
            row.update(base)
            row["status"] = "failed" if result.get("error") else "done"
        row.setdefault("error", None)
        row["cbdnet_version"] = __version__
        row["key"] = key
        rows.append(row)
    return rows


def _columns(rows: list[dict]) -> list[str]:
    head = ["index", "series", *POINT_KEYS, *RESULT_FIRST]
    present = {k for row in rows for k in row}
    rest = sorted(present - set(head) - set(_TAIL))
    return [c for c in head + rest + list(_TAIL) if c in present]


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return " ".join(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def _write_results(out: Path, rows: list[dict], inputs: list) -> None:
    columns = _columns(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in columns])
    metric = "miou" if any("miou" in r for r in rows) else "top1"
    publish({out / "results.json": json.dumps(rows, indent=1) + "\n", out / "results.csv": buffer.getvalue(),
             out / "results.md": markdown_table(rows, metric)}, inputs)


def _setting(row: dict) -> str:
    """A point's options in one short string, e.g. "bits=4 granularity=channel calib"."""
    parts = []
    for key in POINT_KEYS:
        value = row.get(key)
        if key in ("method", "label") or value is None or value is False:
            continue
        parts.append(key if value is True else f"{key}={' '.join(value) if isinstance(value, list) else value}")
    return " ".join(parts)


def markdown_table(rows: list[dict], metric: str = "top1") -> str:
    """The rows as a markdown table: series, setting, the whole file's bits per weight (first), the paper's
    fixed-length count (labelled so), file bytes, the metric; FP32 first, the points sorted by series then size.
    Failed and pending points are listed as such."""
    fp32 = next((r[f"fp32_{metric}"] for r in rows if f"fp32_{metric}" in r), None)
    lines = [f"| series | setting | whole-file bits/weight | paper's code count (bits/weight) | file bytes "
             f"| {metric} |",
             "| --- | --- | --- | --- | --- | --- |"]
    if fp32 is not None:
        lines.append(f"| FP32 | - | 32 | 32 | - | {fp32:.4f} |")
    order = list(dict.fromkeys(r["series"] for r in rows))
    def place(row: dict) -> tuple:
        size = row.get("file_bits_per_weight")
        return order.index(row["series"]), size if isinstance(size, float) else float("inf"), row["index"]

    for row in sorted(rows, key=place):
        if row["status"] != "done":
            status = f"{row['status']}: {row['error']}" if row.get("error") else row["status"]
            lines.append(f"| {row['series']} | {_setting(row)} | {status} | | | |")
            continue
        value = row.get(metric)
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {row['series']} | {_setting(row)} | {row['file_bits_per_weight']:.3f} | "
                     f"{row['bits_per_weight']:.3f} | {row['file_bytes']:,} | {shown} |")
    return "\n".join(lines) + "\n"


_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
    | getattr(os, "O_CLOEXEC", 0)


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    try:  # no link followed, no FIFO blocking the open: a regular file or a one-line refusal
        fd = os.open(out / ".lock", _LOCK_FLAGS, 0o666)
    except OSError as exc:
        raise SweepError(f"cannot use {out / '.lock'}: {exc.strerror or exc} (a symbolic link or a folder?)") \
            from None
    try:  # closing releases the lock, and so does the process's death
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SweepError(f"{out / '.lock'} is {file_kind(mode)}, not a regular file; remove it")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SweepError(f"another sweep is writing to {out}") from None
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------- cluster


def _quiet_dask() -> None:
    import dask

    dask.config.set({"distributed.admin.tick.limit": "60s"})  # no "event loop blocked" noise under load
    for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker",
                 "distributed.core", "distributed.comm", "distributed.batched", "tornado"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# The scheduler's small HTTP server (health, metrics) on a free loopback port instead of the dashboard's 8787.
NO_DASHBOARD = {"dashboard": False, "dashboard_address": "127.0.0.1:0"}


@contextlib.contextmanager
def _local_client(workers: int) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, silence_logs=logging.ERROR, scheduler_kwargs=NO_DASHBOARD) as lc, \
            Client(lc, set_as_default=False) as client:
        yield client


@contextlib.contextmanager
def _remote_client(address: str, timeout: float) -> Iterator[Any]:
    from distributed import Client

    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise SweepError(f"cannot reach the Dask scheduler at {address}: {_one_line(exc)}") from None
    try:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except (TimeoutError, OSError):
            raise SweepError(f"the Dask scheduler at {address} has no workers") from None
        yield client
    finally:
        client.close()


@contextlib.contextmanager
def _client(cluster: str | None, workers: int | None, n_tasks: int, timeout: float) -> Iterator[Any]:
    _quiet_dask()
    if cluster is None:
        with _local_client(max(1, min(n_tasks, workers or _cpu_count()))) as client:
            yield client
    elif workers is not None:
        raise SweepError("--workers sizes the local cluster; with --cluster the scheduler's workers run the points")
    else:
        with _remote_client(cluster, timeout) as client:
            yield client


def _check_workers(client: Any, spec: Spec, files_dir: Path) -> None:
    paths = [str(p) for p in spec.input_paths()]
    answers = client.run(check_worker_paths, paths, str(files_dir), __version__)
    for worker, problems in sorted(answers.items()):
        if problems:
            raise SweepError(f"worker {worker}: {problems[0]} (workers must see the spec's files and the output "
                             f"folder at the same absolute paths, and run the same cbdnet)")


# ---------------------------------------------------------------- the sweep


def _task(spec: Spec, point: dict, key: str, files_dir: Path) -> dict:
    calib = spec.calib.resolved() if point.get("calib") and spec.calib is not None else None
    return {**point, "series": series_label(point), "key": key, "arch": spec.arch,
            "weights": str(spec.weights_path) if spec.weights_path else spec.weights, "seed": spec.seed,
            "eval_data": spec.eval.resolved(), "calib_data": calib, "files_dir": str(files_dir)}


def sweep_inputs(spec: Spec, out: Path) -> list[Path]:
    """What the sweep reads (weights, data, the spec file unless it is DIR's own spec.toml): never an output."""
    own = os.path.realpath(out / SPEC_COPY) == os.path.realpath(spec.path)
    return [*spec.input_paths(), *([] if own else [spec.path])]


class _Progress:
    """One tqdm bar for the sweep: the spec's points done and failed (the FP32 evaluation is not a point), with
    an ETA; drawn only on a terminal (a redirected stderr gets no bar)."""

    def __init__(self, total: int, skipped: int, enabled: bool, stream: Any = None) -> None:
        from tqdm import tqdm

        stream = sys.stderr if stream is None else stream
        enabled = enabled and bool(getattr(stream, "isatty", lambda: False)())
        self.done, self.failed = skipped, 0
        self.bar = tqdm(total=total, initial=skipped, desc="sweep", unit="pt", disable=not enabled,
                        file=stream, dynamic_ncols=True)
        self.bar.set_postfix(done=self.done, failed=0, refresh=False)

    def step(self, failed: bool) -> None:
        self.failed += failed
        self.done += not failed
        self.bar.set_postfix(done=self.done, failed=self.failed, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def run_sweep(spec: Spec, out_dir: str | os.PathLike, *, cluster: str | None = None, workers: int | None = None,
              progress: bool = True, connect_timeout: float = 10.0,
              point_function: Callable[[dict], dict] = run_point, force: bool = False,
              extra_outputs: tuple[str, ...] = ()) -> list[dict]:
    """Run every point of ``spec`` not already done in ``out_dir`` (and the FP32 evaluation, once); returns
    the rows in spec order. ``point_function`` (default :func:`run_point`) must be importable on the workers.
    The folder is checked first (:func:`prepare_output`: ``force`` and ``extra_outputs``, e.g. the plot's
    name); every file is written under the output policy (:func:`publish`)."""
    if os.fspath(out_dir).strip() == "":  # Path("") is the current folder: never a sweep's output by accident
        raise SweepError("output folder: empty path; give a folder with -o")
    out = Path(out_dir).absolute()
    points = expand_points(spec)
    digests = content_digests(spec)
    keys = [point_key(p, digests, __version__) for p in points]
    fp32 = fp32_key(digests, __version__)
    inputs = sweep_inputs(spec, out)
    prepare_output(out, inputs, force=force, extra=extra_outputs)
    with _lock(out):
        _remove_stale_temps(out)
        if spec.text and os.path.realpath(out / SPEC_COPY) != os.path.realpath(spec.path):
            publish({out / SPEC_COPY: spec.text}, inputs)
        wanted = list(dict.fromkeys([fp32, *keys]))
        records = {k: r for k in wanted if (r := _read_record(out / "points" / f"{k}.json", k)) is not None}
        todo = [k for k in wanted if k not in records or records[k]["result"].get("error")]
        first = {k: p for p, k in reversed(list(zip(points, keys, strict=True)))}

        def rows() -> list[dict]:
            return _rows(points, keys, records, (records.get(fp32) or {}).get("result"))

        _write_results(out, rows(), inputs)
        if not todo:
            return rows()
        points_todo = sum(k != fp32 for k in todo)
        bar = _Progress(len(wanted) - 1, len(wanted) - 1 - points_todo, progress)
        try:
            with _client(cluster, workers, len(todo), connect_timeout) as client:
                _check_workers(client, spec, out / "files")
                _submit_and_collect(client, todo, fp32, first, spec, out, records, rows, bar, point_function,
                                    inputs)
        finally:
            bar.close()
        return rows()


def _submit_and_collect(client: Any, todo: list[str], fp32: str, first: dict, spec: Spec, out: Path,
                        records: dict, rows: Callable[[], list[dict]], bar: _Progress,
                        point_function: Callable[[dict], dict], inputs: list) -> None:
    from distributed import as_completed

    files = out / "files"
    futures = {}
    for key in todo:  # the FP32 evaluation first: every row shows it
        function, point = (run_fp32, {"fp32": True}) if key == fp32 else (point_function, first[key])
        task = _task(spec, {} if key == fp32 else point, key, files)
        futures[client.submit(execute, function, task, key=f"cbdnet-point-{key}", pure=False, retries=0)] = \
            (key, point)
    for future in as_completed(futures, loop=client.loop):
        key, point = futures[future]
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 - a worker died (KilledWorker) or the like
            result = {"error": f"worker failure: {_one_line(exc)}"}
        record = {"key": key, "point": point, "cbdnet_version": __version__,
                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "result": result}
        publish({out / "points" / f"{key}.json": json.dumps(record, indent=1) + "\n"}, inputs)
        records[key] = record
        _write_results(out, rows(), inputs)
        if key != fp32:
            bar.step(bool(result.get("error")))
        future.release()
