"""One frozen, self-validating config per compression workflow (like torchao's ``quantize_(model, config)``).

Each config checks its own fields in ``__post_init__`` (a bad value is a :class:`cbdnet.CBDError` naming the
argument) and serialises to ``{"method": ..., **fields}`` (:meth:`to_dict`), which is what the report and the
``.cbd`` file record. :func:`config_from_dict` reads it back.

- :class:`CBDConfig`: the paper's composite code (``granularity="tensor"``) or its per-channel variant;
- :class:`UniformConfig`: the paper's plain J-bit fallback code on every layer;
- :class:`RTNConfig`: round-to-nearest, the usual baseline (rounded by GPTQ where calibration data is given);
- :class:`BudgetConfig`: the best code per layer under a whole-model bits/weight budget;
- :class:`CalibrationConfig`: what calibration data is used for (GPTQ, bias correction, BN re-estimation).

One config per call: each compress config carries its calibration settings in its ``calibration`` field
(a :class:`CalibrationConfig`, or None for the defaults), used where calibration data is given. Each config
has a user-facing ``name``; ``method`` is what files and reports record (for :class:`BudgetConfig`
``"target-bits"``, the CLI flag's name, kept so that every existing file and JSON reads the same).
"""

from __future__ import annotations

import math
from dataclasses import Field, asdict, dataclass, fields
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ..errors import CBDError
from ..options import METHODS as METHOD_CHOICES
from ..options import OPTIONS, ConfigError, by_field, option
from .budget import COMPOSITE_PLANES, FREE_LEVELS, RTN_BITS, SENSITIVITY_EXPONENTS, WEIGHTED_LEVELS

__all__ = ["ConfigError", "resolve_device", "CBDConfig", "UniformConfig", "RTNConfig", "BudgetConfig",
           "CalibrationConfig", "CompressConfig",
           "config_from_dict", "config_from_options", "OptionError", "OPTION_NAMES", "METHODS"]


def _checked(config, *names: str) -> None:
    """Check each field ``name`` with its option's spec (:mod:`cbdnet.options`: the CLI and sweep check the same)
    and store its normalised value (a float field's int as a float)."""
    for name in names:
        object.__setattr__(config, name, by_field(name).check(getattr(config, name)))


