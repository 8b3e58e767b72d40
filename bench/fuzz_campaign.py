"""A longer fuzz campaign against the ``.cbd`` reader: ``cbdnet.format.parse`` / ``cbdnet.load`` / ``cbdnet.verify``.

Hypothesis generates the cases (generation phase only: a crash is recorded, not shrunk, and the campaign goes
on). Targets, each run in rounds of ``--examples`` cases with a fresh seed until ``--minutes`` are spent:

- ``flip``        1-8 random byte flips in a valid file (the SHA-256 trailer must catch them)
- ``truncate``    truncation at a random offset or next to a region boundary
- ``garbage``     random bytes, and random bytes as the payload of a correctly signed container
- ``resigned``    byte flips, truncations and splices inside the payload with the trailer recomputed
- ``metadata``    random JSON put anywhere into the cbdnet metadata, re-signed
- ``header``      random dtype/shape/offsets/entries in the safetensors header, re-signed
- ``pickle``      pickles (protocols 0-5) whose unpickling would create a marker file, raw, renamed, embedded
- ``torch-save``  ``torch.save`` files (state dicts, tensors, whole modules) renamed ``.cbd``
- ``outputs``     the output policy (issue 13): ``compress``/``eval``/``info``/``demo`` runs whose ``-o``,
                  ``--json`` and ``--out-dir`` are drawn from a sandbox of awkward targets (the run's own
                  inputs, hard links and symlinks to them, existing files, a FIFO, a directory, /dev/null, ``-``,
                  an empty name, a missing folder, the same path twice), with and without ``--force``
- ``v2-flip``, ``v2-resigned``, ``v2-header``: the same against format-2 files (entropy-coded layers, zlib JSON
  header; one file with kernel-context `ans-kernel` layers): byte flips, re-signed payload flips/cuts/splices,
  random JSON put anywhere into the header
- ``sweep``       ``cbdnet sweep`` resuming a finished sweep folder in which one of its own names (results,
                  spec copy, plot, lock, points/, files/) is replaced by an awkward target (a link to a user
                  file or an input, a dangling link, a FIFO, a folder, a hard link to an input), or whose
                  ``-o`` is itself awkward, with and without ``--force``: exit 0 or 2, no user file, link or
                  input changed, no temporary file left, and (exit 0) strict JSON results

- ``size-bomb``, ``nonfinite``, ``invariant``, ``many-layers`` (issue 26) against format-2 files that stay valid
  containers (every checksum right, ``tests/cbd_bombs.py``): level streams and constant tensors declaring up to
  10^10 values, stream sizes beyond any writer's, NaN/Inf in stored floats and scales, scales/flags/versions/rank
  fields no writer stores, headers of 1,000-40,000 layers. Each file goes through what ``info`` reads
  (``read(decode=False)``), ``info --verify`` and ``load``, and each call is held to the limits as properties:
  at most ``LIMIT_SECONDS`` of CPU and a peak RSS rise (VmHWM, reset per call) of at most twice the decoded
  model's bytes + 200 MB; a call over either is a ``limit`` case. A ``nonfinite`` file that ``load`` accepts is
  a crash.

Every case must end as ``refused`` (a CBDError) or ``accepted`` (a well-formed file that loads and verifies);
anything else is a ``crash``. The marker file must never exist. An ``outputs`` case is a crash unless it exits
0 or 2, leaves every input, link, device and (without ``--force``) existing file byte for byte as it was, leaves
no temporary file, and (exit 0) wrote a verifying ``.cbd`` and strict JSON. Usage::

    PYTHONPATH=src python bench/fuzz_campaign.py --minutes 5
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import io
import json
import math
import os
import pickle
import platform
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

import torch
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

_TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path[:0] = [str(_TESTS), str(_TESTS / "sweep")]  # the shared helpers, and test_sweep_outputs

from cbd_bombs import (  # noqa: E402
    constant_bomb,
    level_bomb,
    many_layers,
    padded,
    with_float_value,
    with_header_edit,
    with_layer_edit,
)
from cbd_mutations import (  # noqa: E402
    Marker,
    header_of,
    json_paths,
    kernel_file,
    meta_of,
    outcome,
    payload_of,
    rebuild,
    region_boundaries,
    replace_at,
    sign,
    tensors_of,
    tiny_file,
    tiny_model,
    v2_header_of,
    v2_with_header,
    with_header,
)

import cbdnet  # noqa: E402
from cbdnet.cli import commands as cli  # noqa: E402
from cbdnet.cli import demo  # noqa: E402
from cbdnet.errors import CBDError  # noqa: E402
from cbdnet.format import read as read_cbd  # noqa: E402
from cbdnet.zoo import build as build_arch  # noqa: E402

JSON_SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                        st.text(max_size=16), st.sampled_from(["cbd", "uniform", "zero", "packed", "factored",
                                                               "float32", "bfloat16", "digits-cnn"]))
JSON_VALUE = st.recursive(JSON_SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                               st.dictionaries(st.text(max_size=8), inner,
                                                                               max_size=5)), max_leaves=16)




def flipped(draw_data, pool) -> bytes:
    """A file from ``pool`` with 1..8 bytes XOR-ed anywhere (the checksum must refuse it)."""
    good = draw_data.draw(pool)
    corrupt = bytearray(good)
    for _ in range(draw_data.draw(st.integers(1, 8))):
        corrupt[draw_data.draw(st.integers(0, len(good) - 1))] ^= draw_data.draw(st.integers(1, 255))
    return bytes(corrupt)


def resigned_mutation(draw_data, pool, version: int) -> bytes:
    """A file from ``pool`` whose payload had bytes flipped, was cut or had bytes spliced in, re-signed as a
    format-``version`` file (so only the reader's own checks stand between it and a model)."""
    payload = bytearray(payload_of(draw_data.draw(pool)))
    kind = draw_data.draw(st.sampled_from(["flip", "cut", "splice"]))
    if kind == "flip":
        for _ in range(draw_data.draw(st.integers(1, 8))):
            payload[draw_data.draw(st.integers(0, len(payload) - 1))] ^= draw_data.draw(st.integers(1, 255))
    elif kind == "cut":
        payload = payload[: draw_data.draw(st.integers(0, len(payload)))]
    else:
        at = draw_data.draw(st.integers(0, len(payload)))
        payload[at:at] = draw_data.draw(st.binary(min_size=1, max_size=64))
    return sign(bytes(payload), version=version)

class Campaign:
    def __init__(self, files: list[bytes], folder: Path, v2_files: list[bytes] = ()) -> None:
        self.files, self.folder, self.v2_files = files + list(v2_files), folder, list(v2_files)
        self.marker = folder / "UNPICKLED"
        self.counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.crashes: list[str] = []
        self.worst: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])  # CPU s, peak RSS rise
        buffer = io.BytesIO()
        torch.save(tiny_model().state_dict(), buffer)
        self.weights = buffer.getvalue()

    def record_outputs(self, draw_data, name: str = "outputs") -> None:
        try:
            draw = _draw_sweep_case if name == "sweep" else _draw_outputs_case
            result, problems = draw(self, draw_data)
        except Exception as exc:  # an exception escaping cli.main is a crash of the CLI
            result, problems = "crash", [f"{type(exc).__name__}: {str(exc)[:200]}"]
        if problems:
            result = "crash"
            self.crashes.extend(f"{name}: {p}" for p in problems[: max(0, 20 - len(self.crashes))])
        self.counts[name][result] += 1

    def record_bounded(self, target: str, draw_data) -> None:
        """A hostile format-2 file (issue 26) through info, info --verify and load, each within the limits."""
        good = draw_data.draw(st.sampled_from(self.v2_files[:3]))
        data, must_refuse = BOUNDED_TARGETS[target](draw_data, good)
        result, problems, worst = bounded_outcome(data, self.folder, must_refuse)
        self.worst[target] = [max(a, b) for a, b in zip(self.worst[target], worst, strict=True)]
        if problems:
            result = "limit" if all(p.startswith("limit") for p in problems) else "crash"
            self.crashes.extend(f"{target}: {p}" for p in problems[: max(0, 20 - len(self.crashes))])
        self.counts[target][result] += 1

    def record(self, target: str, make_case) -> None:
        data = make_case()  # a failure here is a bug of the campaign itself: let it raise
        if data in self.files:  # e.g. two flips of the same byte that cancel out: not a test of the reader
            self.counts[target]["unchanged"] += 1
            return
        try:
            result = outcome(data, self.folder)
        except Exception as exc:  # a crash: anything but a CBDError escaping the reader
            result = "crash"
            if len(self.crashes) < 20:
                self.crashes.append(f"{target}: {type(exc).__name__}: {str(exc)[:200]}")
        if self.marker.exists():
            self.counts[target]["EXECUTED"] += 1
            self.marker.unlink()
        self.counts[target][result] += 1

    def targets(self):
        files = st.sampled_from([f for f in self.files if f not in self.v2_files])
        v2_files = st.sampled_from(self.v2_files or self.files)

        def flip(draw_data):
            return flipped(draw_data, files)

        def truncate(draw_data):
            good = draw_data.draw(files)
            cut = draw_data.draw(st.one_of(st.integers(0, len(good) - 1),
                                           st.sampled_from(region_boundaries(good)[:-1])))
            return good[: max(0, cut + draw_data.draw(st.integers(-2, 2)))][: len(good) - 1]

        def garbage(draw_data):
            blob = draw_data.draw(st.binary(max_size=8192))
            return sign(blob) if draw_data.draw(st.booleans()) else blob

        def resigned(draw_data):
            return resigned_mutation(draw_data, files, version=1)

        def metadata(draw_data):
            good = draw_data.draw(files)
            meta = meta_of(good)
            for _ in range(draw_data.draw(st.integers(1, 4))):
                path = draw_data.draw(st.sampled_from(list(json_paths(meta))))
                meta = replace_at(copy.deepcopy(meta), path, draw_data.draw(JSON_VALUE))
            return rebuild(tensors_of(good), meta)

        def header(draw_data):
            good = draw_data.draw(files)
            entries = header_of(good)
            for _ in range(draw_data.draw(st.integers(1, 3))):
                name = draw_data.draw(st.sampled_from(sorted(entries)))
                field = draw_data.draw(st.sampled_from(["dtype", "shape", "data_offsets", None, "rename"]))
                if field is None:
                    entries.pop(name)
                elif field == "rename":
                    entries[draw_data.draw(st.text(max_size=20))] = entries.pop(name)
                elif isinstance(entries[name], dict):
                    entries[name] = dict(entries[name])
                    entries[name][field] = draw_data.draw(st.one_of(
                        JSON_VALUE, st.sampled_from(["F32", "U8", "I64", "BF16", "F64", "F8_E4M3"]),
                        st.lists(st.integers(-5, 2**64), max_size=4)))
                if not entries:
                    entries = {"__metadata__": {}}
            return with_header(good, entries)

        def pickled(draw_data):
            obj = draw_data.draw(st.one_of(
                st.just({"state_dict": Marker(str(self.marker))}),
                st.builds(lambda x: [x, Marker(str(self.marker))], JSON_VALUE),
                st.builds(lambda x: {"meta": x, "w": Marker(str(self.marker))}, JSON_VALUE)))
            blob = pickle.dumps(obj, protocol=draw_data.draw(st.integers(0, 5)))
            how = draw_data.draw(st.sampled_from(["raw", "signed", "as-payload", "as-metadata"]))
            if how == "raw":
                return blob
            if how == "signed":
                return sign(blob)
            if how == "as-payload":
                return sign(len(blob).to_bytes(8, "little") + blob)
            good = draw_data.draw(files)
            return rebuild(tensors_of(good), blob.decode("latin-1"))

        def torch_saved(draw_data):
            kind = draw_data.draw(st.sampled_from(["state", "tensor", "module", "evil"]))
            shape = draw_data.draw(st.lists(st.integers(0, 6), max_size=3))
            makers = {"state": lambda: tiny_model().state_dict(), "tensor": lambda: torch.randn(shape),
                      "module": tiny_model, "evil": lambda: {"x": torch.ones(shape), "y": Marker(str(self.marker))}}
            obj = makers[kind]()
            buffer = io.BytesIO()
            torch.save(obj, buffer, _use_new_zipfile_serialization=draw_data.draw(st.booleans()),
                       pickle_protocol=draw_data.draw(st.integers(2, 5)))
            return buffer.getvalue()

        def v2_flip(draw_data):
            return flipped(draw_data, v2_files)

        def v2_resigned(draw_data):
            return resigned_mutation(draw_data, v2_files, version=2)

        def v2_header(draw_data):
            good = draw_data.draw(v2_files)
            meta = v2_header_of(good)
            for _ in range(draw_data.draw(st.integers(1, 4))):
                path = draw_data.draw(st.sampled_from(list(json_paths(meta))))
                meta = replace_at(copy.deepcopy(meta), path, draw_data.draw(JSON_VALUE))
            return v2_with_header(good, meta)

        return {"flip": flip, "truncate": truncate, "garbage": garbage, "resigned": resigned,
                "metadata": metadata, "header": header, "pickle": pickled, "torch-save": torch_saved,
                "v2-flip": v2_flip, "v2-resigned": v2_resigned, "v2-header": v2_header, "outputs": None,
                "sweep": None, **{name: BOUNDED for name in BOUNDED_TARGETS}}

    def round(self, examples: int, round_seed: int, only: list[str] | None) -> None:
        config = settings(max_examples=examples, deadline=None, database=None, phases=[Phase.generate],
                          suppress_health_check=list(HealthCheck))
        for name, make in self.targets().items():
            if only and name not in only:
                continue

            self._run(config, round_seed, name, make)

    def _run(self, config, round_seed: int, name: str, make) -> None:
        @seed(round_seed)
        @config
        @given(st.data())
        def run(draw_data):
            if make is None:
                self.record_outputs(draw_data, name)
            elif make is BOUNDED:
                self.record_bounded(name, draw_data)
            else:
                self.record(name, lambda: make(draw_data))

        run()


