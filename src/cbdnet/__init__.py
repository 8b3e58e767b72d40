"""cbdnet: compress pretrained PyTorch CNNs without retraining by composite binary decomposition."""

__version__ = "0.1.0"

from .compress import Report, compress  # noqa: E402
from .errors import CBDError, DataError, FormatError, WeightError  # noqa: E402
from .io import load, save, verify  # noqa: E402

__all__ = ["compress", "Report", "save", "load", "verify", "CBDError", "FormatError", "WeightError", "DataError",
           "__version__"]