def _int_in(value, name: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer in {low}..{high}, got {value!r}")


def _numbers(values, name: str, low: float, high: float, low_included: bool = True) -> tuple[float, ...]:
    """``values`` as a tuple of floats, each in ``[low, high]`` (``(low, high]`` unless ``low_included``)."""
    out = []
    for value in values:
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not number or value > high or value < low or value == low and not low_included:
            raise ConfigError(f"{name} must hold numbers in {'[' if low_included else '('}{low:g}, {high:g}], "
                              f"got {value!r}")
        out.append(float(value))
    return tuple(out)


class _Config:
    # ``method``: what files, reports and JSON record (never renamed); ``name``: the user-facing name
    method: ClassVar[str]
    name: ClassVar[str]
    if TYPE_CHECKING:  # every config is a dataclass (what asdict reads); declared for the type checker only
        __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    def to_dict(self) -> dict:
        """``{"method": ..., **fields}``, JSON-serialisable; ``calibration`` as its own dict, omitted when None
        (so that configs without it serialise as they always have)."""
        values = {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()
                  if key != "calibration"}
        calibration = getattr(self, "calibration", None)
        if calibration is not None:
            values["calibration"] = calibration.to_dict()
        return {"method": self.method, **values}

    def _check_calibration(self) -> None:
        """``calibration``: the settings for calibration data, or None (the defaults)."""
        calibration = getattr(self, "calibration", None)
        if calibration is not None and not isinstance(calibration, CalibrationConfig):
            raise ConfigError(f"calibration must be a CalibrationConfig or None, got {type(calibration).__name__}")


@dataclass(frozen=True)
class CBDConfig(_Config):
    """The composite binary code: ``planes`` (J) magnitude bit planes, the GF(2) rank of the mask of large
    entries bounded by ``bottleneck * min(h, w)``. ``granularity="tensor"`` is the paper's per-layer code, with
    ``fallback`` the rule that keeps it or stores the uniform code (``"distortion"``, cbdnet's default, or the
    paper's ``"size"``); ``"channel"`` normalises each output channel (no fallback rule applies)."""

    method: ClassVar[str] = "cbd"
    name: ClassVar[str] = "cbd"
    planes: int = option("planes").default
    bottleneck: float = option("bottleneck").default
    fallback: str | None = None
    granularity: str = option("granularity").method_defaults["cbd"]
    calibration: CalibrationConfig | None = None  # settings for calibration data (None: the defaults)

    def __post_init__(self) -> None:
        self._check_calibration()
        _checked(self, "planes", "bottleneck", "granularity", "fallback")
        if self.granularity == "channel" and self.fallback is not None:
            raise ConfigError("fallback applies to the per-tensor composite code only (granularity='tensor')")
        if self.granularity == "tensor" and self.fallback is None:
            object.__setattr__(self, "fallback", option("fallback").default)

    def to_dict(self) -> dict:
        out = super().to_dict()
        if out["fallback"] is None:
            del out["fallback"]
        return out


@dataclass(frozen=True)
class UniformConfig(_Config):
    """The paper's plain uniform code on every layer: sign + ``planes`` (J) magnitude bits, per tensor."""

    method: ClassVar[str] = "uniform"
    name: ClassVar[str] = "uniform"
    planes: int = option("planes").default
    calibration: CalibrationConfig | None = None  # settings for calibration data (None: the defaults)

    def __post_init__(self) -> None:
        self._check_calibration()
        _checked(self, "planes")


@dataclass(frozen=True)
class RTNConfig(_Config):
    """Symmetric round-to-nearest with ``bits`` bits per weight, sign included (``2^(bits-1) - 1`` levels per
    side), one step per output channel or per tensor. With calibration data (per channel), GPTQ rounds."""

    method: ClassVar[str] = "rtn"
    name: ClassVar[str] = "rtn"
    bits: int = option("bits").default
    granularity: str = option("granularity").method_defaults["rtn"]
    calibration: CalibrationConfig | None = None  # settings for calibration data (None: the defaults)

    def __post_init__(self) -> None:
        self._check_calibration()
        _checked(self, "bits", "granularity")


@dataclass(frozen=True)
class BudgetConfig(_Config):
    """The code of every layer chosen among candidates (per-channel RTN with ``rtn_bits`` bits, per-channel
    composite codes with ``composite_planes`` planes, per-channel grids of ``levels`` levels per side,
    sensitivity-weighted grids of ``weighted_levels`` levels per side at the geometric mean, one per
    ``sensitivity_exponents`` entry: :func:`cbdnet.calib.budget.weighted_steps`) to minimise the predicted loss,
    with the whole file (coded layers, float tensors, header) at most ``target_bits`` bits per compressed weight.
    The loss is predicted from calibration data where it is given, else from the weights' squared error.
    Its name is ``"budget"``; files and reports record it as method ``"target-bits"`` (the CLI flag's name, kept
    for compatibility), and :func:`config_from_dict` reads either."""

    method: ClassVar[str] = "target-bits"  # recorded in files and reports: kept as it is
    name: ClassVar[str] = "budget"
    target_bits: float = option("target-bits").default
    rtn_bits: tuple[int, ...] = RTN_BITS
    composite_planes: tuple[int, ...] = COMPOSITE_PLANES
    levels: tuple[int, ...] = FREE_LEVELS  # per-channel grids of L levels per side (step = max|w| / L)
    # sensitivity-weighted grids (cbdnet.calib.budget.weighted_steps): levels per side at the geometric mean,
    # one candidate per exponent (0: steps follow each channel's range; 1: its loss sensitivity)
    weighted_levels: tuple[float, ...] = WEIGHTED_LEVELS
    sensitivity_exponents: tuple[float, ...] = SENSITIVITY_EXPONENTS
    calibration: CalibrationConfig | None = None  # settings for calibration data (None: the defaults)

    def __post_init__(self) -> None:
        self._check_calibration()
        _checked(self, "target_bits")
        object.__setattr__(self, "rtn_bits", tuple(self.rtn_bits))
        object.__setattr__(self, "composite_planes", tuple(self.composite_planes))
        object.__setattr__(self, "levels", tuple(self.levels))
        for count in self.levels:
            _int_in(count, "levels", 1, (1 << 16) - 1)
        object.__setattr__(self, "weighted_levels", _numbers(self.weighted_levels, "weighted_levels", 0.0, 127.0,
                                                            low_included=False))
        object.__setattr__(self, "sensitivity_exponents", _numbers(self.sensitivity_exponents,
                                                                  "sensitivity_exponents", 0.0, 1.0))
        if self.weighted_levels and not self.sensitivity_exponents:
            raise ConfigError("sensitivity_exponents must not be empty when weighted_levels are given")
        weighted = bool(self.weighted_levels)
        if not self.rtn_bits and not self.composite_planes and not self.levels and not weighted:
            raise ConfigError("BudgetConfig needs at least one candidate code (rtn_bits, composite_planes, levels "
                              "or weighted_levels)")
        for bits in self.rtn_bits:  # the candidates take the values that --bits and --planes take
            option("bits").check(bits, "rtn_bits")
        for planes in self.composite_planes:
            option("planes").check(planes, "composite_planes")


@dataclass(frozen=True)
class CalibrationConfig(_Config):
    """What calibration data is used for. ``images``: use only the first N images (``None``: all).
    ``gptq``: error-compensating rounding for RTN and budgeted codes. ``bias_correction``: remove each layer's
    mean output shift (``"auto"``: kept only where it lowers the calibration loss). ``bn_reestimate``:
    recompute BatchNorm statistics on the calibration images (off by default: from 1,000 images it re-fits
    noisy statistics and raised the loss where measured). ``refit``: after the codes are chosen, round every
    GPTQ-rounded grid again, layer by layer on the compressed model, against the float layer's output
    (:mod:`cbdnet.calib.refit`; on by default where GPTQ runs). ``adaround``: after the codes are chosen, learn
    every grid code's rounding block by block for this many steps per block (:mod:`cbdnet.calib.reconstruct`;
    0, the default: off; 2,000 is the measured setting). ``device``: where the forward and backward passes,
    the statistics and refit's moments run: ``"cpu"`` (default), ``"cuda"``, ``"cuda:N"`` or ``"auto"`` (CUDA
    where available); the candidate codes and GPTQ are computed on the CPU from the statistics. It is not
    recorded in the file (:meth:`to_dict`): the same codes come from either device, within float tolerance."""

    method: ClassVar[str] = "calibration"
    name: ClassVar[str] = "calibration"
    images: int | None = None
    gptq: bool = by_field("gptq").default
    bias_correction: bool | str = by_field("bias_correction").default
    bn_reestimate: bool = by_field("bn_reestimate").default
    adaround: int = by_field("adaround").default
    refit: bool = by_field("refit").default
    device: str = by_field("device").default

    def __post_init__(self) -> None:
        _checked(self, "images", "adaround", "gptq", "bn_reestimate", "refit", "bias_correction", "device")

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["device"]
        return out


def resolve_device(device: str) -> torch.device:
    """The torch device of a :class:`CalibrationConfig` ``device`` string; CUDA asked for where it is not
    available (or an index beyond the GPUs there) is a :class:`ConfigError`."""
    if device == "cpu" or device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if device == "auto":
        return torch.device("cuda")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: CUDA is not available on this machine (torch "
                          f"{torch.__version__}, built with CUDA {torch.version.cuda}); use device 'cpu'", "device")
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ConfigError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)", "device")
    return torch.device(device)