# ---------------------------------------------------------------- hostile format-2 files (issue 26)

BOUNDED = object()  # marks the targets below in Campaign.targets()
LIMIT_SECONDS = 5.0  # CPU seconds per call (info, info --verify, load) on a file of at most 100 MB
LIMIT_SLACK = 200 << 20  # peak RSS rise per call: twice the decoded model's bytes plus this


def _peak_reset() -> int:
    """Reset this process's peak RSS (VmHWM; Linux >= 4.0) and return the RSS now, in bytes."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _model_bytes(data: bytes) -> int:
    """The decoded model's bytes as its architecture builds it (float32), 0 when it cannot be built."""
    try:
        meta = v2_header_of(data)
        model = build_arch(meta["arch"], **meta.get("arch_kwargs", {}))
        return sum(t.numel() * t.element_size() for t in model.state_dict().values())
    except Exception:  # a header the reader refuses anyway
        return 0


def bounded_outcome(data: bytes, folder: Path, must_refuse: bool) -> tuple[str, list[str], list[float]]:
    """``(refused|accepted, problems, [worst CPU s, worst peak rise in bytes])`` of ``data`` through what ``info``,
    ``info --verify`` and ``load`` call; a problem is a crash (an exception other than CBDError, or a file that
    had to be refused loading) or a ``limit`` exceeded."""
    path = folder / "bounded.cbd"
    path.write_bytes(data)
    limit = 2 * _model_bytes(data) + LIMIT_SLACK
    calls = {"info": lambda: cli._info_dict(str(path), read_cbd(path, decode=False)),
             "verify": lambda: cbdnet.verify(path), "load": lambda: cbdnet.load(path)}
    problems, results, worst = [], {}, [0.0, 0.0]
    for name, call in calls.items():
        base = _peak_reset()
        start = time.process_time()
        try:
            call()
            results[name] = "accepted"
        except CBDError:
            results[name] = "refused"
        except Exception as exc:
            results[name] = "crash"
            problems.append(f"{name}: {type(exc).__name__}: {str(exc)[:200]}")
        seconds, rise = time.process_time() - start, _status("VmHWM") - base
        worst = [max(worst[0], seconds), max(worst[1], rise)]
        if seconds > LIMIT_SECONDS or rise > limit:
            problems.append(f"limit: {name} took {seconds:.2f} s CPU, peak RSS +{rise / 2**20:.0f} MB "
                            f"(limits {LIMIT_SECONDS} s, {limit / 2**20:.0f} MB)")
    if must_refuse and results.get("load") == "accepted":
        problems.append("load accepted a file it must refuse")
    return ("refused" if "refused" in results.values() else "accepted"), problems, worst


