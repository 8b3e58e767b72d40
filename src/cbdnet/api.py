"""The public API: :func:`compress`, :func:`save`, :func:`load` and :func:`verify` (``cbdnet.compress`` and so on).

This module sits above every floor it calls (:mod:`cbdnet.calib`, :mod:`cbdnet.format`, :mod:`cbdnet.zoo`,
:mod:`cbdnet.runtime`) and below only the CLI. One config per call: the compression config carries its
calibration settings (``RTNConfig(bits=4, calibration=CalibrationConfig(images=500))``) and the calibration
*data* is the third argument::

    model, report = cbdnet.compress(model, cbdnet.BudgetConfig(target_bits=3.0), loader,
                                    arch="torchvision:resnet18")
    cbdnet.save(model, "model.cbd")
    model = cbdnet.load("model.cbd")          # rebuilt from the recorded architecture, no skeleton needed
    assert cbdnet.verify("model.cbd") == []

What cbdnet remembers on a model is one attribute, ``model.cbdnet`` (a :class:`ModelState`).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .calib.configs import BudgetConfig, CalibrationConfig, CBDConfig, CompressConfig, RTNConfig, UniformConfig
from .errors import CBDError
from .format import cbdfile
from .format import fit as _fit
from .nn.report import Report
from .nn.state import ModelState, record, state_of
from .nn.walk import compressible_layers
from .zoo import load as _zoo_load
from .zoo.models import build

__all__ = ["compress", "save", "load", "verify", "check_arch", "ModelState", "FilterFn"]

FilterFn = Callable[[nn.Module, str], bool]
"""``filter_fn(module, fqn) -> bool``: whether to compress the layer ``module`` named ``fqn`` (as torchao's
``quantize_``)."""

_CONFIGS = (CBDConfig, UniformConfig, RTNConfig, BudgetConfig)


def compress(model: nn.Module, config: CompressConfig | None = None, calibration: Iterable[Any] | None = None, *,
             filter_fn: FilterFn | None = None, skip: Iterable[str] = (), arch: str | None = None,
             arch_kwargs: dict[str, Any] | None = None, progress: bool = True, workers: int | None = None,
             input_shape: tuple[int, ...] | None = None, float32: bool = False, fold_bn: bool = True,
             calibration_config: CalibrationConfig | None = None) -> tuple[nn.Module, Report]:
    """Compress every Conv2d/ConvTranspose2d/Linear layer of ``model`` in place.

    Args:
        model: The float model (it is changed in place and returned).
        config: :class:`~cbdnet.CBDConfig` (default: the paper's code, J=5, bottleneck 0.3),
            :class:`~cbdnet.UniformConfig`, :class:`~cbdnet.RTNConfig` or :class:`~cbdnet.BudgetConfig`;
            its ``calibration`` field holds the settings for calibration data (None: the defaults).
        calibration: Calibration data: any iterable of image batches or ``(images, labels)`` pairs (a
            ``DataLoader``, a list of tensors; training images, never test images). Used for GPTQ rounding,
            the budget's loss estimates, bias correction and the optional re-estimation and re-rounding.
        filter_fn: ``filter_fn(module, fqn) -> bool``, called for each compressible layer: False keeps the
            layer in float (as torchao's ``quantize_``). Combines with ``skip``.
        skip: Names of layers to keep in float (each must be a layer of the model).
        arch: The architecture to record so that :func:`load` rebuilds the model without a skeleton: a
            registered name (``cbdnet.zoo.known_archs()``) or ``"torchvision:NAME"``. ``"module.path:factory"``
            is recorded too, but :func:`load` never imports it on the file's word. It is checked now: the
            architecture, built with ``arch_kwargs`` on the meta device, must have the model's tensors.
        arch_kwargs: Keyword arguments of the architecture's builder (e.g. ``{"num_classes": 10}``).
        progress: Show a progress bar on a terminal.
        workers: Layers encoded at once, in threads; the result does not depend on it.
        input_shape: Adds per-sample operation counts to the report (e.g. ``(1, 3, 224, 224)``).
        float32: Keep the float tensors the file stores (BatchNorm, biases) at their own precision instead of
            float16 where float16 holds them exactly.
        fold_bn: Fold each BatchNorm that follows a layer coded with per-channel steps into those steps.
        calibration_config: Deprecated: pass the settings as ``config.calibration``. Still accepted for one
            release, with a ``DeprecationWarning``.

    Returns:
        ``(model, report)``: the compressed model and its :class:`~cbdnet.Report`; ``report.file_bytes`` is
        what :func:`save` will write, and under a :class:`~cbdnet.BudgetConfig` the whole file is at most
        ``target_bits`` bits per compressed weight.

    Raises:
        CBDError: A bad config, layer name, architecture or calibration data (one line, naming the argument).
    """
    config = _config(config)
    settings = _settings(config, calibration_config)
    arch_kwargs = dict(arch_kwargs or {})
    if arch is not None:
        check_arch(model, arch, arch_kwargs)
    skip = _skip(model, skip, filter_fn)
    if config.calibration is not None:  # the engine below takes the settings beside the config
        config = dataclasses.replace(config, calibration=None)
    model, report = _fit.compress(model, config, calibration=calibration, calibration_config=settings, skip=skip,
                                  progress=progress, workers=workers, input_shape=input_shape, float32=float32,
                                  fold_bn=fold_bn)
    if arch is not None:
        record(model, arch=arch, arch_kwargs=arch_kwargs)
    return model, report


def save(model: nn.Module, path: str | os.PathLike[str], *, arch: str | None = None,
         arch_kwargs: dict[str, Any] | None = None, extra: dict[str, Any] | None = None, overwrite: bool = True) -> int:
    """Write a compressed model to a ``.cbd`` file, atomically; saving is lossless.

    Args:
        model: A model from :func:`compress` or :func:`load`.
        path: The file to write. An existing regular file is replaced only with ``overwrite``; a symbolic
            link, device, FIFO or directory never.
        arch: The architecture to record (default: ``model.cbdnet.arch``, set by :func:`compress`,
            :func:`load` and the zoo's builders), checked against the model as in :func:`compress`.
        arch_kwargs: Keyword arguments of the architecture's builder.
        extra: What the file records beside the codes (default: the config :func:`compress` recorded).
        overwrite: Replace an existing file.

    Returns:
        The file's size in bytes.
    """
    if arch is not None:
        arch_kwargs = dict(arch_kwargs or {})
        check_arch(model, arch, arch_kwargs)
    return cbdfile.save(model, path, arch=arch, arch_kwargs=arch_kwargs, extra=extra, overwrite=overwrite)


def load(path: str | os.PathLike[str], model: nn.Module | None = None, *, runtime: str = "float",
         calibration: Iterable[Any] | None = None) -> nn.Module:
    """Load a ``.cbd`` file; never unpickles anything and never imports code the file names.

    Args:
        path: The ``.cbd`` file.
        model: An uncompressed skeleton of the same layout, or None to build the architecture the file records
            (a registered name or ``torchvision:NAME``; a user's ``module:factory`` needs a skeleton).
        runtime: ``"float"``: the decoded model (each layer's code is re-read from ``path`` when needed, so the
            model holds no more memory than the FP32 one). ``"int8"``: the stored integer codes on PyTorch's
            int8 CPU kernels; its report is ``model.cbdnet.int8_report``.
        calibration: Training images for the int8 runtime's activation scales (needed for ``"int8"``).

    Returns:
        The loaded model, in eval mode, with ``model.cbdnet`` (:class:`ModelState`) filled from the file.
    """
    loaded = _zoo_load(path, model, runtime=runtime, calibration=calibration)
    state_of(loaded)  # present even where the file recorded nothing to fill it with
    return loaded


def verify(path: str | os.PathLike[str]) -> list[str]:
    """Re-check a ``.cbd`` file: its checksum and every factored plane, bit for bit.

    Returns:
        The problems found, one line each; empty when the file is sound.
    """
    return cbdfile.verify(path)


def check_arch(model: nn.Module, arch: str, arch_kwargs: dict[str, Any]) -> None:
    """Check that ``arch`` built with ``arch_kwargs`` has exactly ``model``'s state-dict keys and shapes.

    Built on the meta device (no memory); ``module.path:factory`` is imported, since the caller named it.

    Raises:
        CBDError: The architecture is unknown, cannot be built, or does not fit the model.
    """
    if not isinstance(arch, str) or not arch:
        raise CBDError(f"arch must be a registered name, torchvision:NAME or module.path:factory, got {arch!r}")
    try:
        with torch.device("meta"):
            skeleton = build(arch, allow_import=True, **arch_kwargs)
    except CBDError:
        raise
    except Exception as exc:
        raise CBDError(f"cannot build {arch} with arch_kwargs {arch_kwargs}: {str(exc)[:200]}") from None
    have = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    want = {key: tuple(value.shape) for key, value in skeleton.state_dict().items()}
    if have != want:
        problems = [f"{label} {', '.join(keys[:4])}{' …' if len(keys) > 4 else ''}" for label, keys in (
            ("missing", sorted(set(want) - set(have))), ("unexpected", sorted(set(have) - set(want))),
            ("wrong shape", sorted(k for k in set(have) & set(want) if have[k] != want[k]))) if keys]
        raise CBDError(f"the model does not fit arch {arch} {arch_kwargs or ''}: " + "; ".join(problems))


def _config(config: object) -> CompressConfig:
    if config is None:
        return CBDConfig()
    if not isinstance(config, _CONFIGS):
        raise CBDError(f"config must be a CBDConfig, UniformConfig, RTNConfig or BudgetConfig, got "
                       f"{type(config).__name__}")
    return config


def _settings(config: CompressConfig, calibration_config: CalibrationConfig | None) -> CalibrationConfig | None:
    """The calibration settings of the call: ``config.calibration``, or the deprecated ``calibration_config``."""
    if calibration_config is None:
        return config.calibration
    warnings.warn("compress(..., calibration_config=...) is deprecated and will be removed after one release: pass "
                  "the settings in the config, e.g. RTNConfig(bits=4, calibration=CalibrationConfig(...))",
                  DeprecationWarning, stacklevel=3)
    if config.calibration is not None:
        raise CBDError("calibration settings given twice (config.calibration and calibration_config): pass them "
                       "in the config only")
    if not isinstance(calibration_config, CalibrationConfig):
        raise CBDError(f"calibration_config must be a CalibrationConfig, got {type(calibration_config).__name__}")
    return calibration_config


def _skip(model: nn.Module, skip: Iterable[str], filter_fn: FilterFn | None) -> list[str]:
    """``skip`` plus the compressible layers ``filter_fn`` turns down."""
    if isinstance(skip, str):
        raise CBDError(f"skip must be a list of layer names, got the string {skip!r}")
    skip = list(skip)
    if filter_fn is None:
        return skip
    if not callable(filter_fn):
        raise CBDError(f"filter_fn must be callable as filter_fn(module, fqn) -> bool, got {type(filter_fn).__name__}")
    return skip + [name for name, module in compressible_layers(model, skip) if not filter_fn(module, name)]