CompressConfig = CBDConfig | UniformConfig | RTNConfig | BudgetConfig
METHODS: dict[str, type[CompressConfig]] = {cls.method: cls
                                            for cls in (CBDConfig, UniformConfig, RTNConfig, BudgetConfig)}


# user-facing names: "budget" for "target-bits"
NAMES: dict[str, type[CompressConfig]] = {cls.name: cls for cls in METHODS.values()}


def _calibration_from_dict(entry) -> CalibrationConfig | None:
    if entry is None or isinstance(entry, CalibrationConfig):
        return entry
    if not isinstance(entry, dict):
        raise ConfigError(f"calibration must be a dict of CalibrationConfig fields, got {type(entry).__name__}")
    unknown = sorted(set(entry) - {f.name for f in fields(CalibrationConfig)})
    if unknown:
        raise ConfigError(f"CalibrationConfig has no field(s) {unknown}")
    return CalibrationConfig(**entry)


def config_from_dict(entry: dict) -> CompressConfig:
    """The config that :meth:`to_dict` wrote (unknown methods or fields are a :class:`ConfigError`); ``method``
    may also be a config's user-facing ``name`` (``"budget"``), and ``calibration`` a dict of
    :class:`CalibrationConfig` fields."""
    method = entry.get("method") if isinstance(entry, dict) else entry
    cls = METHODS.get(method) or NAMES.get(method) if isinstance(method, str) else None
    if cls is None:
        raise ConfigError(f"unknown compression method {method!r}; expected one of {', '.join(METHODS)}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(entry) - names - {"method"})
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {unknown}")
    values = {key: value for key, value in entry.items() if key in names}
    if "calibration" in values:
        values["calibration"] = _calibration_from_dict(values["calibration"])
    return cls(**values)


class OptionError(CBDError, ValueError):
    """Compress options that do not go together (an option the chosen method would ignore)."""


# The ``compress`` option names (CLI flags without ``--``, sweep spec keys) that :func:`config_from_options` reads.
OPTION_NAMES = tuple(opt.name for opt in OPTIONS)


def _given(options: dict, prefix: str, *names: str) -> list[str]:
    return [prefix + name for name in names if options.get(name) is not None]


def _refuse(given: list[str], why: str) -> None:
    if given:
        raise OptionError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply: {why}")


def _method_config(options: dict, prefix: str) -> CompressConfig:
    get = options.get
    target_bits = get("target-bits")
    if target_bits is not None:
        _refuse(_given(options, prefix, "method", "bits", "planes", "bottleneck", "fallback", "granularity"),
                f"{prefix}target-bits chooses every layer's code itself")
        return BudgetConfig(target_bits=target_bits)
    method = option("method").default if get("method") is None else get("method")
    if not isinstance(method, str) or method not in METHOD_CHOICES:  # "" is no method, not the default
        raise OptionError(f"unknown method {method!r}; expected one of {', '.join(METHOD_CHOICES)}")
    if method == "rtn":
        _refuse(_given(options, prefix, "planes", "bottleneck", "fallback"),
                f"{prefix}method rtn takes {prefix}bits and {prefix}granularity")
        return RTNConfig(**_fields(options, "bits", "granularity"))
    _refuse(_given(options, prefix, "bits"), f"{prefix}bits is for {prefix}method rtn; {prefix}method {method} takes "
                                             f"{prefix}planes")
    if method == "uniform":
        _refuse(_given(options, prefix, "bottleneck", "fallback"), f"{prefix}method uniform has no scale search")
        if get("granularity") == "channel":
            raise OptionError(f"{prefix}granularity channel is not available for {prefix}method uniform")
        return UniformConfig(**_fields(options, "planes"))
    return CBDConfig(**_fields(options, "planes", "bottleneck", "fallback", "granularity"))


def _fields(options: dict, *names: str) -> dict:
    """The config fields of the given options (absent or None: left to the config's default)."""
    return {option(name).field: options[name] for name in names if options.get(name) is not None}


def _calibration_config(options: dict, config: CompressConfig, prefix: str) -> CalibrationConfig:
    get = options.get
    if not get("calib"):
        _refuse(_given(options, prefix, "calib-images", "gptq", "bias-correction", "bn-reestimate", "adaround",
                       "refit", "device"),
                f"they need {prefix}calib")
        return CalibrationConfig()
    gptq_used = isinstance(config, BudgetConfig) or isinstance(config, RTNConfig) and config.granularity == "channel"
    if get("gptq") is not None and not gptq_used:
        raise OptionError(f"{prefix}gptq/{prefix}no-gptq apply to {prefix}method rtn per channel and "
                          f"{prefix}target-bits only")
    if get("refit") is not None and not gptq_used:
        raise OptionError(f"{prefix}refit/{prefix}no-refit apply to {prefix}method rtn per channel and "
                          f"{prefix}target-bits only (it re-rounds GPTQ's grids)")
    if get("adaround") and not isinstance(config, (BudgetConfig, RTNConfig)):
        raise OptionError(f"{prefix}adaround applies to {prefix}method rtn and {prefix}target-bits only (their "
                          f"codes are grids)")
    return CalibrationConfig(**_fields(options, "calib-images", "gptq", "bias-correction", "bn-reestimate",
                                       "adaround", "refit", "device"))


def config_from_options(options: dict, prefix: str = "") -> tuple[CompressConfig, CalibrationConfig]:
    """The compress and calibration configs of ``compress`` options, the one mapping that the CLI's flags and a
    sweep spec's point tables share. ``options`` maps names of :data:`OPTION_NAMES` to values (absent or
    ``None``: not given; ``calib`` is truthy when calibration data is used). An option the chosen method would
    ignore is an :class:`OptionError`, a bad value a :class:`ConfigError`; ``prefix`` (``"--"`` for the CLI)
    is put before option names in messages."""
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise OptionError(f"unknown compress option(s) {', '.join(unknown)}")
    config = _method_config(options, prefix)
    return config, _calibration_config(options, config, prefix)
