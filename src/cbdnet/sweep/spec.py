"""The sweep spec (TOML): parse, validate, expand into points, and key each point by its inputs' content.

A spec is a contract (extend it, never rename it)::

    [model]
    arch = "cifar-resnet20"                        # a registered arch, torchvision:NAME or module.path:factory
    weights = "../shared/models/cifar10_resnet20.th"   # or "random" (seeded by the optional seed = N, default 0)
    [data]
    eval = "cifar10-npz:../shared/data/cifar10_test.npz"
    calib = "cifar10-npz:../shared/data/cifar10_calib1000.npz"   # optional; training images only
    [[point]]                                      # keys: the ``compress`` option names
    method = "rtn"
    bits = [3, 4, 5]                               # a list expands: one point per value (cartesian product)
    granularity = ["channel", "tensor"]
    calib = true                                   # calibrate on [data].calib (GPTQ where the code uses it)

Relative paths are relative to the spec file. ``skip`` is a list of layer names (a list of lists expands);
``label`` names the point's plot series. Every point's options are mapped to configs up front by
:func:`cbdnet.calib.configs.config_from_options`, the mapping the ``compress`` command uses, so a point the CLI
would refuse fails the whole spec before anything runs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..calib.configs import ConfigError, OptionError, config_from_options
from ..errors import CBDError
from ..nn.walk import check_skip
from ..options import OPTIONS, option
from ..zoo.data import SPEC_KINDS
from ..zoo.models import build

__all__ = ["SweepError", "SpecError", "DataRef", "Spec", "POINT_KEYS", "load_spec", "expand_points",
           "content_digests", "point_key", "fp32_key", "series_label", "point_options"]


class SweepError(CBDError):
    """A problem the user can fix (spec, cluster, output folder); one line, exit code 2 from the CLI."""


class SpecError(SweepError, ValueError):
    """A sweep spec that cannot be run; raised before any point runs."""


# the columns of results.csv, in this order (a contract): the compress options, skip and label
POINT_KEYS = ("method", "bits", "granularity", "planes", "bottleneck", "fallback", "target-bits", "calib",
              "gptq", "bias-correction", "bn-reestimate", "adaround", "refit", "calib-images", "device", "skip",
              "label")
_SPLITS = {"digits": ("train", "test"), "camvid-npz": ("train", "val", "test")}
_DIR_KINDS = ("imagefolder", "voc")
RANDOM = "random"

Check = Callable[[Any], tuple[Any, str | None]]


@dataclass(frozen=True)
class DataRef:
    """One ``KIND[:PATH][:split]`` data spec, its PATH resolved against the spec file's folder."""

    raw: str
    kind: str
    path: Path | None
    split: str | None

    def resolved(self) -> str:
        """The data spec with an absolute path: what the workers open."""
        out = self.kind if self.path is None else f"{self.kind}:{self.path}"
        return out if self.split is None else f"{out}:{self.split}"


@dataclass(frozen=True)
class Spec:
    """A validated spec: the model, the data and the ``[[point]]`` tables (list values kept unexpanded)."""

    path: Path
    arch: str
    weights: str
    weights_path: Path | None
    seed: int
    eval: DataRef
    calib: DataRef | None
    tables: tuple[dict, ...]
    text: str = field(default="", repr=False)

    def input_paths(self) -> list[Path]:
        """Every file or folder the workers must read."""
        refs = [self.eval, self.calib]
        return [p for p in [self.weights_path, *(r.path for r in refs if r is not None)] if p is not None]


# ---------------------------------------------------------------- value checks


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "a table"}.get(type(value), type(value).__name__)


def _option_check(name: str) -> Check:
    """The check of a ``compress`` option: the one the configs and the CLI use (:mod:`cbdnet.options`)."""
    spec = option(name)

    def check(value: Any) -> tuple[Any, str | None]:
        try:
            return spec.check(value, name), None
        except ConfigError as exc:
            return None, str(exc)
    return check


def _bool_check(name: str) -> Check:
    def check(value: Any) -> tuple[Any, str | None]:
        if not isinstance(value, bool):
            return None, f"{name} must be true or false, got {_type_name(value)} {value!r}"
        return value, None
    return check