def _size_bomb(draw_data, good: bytes) -> tuple[bytes, bool]:
    kind = draw_data.draw(st.sampled_from(["levels", "constant", "blob"]))
    if kind != "blob":
        good = padded(good, draw_data.draw(st.sampled_from([0, 100_000, 300_000, 1_000_000])))
    if kind == "levels":
        count = int(10 ** draw_data.draw(st.floats(6, 10)))
        return level_bomb(good, count, draw_data.draw(st.integers(1, 4))), True
    if kind == "constant":
        shape = draw_data.draw(st.lists(st.integers(1, 40_000), min_size=1, max_size=3))
        return constant_bomb(good, tuple(shape), draw_data.draw(st.sampled_from(["float64", "float32", "int64"]))), True
    size = draw_data.draw(st.integers(1 << 20, 1 << 40))
    return with_layer_edit(good, lambda layer: layer["stream"].update(blob_bytes=[size])), True


def _nonfinite(draw_data, good: bytes) -> tuple[bytes, bool]:
    value = draw_data.draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    if draw_data.draw(st.booleans()):
        key = draw_data.draw(st.sampled_from(["features.0.bias", "features.3.bias", "classifier.1.bias"]))
        return with_float_value(good, key, value), True
    scales = [0.5, 0.5, 0.25]
    scales[draw_data.draw(st.integers(0, 2))] = value
    return with_layer_edit(good, lambda layer: None, scales=scales), True


