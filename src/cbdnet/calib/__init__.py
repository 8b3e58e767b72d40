"""Floor 3 of cbdnet: the configs (:mod:`.configs`), calibration data (:mod:`.batches`), statistics, GPTQ and
corrections (:mod:`.stats`), the per-layer budget (:mod:`.budget`) and the one entry point that runs them all,
:func:`compress` (:mod:`.pipeline`)."""

from .batches import CalibrationSet, as_calibration_set
from .configs import BudgetConfig, CalibrationConfig, CBDConfig, RTNConfig, UniformConfig, config_from_dict
from .pipeline import compress

__all__ = ["CBDConfig", "UniformConfig", "RTNConfig", "BudgetConfig", "CalibrationConfig", "config_from_dict",
           "CalibrationSet", "as_calibration_set", "compress"]