def _skip_check(value: Any) -> tuple[Any, str | None]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        return None, f"skip must be a layer name or a list of layer names, got {value!r}"
    return sorted(set(names)), None


def _label_check(value: Any) -> tuple[Any, str | None]:
    if not isinstance(value, str) or not value.strip():
        return None, f"label must be a non-empty string, got {value!r}"
    return value, None


_CHECKS: dict[str, Check] = {
    **{opt.name: _option_check(opt.name) for opt in OPTIONS if opt.kind != "data"},
    "calib": _bool_check("calib"),  # a point's calib says whether [data].calib is used
    "skip": _skip_check,
    "label": _label_check,
}


def _expands(name: str, value: Any) -> bool:
    """A list value is one point per element, except ``label`` (never) and ``skip`` (only a list of lists)."""
    if name == "skip":
        return isinstance(value, list) and bool(value) and all(isinstance(v, list) for v in value)
    return isinstance(value, list) and name != "label"


def _validate_table(table: Any, where: str) -> dict:
    if not isinstance(table, dict):
        raise SpecError(f"{where} must be a table")
    unknown = [key for key in table if key not in _CHECKS]
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(POINT_KEYS)}")
    out = {}
    for name, value in table.items():
        expand = _expands(name, value)
        if expand and not value:
            raise SpecError(f"{where}: {name} = [] expands to no points")
        checked: list = []
        for item in (value if expand else [value]):
            good, error = _CHECKS[name](item)
            if error:
                raise SpecError(f"{where}: {error}")
            if good not in checked:
                checked.append(good)
        out[name] = checked if expand else checked[0]
    return out


# ---------------------------------------------------------------- files and data


def _readable(path: Path, what: str, directory: bool = False) -> None:
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise SpecError(f"{what} {path} does not exist or cannot be read ({exc.strerror or exc})") from None
    if directory:
        if not stat.S_ISDIR(mode) or not os.access(path, os.R_OK | os.X_OK):
            raise SpecError(f"{what} {path} is not a readable folder")
    elif not stat.S_ISREG(mode) or not os.access(path, os.R_OK):
        raise SpecError(f"{what} {path} is not a readable file")


def _data_ref(raw: Any, what: str, base: Path) -> DataRef:
    if not isinstance(raw, str) or not raw:
        raise SpecError(f"{what} must be a data spec string such as 'cifar10-npz:PATH', got {raw!r}")
    kind, _, rest = raw.partition(":")
    if kind not in SPEC_KINDS:
        raise SpecError(f"{what}: unknown data kind {kind!r} in {raw!r}; expected one of: {', '.join(SPEC_KINDS)}")
    if kind == "digits":
        if rest and rest not in _SPLITS["digits"]:
            raise SpecError(f"{what}: digits split must be train or test, got {rest!r}")
        return DataRef(raw, kind, None, rest or None)
    split = None
    head, _, tail = rest.rpartition(":")
    if kind in _SPLITS and head and tail in _SPLITS[kind]:
        rest, split = head, tail
    if not rest:
        raise SpecError(f"{what}: {kind} needs a path: {kind}:PATH")
    path = (base / os.path.expanduser(rest)).resolve()
    _readable(path, f"{what} ({kind})", directory=kind in _DIR_KINDS)
    return DataRef(raw, kind, path, split)


def _check_arch(arch: Any, where: str) -> torch.nn.Module:
    if not isinstance(arch, str) or not arch:
        raise SpecError(f"{where}: [model].arch must be a non-empty string, got {arch!r}")
    try:
        with torch.device("meta"):  # the layout only: no memory, no initialisation
            return build(arch, allow_import=True)
    except CBDError as exc:
        raise SpecError(f"{where}: [model].arch: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - a user's factory may raise anything
        raise SpecError(f"{where}: [model].arch {arch!r} cannot be built: {type(exc).__name__}: {exc}") from None


# ---------------------------------------------------------------- the spec


def _read_toml(path: Path) -> tuple[str, dict]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"cannot read sweep spec {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: not valid TOML: {str(exc).splitlines()[0]}") from None