def _invariant(draw_data, good: bytes) -> tuple[bytes, bool]:
    kind = draw_data.draw(st.sampled_from(["scales", "flags", "version", "rank"]))
    if kind == "scales":
        number = st.one_of(st.sampled_from([0.0, -0.0, -1.0, 1.0, 2.0, 1e-30, 3e38]), st.floats(-4, 4, width=32))
        scales = [draw_data.draw(number) for _ in range(3)]
        mode = draw_data.draw(st.sampled_from(["cbd", "uniform"]))
        return with_layer_edit(good, lambda layer: None, scales=scales, layer_mode=mode), False
    if kind == "flags":
        flags = draw_data.draw(st.integers(1, 2**32 - 1))
        return sign(payload_of(good), version=2, flags=flags), True
    if kind == "version":
        version = draw_data.draw(st.one_of(st.integers(-3, 5), st.sampled_from([None, "2", 2.0, True])))
        return with_header_edit(good, lambda header: header.update(format_version=version)), version != 2
    field = draw_data.draw(st.sampled_from(["bound", "mask_rank", "paper_bits"]))
    value = draw_data.draw(st.integers(-2, 2**40))
    return with_layer_edit(good, lambda layer: layer.update({field: value})), False


def _many_layers(draw_data, good: bytes) -> tuple[bytes, bool]:
    return many_layers(good, draw_data.draw(st.sampled_from([1_000, 5_000, 20_000, 40_000]))), True


