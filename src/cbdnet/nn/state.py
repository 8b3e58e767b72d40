"""What cbdnet remembers on a model: one documented attribute, ``model.cbdnet`` (a :class:`ModelState`).

:func:`cbdnet.compress`, :func:`cbdnet.load` and the zoo's builders fill it; :func:`cbdnet.save` records it in
the file, so that a model loaded and saved again writes the same bytes.

Before 1.0 the same facts lived in six separate attributes (``model.cbdnet_config``, ``cbdnet_arch``,
``cbdnet_arch_kwargs``, ``cbdnet_weights_sha256``, ``cbdnet_weights_source`` and ``cbdnet_int8_report``).
They are deprecated: :func:`record` still sets them beside ``model.cbdnet`` for one release, and :func:`recorded`
still reads one that code set by the old name only; read and write ``model.cbdnet`` instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

__all__ = ["ATTRIBUTE", "ModelState", "state_of", "record", "recorded"]

ATTRIBUTE = "cbdnet"
_LEGACY_PREFIX = "cbdnet_"  # the deprecated per-field attributes: model.cbdnet_<field>


@dataclass
class ModelState:
    """cbdnet's state on a model (``model.cbdnet``).

    Attributes:
        config: The compression config as :func:`cbdnet.compress` recorded it (``config.to_dict()`` plus
            ``skip``, ``fold_bn``, ``float32`` and the calibration settings used); what the file records.
        arch: The architecture :func:`cbdnet.load` rebuilds without a skeleton: a registered name
            (``"cifar-resnet20"``), ``"torchvision:NAME"`` or ``"module.path:factory"`` (the latter is never
            imported on a file's word). ``None``: not known, a skeleton is needed to load the file.
        arch_kwargs: Keyword arguments of the architecture's builder (e.g. ``{"num_classes": 10}``).
        weights_sha256: SHA-256 of the checkpoint the weights came from (:func:`cbdnet.zoo.load_weights`).
        weights_source: Where the weights came from, in words (e.g. ``"torchvision IMAGENET1K_V1"``).
        int8_report: The :class:`cbdnet.runtime.int8.Int8Report` of a model loaded with ``runtime="int8"``.
    """

    config: dict | None = None
    arch: str | None = None
    arch_kwargs: dict = field(default_factory=dict)
    weights_sha256: str | None = None
    weights_source: str | None = None
    int8_report: Any = None


_FIELDS = tuple(f.name for f in fields(ModelState))


def state_of(model: nn.Module) -> ModelState:
    """``model.cbdnet``, created (empty, plus whatever the deprecated attributes hold) where the model has none."""
    state = model.__dict__.get(ATTRIBUTE)
    if not isinstance(state, ModelState):
        state = ModelState(**{name: getattr(model, _LEGACY_PREFIX + name) for name in _FIELDS
                              if getattr(model, _LEGACY_PREFIX + name, None) is not None})
        setattr(model, ATTRIBUTE, state)
    return state


def record(model: nn.Module, **values: Any) -> ModelState:
    """Set fields of ``model.cbdnet`` (and, for one release, the deprecated ``model.cbdnet_<field>``)."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise TypeError(f"ModelState has no field(s) {unknown}")
    state = state_of(model)
    for name, value in values.items():
        setattr(state, name, value)
        setattr(model, _LEGACY_PREFIX + name, value)
    return state


def recorded(model: nn.Module, name: str, default: Any = None) -> Any:
    """The field ``name`` of ``model.cbdnet``; where that is unset, the deprecated ``model.cbdnet_<name>`` that
    older code may still set; else ``default``."""
    if name not in _FIELDS:
        raise TypeError(f"ModelState has no field {name!r}")
    state = model.__dict__.get(ATTRIBUTE)
    value = getattr(state, name) if isinstance(state, ModelState) else None
    if value is None or value == {} and name == "arch_kwargs":
        value = getattr(model, _LEGACY_PREFIX + name, None)
    return default if value is None else value