_TABLE_KEYS = {"model": ("arch", "weights", "seed"), "data": ("eval", "calib")}
_REQUIRED = {"model": ("arch", "weights"), "data": ("eval",)}


def _check_tables(doc: dict, path: Path) -> None:
    unknown = [key for key in doc if key not in ("model", "data", "point")]
    if unknown:
        raise SpecError(f"{path}: unknown table or key {unknown[0]!r}; expected [model], [data] and [[point]]")
    for name, allowed in _TABLE_KEYS.items():
        if name not in doc:
            raise SpecError(f"{path}: missing [{name}] table")
        if not isinstance(doc[name], dict):
            raise SpecError(f"{path}: {name} must be a table [{name}]")
        bad = [key for key in doc[name] if key not in allowed]
        if bad:
            raise SpecError(f"{path}: unknown key {bad[0]!r} in [{name}]; allowed: {', '.join(allowed)}")
        missing = [key for key in _REQUIRED[name] if key not in doc[name]]
        if missing:
            raise SpecError(f"{path}: [{name}] needs {missing[0]} = ...")
    points = doc.get("point")
    if points is None:
        raise SpecError(f"{path}: no [[point]] tables: nothing to run")
    if not isinstance(points, list):
        raise SpecError(f"{path}: point must be an array of tables: write [[point]], not [point]")