BOUNDED_TARGETS = {"size-bomb": _size_bomb, "nonfinite": _nonfinite, "invariant": _invariant,
                   "many-layers": _many_layers}


def hostile_files(good: bytes, folder: Path) -> dict[str, Path]:
    """The issue's four hostile files built from a valid format-2 file ``good`` (every checksum right): a header
    of 40,000 more all-zero layers, a 7-byte stream claiming 10^9 levels (also in a file padded with 150 kB of
    float tensor, so that its size budget lets the claim through), a constant float tensor declared 20000 x 20000
    float64, and the file followed by a hole to 2 GiB (sparse: no disk) with its length field patched to match."""
    files = {"40k-layer header": many_layers(good, 40_000), "10^9-level claim": level_bomb(good, 10**9),
             "10^9-level claim, padded past the budget": level_bomb(padded(good, 150_000), 10**9),
             "20000^2 float64 constant": constant_bomb(good)}
    paths = {name: folder / f"hostile{i}.cbd" for i, name in enumerate([*files, "2 GiB sparse"])}
    for name, data in files.items():
        paths[name].write_bytes(data)
    with open(paths["2 GiB sparse"], "wb") as handle:
        head = bytearray(good[:-32])
        head[16:24] = ((2 << 30) - 56).to_bytes(8, "little")
        handle.write(head)
        handle.truncate(2 << 30)
    return paths


def _child(argv: list[str]) -> tuple[int, float, int, str]:
    """``(exit code, CPU seconds, peak RSS bytes, last stderr line)`` of a child process."""
    import subprocess

    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = process.stderr.read().decode(errors="replace").strip().splitlines()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    return process.returncode, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, (err or [""])[-1]


