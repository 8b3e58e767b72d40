"""Every ``compress`` option declared once: its name (the CLI flag without ``--`` and the sweep spec's key), the
config field it sets, its type, range, choices, default, help and the methods it applies to.

The configs (:mod:`cbdnet.calib.configs`) validate their fields with :meth:`Option.check`, the CLI parser
(:mod:`cbdnet.cli.parser`) builds its method, budget and calibration flags from :data:`OPTIONS` (type checker
:meth:`Option.parse`, help with the range and default), and the sweep spec (:mod:`cbdnet.sweep.spec`) checks a
point's keys with :meth:`Option.check`, so the three accept the same values (``tests/api/test_options.py``).

A leaf: the standard library and :mod:`cbdnet.errors` only, so that ``cbdnet --help`` imports neither torch nor
numpy. To add an option (e.g. ``--device``, a :class:`~cbdnet.calib.configs.CalibrationConfig` field):

1. append ``Option("device", "device", "str", "where calibration runs", ("cbd", "uniform", "rtn", "budget"),
   "budget", pattern=r"cpu|cuda(:[0-9]+)?|mps", accepts="cpu, cuda, cuda:N or mps", examples=("cpu",),
   unset=(None,), default_help="...")`` to :data:`OPTIONS` (``group``: the CLI argument group it joins; a group
   other than "method"/"budget" needs one ``_add_options(group, NAME)`` line in the parser). The CLI flag and
   the sweep key exist at once, checked alike;
2. give the config field ``device: str | None = by_field("device").default`` and add ``"device"`` to the
   ``_checked(self, ...)`` call of its ``__post_init__``;
3. pass it on in :func:`cbdnet.calib.configs.config_from_options` (``_fields(options, ..., "device")``), add it
   to :data:`cbdnet.sweep.spec.POINT_KEYS` (the results' column order), and refuse it where its method ignores
   it. ``tests/api/test_options.py`` then tries its values on all three.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

from .errors import CBDError

__all__ = ["ConfigError", "Option", "OPTIONS", "option", "by_field", "METHODS", "GRANULARITIES", "FALLBACK_RULES",
           "MAX_PLANES", "BIAS_CORRECTION"]

# The library's choices; cbdnet.codec keeps its own copies (it validates its arguments on its own) and
# tests/api/test_options.py checks that they are these.
METHODS = ("cbd", "uniform", "rtn")  # the --method choices; --target-bits is the budget ("target-bits")
GRANULARITIES = ("channel", "tensor")
FALLBACK_RULES = ("distortion", "size")
MAX_PLANES = 16
BIAS_CORRECTION = (True, False, "auto")  # CalibrationConfig.bias_correction's values
_INT_TEXT = re.compile(r"[+-]?[0-9]+")


class ConfigError(CBDError, ValueError):
    """A config field out of range or of the wrong type; ``field`` names it."""

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(message)
        self.field = field or message.split(" ", 1)[0]


@dataclass(frozen=True)
class Option:
    """One ``compress`` option.

    ``kind`` is ``"int"``, ``"float"``, ``"choice"``, ``"str"`` (a string matching ``pattern``, described by
    ``accepts``; ``examples`` are valid ones, for the tests), ``"bool"`` (a ``--flag/--no-flag`` pair on the CLI)
    or ``"data"`` (``calib``: a data spec on the CLI, ``true``/``false`` in a sweep point, no config field).
    ``low``/``high`` bound numbers, each end open where ``low_open``/``high_open``; ``default`` is the
    library's (per method where ``method_defaults`` says so); ``unset`` is a field value that means "not given"
    (``None`` images: all; ``"auto"`` bias correction), accepted as it is (the CLI says it by leaving the flag
    out). ``methods``: the methods it applies to (``"budget"``: ``--target-bits``); ``tests/api/test_options.py``
    checks them against the configs' fields."""

    name: str
    field: str | None
    kind: str
    help: str
    methods: tuple[str, ...]
    group: str  # the CLI's argument group: "method" or "budget"
    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] = ()
    default: Any = None
    method_defaults: dict[str, Any] = dataclasses.field(default_factory=dict)
    unset: tuple[Any, ...] = ()
    short: str | None = None
    metavar: str | None = None
    default_help: str | None = None  # the CLI's default in words, where it is not ``default``
    pattern: str | None = None  # kind "str": the regular expression a value matches as a whole
    accepts: str | None = None  # kind "str": what a value is, in words ("a device such as cpu or cuda:0")
    examples: tuple[str, ...] = ()  # kind "str": valid values

    @property
    def flag(self) -> str:
        return "--" + self.name

    def describe(self) -> str:
        """What the option accepts, e.g. ``an integer in 2..17``, ``a number in (1, 32]``."""
        if self.kind == "int":
            return f"an integer in {int(self.low)}..{int(self.high)}"
        if self.kind == "float":
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f"a number in {left}{self.low:g}, {self.high:g}{right}"
        if self.kind == "choice":
            return f"one of {', '.join(self.choices)}"
        if self.kind == "str":
            return self.accepts or "a non-empty string"
        extra = [repr(unset) for unset in self.unset if unset is not None]
        return f"True, False or {' or '.join(extra)}" if extra else "True or False"

    def _fail(self, value: Any, name: str | None) -> ConfigError:
        name = name or self.field or self.name
        return ConfigError(f"{name} must be {self.describe()}, got {value!r}", name)

    def check(self, value: Any, name: str | None = None) -> Any:
        """``value`` checked (a :class:`ConfigError` naming ``name``, the field by default, otherwise) and
        normalised (a float option's int becomes a float, so that 3 and 3.0 are one value)."""
        if any(value is unset or type(value) is type(unset) and value == unset for unset in self.unset):
            return value
        if self.kind in ("bool", "data"):
            if not isinstance(value, bool):
                raise self._fail(value, name)
            return value
        if self.kind == "choice":
            if not isinstance(value, str) or value not in self.choices:
                raise self._fail(value, name)
            return value
        if self.kind == "str":
            if not isinstance(value, str) or not value or not re.fullmatch(self.pattern or r".+", value):
                raise self._fail(value, name)
            return value
        number = not isinstance(value, bool) and isinstance(value, int if self.kind == "int" else (int, float))
        if not number or not math.isfinite(value) or not self._in_range(value):
            raise self._fail(value, name)
        return float(value) if self.kind == "float" else value

    def _in_range(self, value: float) -> bool:
        low_ok = value > self.low if self.low_open else value >= self.low
        high_ok = value < self.high if self.high_open else value <= self.high
        return low_ok and high_ok

    def parse(self, text: str) -> Any:
        """The value of the option's command-line text, checked as :meth:`check` checks it (the argparse
        ``type=`` of its flag: argparse turns the :class:`ConfigError`, a ``ValueError``, into a usage error)."""
        value: Any = text
        if self.kind == "int" and _INT_TEXT.fullmatch(text.strip()):
            value = int(text.strip())
        elif self.kind == "float":
            with contextlib.suppress(ValueError):  # not a number: the check below says what is expected
                value = float(text)
        try:
            return self.check(value)
        except ConfigError as exc:  # argparse prints an ArgumentTypeError's message as it is
            raise argparse.ArgumentTypeError(str(exc)) from None

    def default_text(self) -> str:
        """The default as the help shows it."""
        if self.default_help:
            return self.default_help
        if self.method_defaults:
            return ", ".join(f"{value} for {method}" for method, value in self.method_defaults.items())
        if self.kind == "bool":
            return "on" if self.default else "off"
        return "off" if self.default is None else f"{self.default}"

    def help_text(self) -> str:
        """The CLI help: what it does, what it accepts and its default."""
        accepts = self.describe().split(" in ", 1)[1] + "; " if self.kind in ("int", "float") else ""
        return f"{self.help} ({accepts}default: {self.default_text()})"


