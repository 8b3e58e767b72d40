"""cbdnet: compress pretrained PyTorch CNNs without retraining by composite binary decomposition.

The public API: the configs (:class:`CBDConfig`, :class:`UniformConfig`, :class:`RTNConfig`,
:class:`BudgetConfig`, :class:`CalibrationConfig`), :func:`compress`, :func:`save`, :func:`load`,
:func:`verify`, the :class:`Report` and the errors. Layers, bottom up: ``codec`` (numpy: GF(2), planes, codes)
-> ``nn`` (modules, walker, report) -> ``calib`` (configs, calibration, budget, the compression engine)
-> ``format`` (the ``.cbd`` file; :func:`compress` is the engine plus the file it makes, held to a whole-file
budget) -> ``zoo`` (architectures, data, metrics) -> ``cli``.

The public names are loaded on first use (module ``__getattr__``): importing :mod:`cbdnet` alone, as the
``cbdnet`` command does before it knows whether it only has to print ``--help`` or ``--version``, does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # the names below, for type checkers and IDEs; at run time they load on first use
    from .api import compress, load, save, verify
    from .calib import BudgetConfig, CalibrationConfig, CBDConfig, RTNConfig, UniformConfig
    from .errors import CBDError, DataError, FormatError, WeightError
    from .nn import Report

# public name -> the submodule that defines it
_LAZY = {**dict.fromkeys(("BudgetConfig", "CalibrationConfig", "CBDConfig", "RTNConfig", "UniformConfig"), ".calib"),
         **dict.fromkeys(("CBDError", "DataError", "FormatError", "WeightError"), ".errors"),
         **dict.fromkeys(("compress", "save", "load", "verify"), ".api"), "Report": ".nn"}

__all__ = ["CBDConfig", "UniformConfig", "RTNConfig", "BudgetConfig", "CalibrationConfig", "compress", "Report",
           "save", "load", "verify", "CBDError", "FormatError", "WeightError", "DataError", "__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cbdnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # the next access is an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