def measure_hostile(good_path: str, data_spec: str) -> int:
    """Each hostile file through ``info``, ``info --verify``, ``eval`` and ``load`` in a child process: exit code,
    CPU time, peak RSS against the same command on the valid file (the issue's limits: under 5 s, under twice
    the decoded model's bytes + 200 MB)."""
    good = Path(good_path).read_bytes()
    py = [sys.executable]
    commands = {"info": lambda f: [*py, "-m", "cbdnet", "info", f, "--quiet"],
                "info --verify": lambda f: [*py, "-m", "cbdnet", "info", f, "--verify", "--quiet"],
                "load": lambda f: [*py, "-c", "import sys, cbdnet; cbdnet.load(sys.argv[1])", f],
                "eval": lambda f: [*py, "-m", "cbdnet", "eval", f, "--data", data_spec, "--quiet"]}
    model = cbdnet.load(good_path)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(f"hostile files from {good_path} ({len(good):,} bytes; decoded model {model_bytes / 2**20:.1f} MB), "
          f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("Limits apply to the CPU time and peak RSS above the same command on the valid file (eval: above `load` "
          "of it, which evaluates nothing): what the hostile file costs beyond starting Python and torch.\n")
    print("| file | command | exit | CPU s | above valid s | peak RSS MB | above valid MB | message |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    failures = 0
    with tempfile.TemporaryDirectory(prefix="cbd-hostile-") as tmp:
        paths = {"valid file": Path(good_path), **hostile_files(good, Path(tmp))}
        base: dict[str, tuple[float, int]] = {}
        for name, path in paths.items():
            for command, argv in commands.items():
                code, seconds, peak, message = _child(argv(str(path)))
                base.setdefault(command, (seconds, peak))
                ref = base["load"] if command == "eval" and "load" in base else base[command]
                more, rise = seconds - ref[0], peak - ref[1]
                over = name != "valid file" and (more > LIMIT_SECONDS or rise > 2 * model_bytes + LIMIT_SLACK)
                failures += over
                print(f"| {name} | {command} | {code} | {seconds:.2f} | {more:+.2f} | {peak / 2**20:.0f} | "
                      f"{rise / 2**20:+.0f} | {escape(message)[:100]}{' **OVER LIMIT**' if over else ''} |",
                      flush=True)
    return 1 if failures else 0


def escape(text: str) -> str:
    return text.replace("|", "\\|")


# ---------------------------------------------------------------- the output policy (issue 13)

TARGETS = ("new.cbd", "new.json", "old.txt", "model.cbd", "w.pt", "hard.cbd", "link.cbd", "dangling", "fifo",
           "folder", "missing/x.cbd", "/dev/null", "-", "", "/dev/stdout")


def _sandbox(folder: Path, cbd: bytes, weights: bytes) -> None:
    (folder / "model.cbd").write_bytes(cbd)
    (folder / "w.pt").write_bytes(weights)
    (folder / "old.txt").write_bytes(b"keep me\n")
    os.link(folder / "model.cbd", folder / "hard.cbd")
    (folder / "link.cbd").symlink_to(folder / "old.txt")
    (folder / "dangling").symlink_to(folder / "nowhere")
    os.mkfifo(folder / "fifo")
    (folder / "folder").mkdir()


def _snapshot(folder: Path) -> dict[str, object]:
    state: dict[str, object] = {}
    for entry in sorted(folder.rglob("*")):
        info = os.lstat(entry)
        content = entry.read_bytes() if stat.S_ISREG(info.st_mode) else os.readlink(entry) \
            if stat.S_ISLNK(info.st_mode) else stat.S_IFMT(info.st_mode)
        state[str(entry.relative_to(folder))] = content
    return state


def _argv(draw_data, folder: Path) -> tuple[list[str], dict[str, str]]:
    """A command line and the outputs it may create or (with --force) replace: path -> 'cbd', 'json' or 'dir'."""
    def target() -> str:
        name = draw_data.draw(st.sampled_from(TARGETS))
        return name if name in ("", "-") or name.startswith("/") else str(folder / name)

    force = ["--force"] if draw_data.draw(st.booleans()) else []
    command = draw_data.draw(st.sampled_from(["compress", "eval", "info", "demo"]))
    outputs: dict[str, str] = {}
    if command == "compress":
        argv = ["compress", "--arch", "cbd_mutations:tiny_model", "--weights",
                draw_data.draw(st.sampled_from(["random", str(folder / "w.pt")])), "-J", "2", "--quiet", *force]
        for flag, kind in (("-o", "cbd"), ("--json", "json")):
            if draw_data.draw(st.booleans()):
                path = target()
                outputs[path] = kind
                argv += [flag, path]
    elif command == "eval":
        path = target()
        outputs[path] = "json"
        argv = ["eval", str(folder / "model.cbd"), "--data", "digits", "--quiet", "--json", path, *force]
    elif command == "info":
        argv = ["info", str(folder / "model.cbd"), "--json", "--verify", "--quiet"]
    else:
        path = target()
        outputs[path] = "dir"
        argv = ["demo", "--out-dir", path, "--quiet", *force]
    return argv, outputs


def _violations(before: dict, after: dict, outputs: dict[str, str], folder: Path, code: int, forced: bool
                ) -> list[str]:
    """What the run did wrong to the sandbox (see the module doc); [] when nothing."""
    problems = [f"exit code {code}"] if code not in (0, 2) else []
    kinds = {str(Path(o).relative_to(folder)): kind for o, kind in outputs.items() if o.startswith(str(folder))}
    touched = set(kinds)
    replaceable = touched if forced and code == 0 else set()
    for name, content in before.items():
        now = after.get(name)
        if now != content and not (name in replaceable and isinstance(content, bytes) and isinstance(now, bytes)):
            problems.append(f"{name} changed")
    problems += [f"temporary file {name} left" for name in after if name.endswith(".tmp")]
    new = set(after) - set(before)
    if code != 0:  # a refused run creates no file (an --out-dir it created may stay, empty)
        problems += [f"{name} created by a refused run" for name in new if isinstance(after[name], bytes)]
        return problems
    for name in sorted((new | replaceable) & touched):
        data, kind = after.get(name), kinds[name]
        if kind == "cbd" and (not isinstance(data, bytes) or cbdnet.verify(folder / name)):
            problems.append(f"{name}: not a verifying .cbd")
        if kind == "dir" and any(cbdnet.verify(f) for f in (folder / name).glob("*.cbd")):
            problems.append(f"{name}: a demo file does not verify")
        if kind == "json":
            bare = []
            json.loads(data, parse_constant=bare.append)
            problems += [f"{name}: bare {c} in JSON" for c in bare]
    return problems


def _draw_outputs_case(campaign: Campaign, draw_data) -> tuple[str, list[str]]:
    folder = Path(tempfile.mkdtemp(dir=campaign.folder))
    try:
        _sandbox(folder, campaign.files[0], campaign.weights)
        argv, outputs = _argv(draw_data, folder)
        before = _snapshot(folder)
        devnull = os.stat(os.devnull)
        here = os.getcwd()
        os.chdir(folder)  # relative names ("-" as a folder) land in the sandbox
        try:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                code = cli.main(argv)
        finally:
            os.chdir(here)
        problems = _violations(before, _snapshot(folder), outputs, folder, code, "--force" in argv)
        if not stat.S_ISCHR(os.stat(os.devnull).st_mode) or os.stat(os.devnull).st_ino != devnull.st_ino:
            problems.append("/dev/null replaced")
        return ("accepted" if code == 0 else "refused"), [f"{' '.join(argv)}: {p}" for p in problems]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


SWEEP_NAMES = ("results.json", "results.csv", "results.md", "spec.toml", "pareto.png", ".lock", "points", "files")
SWEEP_THINGS = ("link-to-user", "link-to-input", "dangling", "fifo", "folder", "hard-link-to-input", "regular")
SWEEP_OUT = ("out", "old.txt", "link-to-out", "fifo", "")  # never a new folder: that would run the points
SWEEP_OWN = ("results.json", "results.csv", "results.md", "spec.toml", "pareto.png")


def _awkward(path: Path, thing: str, folder: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
    {"link-to-user": lambda: path.symlink_to(folder / "old.txt"),
     "link-to-input": lambda: path.symlink_to(folder / "s.toml"),
     "dangling": lambda: path.symlink_to(folder / "nowhere"), "fifo": lambda: os.mkfifo(path),
     "folder": lambda: path.mkdir(), "hard-link-to-input": lambda: os.link(folder / "s.toml", path),
     "regular": lambda: path.write_bytes(b"stale\n")}[thing]()


def _draw_sweep_case(campaign: Campaign, draw_data) -> tuple[str, list[str]]:
    from test_sweep_outputs import SPEC, finished_sweep

    folder = Path(tempfile.mkdtemp(dir=campaign.folder))
    try:
        (folder / "s.toml").write_text(SPEC)
        (folder / "old.txt").write_bytes(b"keep me\n")
        os.mkfifo(folder / "fifo")
        out = folder / "out"
        finished_sweep(out, folder / "s.toml")
        (folder / "link-to-out").symlink_to(out)
        name, thing = draw_data.draw(st.sampled_from(SWEEP_NAMES)), draw_data.draw(st.sampled_from(SWEEP_THINGS))
        if not (name in ("points", "files") and thing in ("regular", "folder")):  # (an empty points/: a rerun)
            _awkward(out / name, thing, folder)
        target = draw_data.draw(st.sampled_from(SWEEP_OUT))
        argv = ["sweep", str(folder / "s.toml"), "-o", str(folder / target) if target else "", "--quiet",
                *(["--force"] if draw_data.draw(st.booleans()) else [])]
        before = _snapshot(folder)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            code = cli.main(argv)
        after = _snapshot(folder)
        problems = [f"exit code {code}"] if code not in (0, 2) else []
        own = {f"out/{n}" for n in SWEEP_OWN} | {k for k in before if k.startswith("out/points/")}
        for key, content in before.items():
            now = after.get(key)
            if now != content and not (code == 0 and key in own and isinstance(content, bytes)
                                       and isinstance(now, bytes)):
                problems.append(f"{key} changed")
        problems += [f"temporary file {k} left" for k in after if k.endswith(".tmp")]
        new = set(after) - set(before) - {"out/.lock"}
        if code != 0:
            problems += [f"{k} created by a refused run" for k in new]
        else:
            bare, results = [], after.get("out/results.json")
            if not isinstance(results, bytes):
                problems.append(f"exit 0 but out/results.json is {results!r}")
                results = b"[]"
            rows = json.loads(results, parse_constant=bare.append)
            problems += [f"bare {c} in results.json" for c in bare]
            problems += [] if [r["status"] for r in rows] == ["done", "done"] else ["results.json rows not done"]
        return ("accepted" if code == 0 else "refused"), [f"{' '.join(argv)} ({name}: {thing}): {p}"
                                                         for p in problems]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="time budget (default 5)")
    parser.add_argument("--examples", type=int, default=200, help="cases per target per round (default 200)")
    parser.add_argument("--targets", nargs="*", help="only these targets")
    parser.add_argument("--json", help="write the counts as JSON here")
    parser.add_argument("--hostile", nargs=2, metavar=("FILE.cbd", "DATA"),
                        help="instead of fuzzing: the issue-26 hostile files built from this valid format-2 file, "
                             "through info, info --verify, eval (on DATA) and load, each in a child process")
    args = parser.parse_args(argv)
    if args.hostile:
        return measure_hostile(*args.hostile)
    torch.set_num_threads(1)
    demo.SETTINGS = demo.SETTINGS[:1]  # the outputs target: the demo's policy, not its 12 training epochs
    demo.train_digits_cnn = lambda seed, quiet: tiny_model(seed)
    start = time.perf_counter()
    files = [tiny_file(planes=3, bottleneck=0.3), tiny_file(planes=5, bottleneck=0.5), tiny_file(planes=1)]
    v2_files = [tiny_file(planes=3, bottleneck=0.3, version=2), tiny_file(planes=5, bottleneck=0.5, version=2),
                tiny_file(planes=1, version=2), kernel_file()]  # the last: ans-kernel layers (kernel contexts)
    with tempfile.TemporaryDirectory(prefix="cbd-fuzz-") as tmp:
        campaign = Campaign(files, Path(tmp), v2_files)
        rounds = 0
        while time.perf_counter() - start < 60 * args.minutes:
            campaign.round(args.examples, rounds, args.targets)
            rounds += 1
    seconds = time.perf_counter() - start
    total = collections.Counter()
    print(f"cbdnet fuzz campaign: {rounds} rounds, {seconds:.0f} s, python {platform.python_version()}, "
          f"torch {torch.__version__}")
    print(f"{'target':<12} {'cases':>8} {'refused':>8} {'accepted':>9} {'crash':>6} {'limit':>6} {'EXECUTED':>9} "
          f"{'(unchanged, not run)':>21}  worst call: CPU s, peak RSS rise MB")
    for name, counts in [*campaign.counts.items(), ("total", total)]:
        if name != "total":
            total.update(counts)
        cases = counts["refused"] + counts["accepted"] + counts["crash"] + counts["limit"]
        worst = campaign.worst.get(name)
        shown = f"  {worst[0]:.2f}, {worst[1] / 2**20:.0f}" if worst else ""
        print(f"{name:<12} {cases:>8} {counts['refused']:>8} {counts['accepted']:>9} {counts['crash']:>6} "
              f"{counts['limit']:>6} {counts['EXECUTED']:>9} {counts['unchanged']:>21}{shown}")
    for crash in campaign.crashes:
        print("CRASH", crash)
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": seconds, "rounds": rounds, "total": dict(total),
                                               "targets": {k: dict(v) for k, v in campaign.counts.items()},
                                               "worst": dict(campaign.worst),
                                               "crashes": campaign.crashes}, indent=2) + "\n")
    return 1 if total["crash"] or total["EXECUTED"] or total["limit"] else 0


if __name__ == "__main__":
    sys.exit(main())