_CALIB = ("cbd", "uniform", "rtn", "budget")

# In the order the CLI's help lists them.
OPTIONS: tuple[Option, ...] = (
    Option("method", None, "choice", "cbd (composite planes + GF(2) factors, the paper's), uniform (plain J-bit "
           "code, the paper's baseline) or rtn (K-bit symmetric round-to-nearest, sign included, the usual "
           "baseline)", METHODS, "method", choices=METHODS, default="cbd"),
    Option("planes", "planes", "int", "cbd/uniform: bit planes J", ("cbd", "uniform"), "method", low=1,
           high=MAX_PLANES, default=5, short="-J"),
    Option("bottleneck", "bottleneck", "float", "cbd: rank bound / min(h, w) of a factored plane", ("cbd",),
           "method", low=0.0, high=1.0, default=0.3, short="-b"),
    Option("fallback", "fallback", "choice", "cbd: when a layer's composite code is replaced by the uniform "
           "J-plane code: 'distortion' (where its squared error x 4^(bits/weight) is higher) or 'size' (the "
           "paper's rule: only where it takes no fewer bits)", ("cbd",), "method", choices=FALLBACK_RULES,
           default="distortion", unset=(None,)),
    Option("bits", "bits", "int", "rtn: bits per weight K, sign included (2^(K-1)-1 levels per side)", ("rtn",),
           "method", low=2, high=17, default=4),
    Option("granularity", "granularity", "choice", "one scale per output channel or per tensor (the paper's "
           "code: tensor)", ("cbd", "rtn"), "method", choices=GRANULARITIES,
           method_defaults={"rtn": "channel", "cbd": "tensor"}),
    Option("target-bits", "target_bits", "float", "choose per-layer codes to fit X bits per weight of the whole "
           "file, by predicted --calib loss (without --calib: by weight squared error)", ("budget",), "budget",
           low=1.0, high=32.0, low_open=True, default=4.0, metavar="X",
           default_help="off"),
    Option("calib", None, "data", "calibration data spec (training images only), e.g. "
           "cifar10-npz:../shared/data/cifar10_calib1000.npz", _CALIB, "budget", default_help="none"),
    Option("calib-images", "images", "int", "use only the first N calibration images", _CALIB, "budget", low=1,
           high=1 << 31, unset=(None,), metavar="N",
           default_help="all"),
    Option("gptq", "gptq", "bool", "with --calib: error-compensating rounding (GPTQ) instead of round-to-nearest "
           "(rtn per channel and --target-bits)", ("rtn", "budget"), "budget", default=True),
    Option("bias-correction", "bias_correction", "bool", "with --calib: remove each layer's mean output shift",
           _CALIB, "budget", default="auto", unset=("auto",),
           default_help="kept where it lowers the calibration loss"),
    Option("bn-reestimate", "bn_reestimate", "bool", "with --calib: recompute BatchNorm statistics on the "
           "calibration images", _CALIB, "budget", default=False),
    Option("refit", "refit", "bool", "with --calib: after the codes are chosen, round each GPTQ grid again on the "
           "compressed model so far, against the float layer's output (rtn per channel and --target-bits)",
           ("rtn", "budget"), "budget", default=True),
    Option("adaround", "adaround", "int", "with --calib and --target-bits or --method rtn: learn each block's "
           "rounding for STEPS optimiser steps after the codes are chosen (AdaRound/BRECQ; 0: off)",
           ("rtn", "budget"), "budget", low=0, high=1_000_000, default=0, metavar="STEPS"),
    Option("device", "device", "str", "with --calib: where the forward and backward passes, the statistics and "
           "refit's moments run (cpu, cuda, cuda:N, or auto: CUDA where available); the codes and GPTQ are "
           "computed on the CPU, and the device is not recorded in the file",
           ("cbd", "uniform", "rtn", "budget"), "budget", default="cpu", pattern=r"cpu|auto|cuda(:[0-9]{1,3})?",
           accepts="cpu, cuda, cuda:N or auto", examples=("cpu", "auto", "cuda", "cuda:1"), metavar="DEVICE"),
)

_BY_NAME = {opt.name: opt for opt in OPTIONS}
_BY_FIELD = {opt.field: opt for opt in OPTIONS if opt.field}


def option(name: str) -> Option:
    """The option of a CLI flag / sweep key (without ``--``)."""
    return _BY_NAME[name]


def by_field(name: str) -> Option:
    """The option that sets a config field."""
    return _BY_FIELD[name]
