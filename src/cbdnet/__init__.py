"""cbdnet: compress pretrained PyTorch CNNs without retraining by composite binary decomposition.

The public API: the configs (:class:`CBDConfig`, :class:`UniformConfig`, :class:`RTNConfig`,
:class:`BudgetConfig`, :class:`CalibrationConfig`), :func:`compress`, :func:`save`, :func:`load`,
:func:`verify`, the :class:`Report` and the errors. Layers, bottom up: ``codec`` (numpy: GF(2), planes, codes)
-> ``nn`` (modules, walker, report) -> ``calib`` (configs, calibration, budget, the compression engine)
-> ``format`` (the ``.cbd`` file; :func:`compress` is the engine plus the file it makes, held to a whole-file
budget) -> ``zoo`` (architectures, data, metrics) -> ``cli``.
"""

from ._version import __version__
from .calib import BudgetConfig, CalibrationConfig, CBDConfig, RTNConfig, UniformConfig
from .errors import CBDError, DataError, FormatError, WeightError
from .format import compress, save, verify
from .nn import Report
from .zoo import load

__all__ = ["CBDConfig", "UniformConfig", "RTNConfig", "BudgetConfig", "CalibrationConfig", "compress", "Report",
           "save", "load", "verify", "CBDError", "FormatError", "WeightError", "DataError", "__version__"]