def _weights(model: dict, path: Path, base: Path) -> tuple[str, Path | None, int]:
    weights, seed = model["weights"], model.get("seed", 0)
    if not isinstance(weights, str) or not weights:
        raise SpecError(f"{path}: [model].weights must be a path or 'random', got {weights!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SpecError(f"{path}: [model].seed must be an integer, got {seed!r}")
    if weights == RANDOM:
        return weights, None, seed
    if "seed" in model:
        raise SpecError(f"{path}: [model].seed applies to weights = 'random' only")
    resolved = (base / os.path.expanduser(weights)).resolve()
    _readable(resolved, f"{path}: [model].weights")
    return weights, resolved, seed


def load_spec(path: str | os.PathLike) -> Spec:
    """Parse and validate a sweep spec, and check every point's options the way ``compress`` checks its flags;
    any problem is a :class:`SpecError` with a one-line message, raised before any work."""
    path = Path(path)
    text, doc = _read_toml(path)
    _check_tables(doc, path)
    base = path.resolve().parent
    model = _check_arch(doc["model"]["arch"], str(path))
    weights, weights_path, seed = _weights(doc["model"], path, base)
    eval_ref = _data_ref(doc["data"]["eval"], f"{path}: [data].eval", base)
    calib = doc["data"].get("calib")
    calib_ref = _data_ref(calib, f"{path}: [data].calib", base) if calib is not None else None
    tables = tuple(_validate_table(t, f"{path}: [[point]] #{i + 1}") for i, t in enumerate(doc["point"]))
    spec = Spec(path.resolve(), doc["model"]["arch"], weights, weights_path, seed, eval_ref, calib_ref, tables, text)
    for index, point in enumerate(expand_points(spec)):
        _check_point(point, spec, model, f"{path}: point #{index + 1} ({series_label(point)})")
    return spec


def point_options(point: dict) -> dict:
    """The ``compress`` options of a point (``skip`` and ``label`` left out, ``method`` always present)."""
    return {k: v for k, v in point.items() if k not in ("skip", "label")}


def _check_point(point: dict, spec: Spec, model: torch.nn.Module, where: str) -> None:
    if point.get("calib") and spec.calib is None:
        raise SpecError(f"{where}: calib = true needs [data].calib")
    try:
        config_from_options(point_options(point))
        check_skip(model, point.get("skip", ()))
    except (OptionError, ConfigError, CBDError) as exc:
        raise SpecError(f"{where}: {exc}") from None


def expand_points(spec: Spec) -> list[dict]:
    """One dict per point, in spec order: the cartesian product of each table's list values (in the order the
    table names its keys), keys in :data:`POINT_KEYS` order, ``method`` defaulting to ``cbd`` (as in the CLI)
    unless the point has ``target-bits``."""
    out = []
    for table in spec.tables:
        names = list(table)
        axes = [table[n] if _expands(n, table[n]) else [table[n]] for n in names]
        for combo in itertools.product(*axes):
            point = dict(zip(names, combo, strict=True))
            if "target-bits" not in point:
                point.setdefault("method", "cbd")
            out.append({k: point[k] for k in POINT_KEYS if k in point})
    return out


# ---------------------------------------------------------------- keys


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _dir_digest(path: Path) -> str:
    """A folder (imagefolder, voc) is summarised by its listing (relative names, sizes, mtimes): hashing every
    image of an ImageNet folder would take longer than many sweeps."""
    digest = hashlib.sha256()
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            entry = Path(root) / name
            st = entry.stat()
            digest.update(f"{entry.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return "listing-sha256:" + digest.hexdigest()


def _data_identity(ref: DataRef) -> str:
    if ref.path is None:
        digest = "builtin"
    elif ref.kind in _DIR_KINDS:
        digest = _dir_digest(ref.path)
    else:
        digest = _file_digest(ref.path)
    return f"{ref.kind}:{ref.split or ''}:{digest}"


def content_digests(spec: Spec) -> dict:
    """The identity of a spec's inputs: the architecture, the weights' and the data's content digests."""
    try:
        weights = f"random:{spec.seed}" if spec.weights_path is None else _file_digest(spec.weights_path)
        return {"arch": spec.arch, "weights": weights, "eval": _data_identity(spec.eval),
                "calib": _data_identity(spec.calib) if spec.calib is not None else None}
    except OSError as exc:
        raise SpecError(f"cannot read an input of {spec.path}: {exc}") from None


def _sha256_json(payload: dict) -> str:
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def point_key(point: dict, digests: dict, version: str) -> str:
    """sha256 of the point's config (``label`` left out: it only names a series), the inputs' digests (the
    calibration data's only where the point uses it) and the cbdnet version."""
    inputs = dict(digests)
    if not point.get("calib"):
        inputs.pop("calib", None)
    config = {k: v for k, v in point.items() if k != "label"}
    return _sha256_json({"point": config, "inputs": inputs, "version": str(version)})


def fp32_key(digests: dict, version: str) -> str:
    """The key of the uncompressed model's evaluation: computed once per model and eval data."""
    inputs = {k: v for k, v in digests.items() if k != "calib"}
    return _sha256_json({"fp32": True, "inputs": inputs, "version": str(version)})


# ---------------------------------------------------------------- series


def series_label(point: dict) -> str:
    """The plot series of a point: its ``label``, else one made of method and options, e.g. "rtn channel",
    "rtn channel + gptq", "cbd (paper)" (the per-tensor code, size fallback), "cbd tensor" (cbdnet's default
    distortion fallback), "target-bits + calib"."""
    if point.get("label"):
        return point["label"]
    calib = bool(point.get("calib"))
    if "target-bits" in point:
        base, suffix = "target-bits", " + calib" if calib else ""
    else:
        method = point.get("method", "cbd")
        granularity = point.get("granularity") or ("channel" if method == "rtn" else "tensor")
        base = f"{method} {granularity}" if method != "uniform" else "uniform"
        if method == "cbd" and granularity == "tensor":
            base = "cbd (paper)" if point.get("fallback") == "size" else "cbd (distortion fallback)"
        gptq = method == "rtn" and granularity == "channel" and point.get("gptq", True)
        suffix = (" + gptq" if gptq else " + calib") if calib else ""
    if calib and point.get("bias-correction"):
        suffix += " + bias-corr"
    if calib and point.get("bn-reestimate"):
        suffix += " + bn-reest"
    if calib and point.get("adaround"):
        suffix += " + adaround"
    if calib and point.get("refit") is False:
        suffix += " (no refit)"
    if point.get("skip"):
        suffix += f" (skip {len(point['skip'])})"
    return base + suffix
