"""cbdnet: compress pretrained PyTorch CNNs without retraining by composite binary decomposition.

The public API: the configs (:class:`CBDConfig`, :class:`UniformConfig`, :class:`RTNConfig`,
:class:`BudgetConfig`, :class:`CalibrationConfig`), :func:`compress`, :func:`save`, :func:`load`,
:func:`verify`, the :class:`Report` and the errors. Layers, bottom up: ``codec`` (numpy: GF(2), planes, codes)
-> ``nn`` (modules, walker, report) -> ``calib`` (configs, calibration, budget, the compression engine)
-> ``format`` (the ``.cbd`` file; :func:`compress` is the engine plus the file it makes, held to a whole-file
budget) -> ``zoo`` (architectures, data, metrics) -> ``cli``.
"""

__version__ = "0.2.0"

from .api import compress, load, save, verify  # noqa: E402
from .calib import BudgetConfig, CalibrationConfig, CBDConfig, RTNConfig, UniformConfig  # noqa: E402
from .errors import CBDError, DataError, FormatError, WeightError  # noqa: E402
from .nn import Report  # noqa: E402

__all__ = ["CBDConfig", "UniformConfig", "RTNConfig", "BudgetConfig", "CalibrationConfig", "compress", "Report",
           "save", "load", "verify", "CBDError", "FormatError", "WeightError", "DataError", "__version__"]
