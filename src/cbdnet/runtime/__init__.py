"""Floor 4 of cbdnet (beside :mod:`cbdnet.format`, below :mod:`cbdnet.zoo`): runtimes for a compressed model.
:mod:`.int8` runs the stored integer codes on PyTorch's int8 CPU kernels (:func:`to_int8`)."""

from .int8 import Int8Layer, Int8Report, model_bytes, to_int8

__all__ = ["to_int8", "Int8Report", "Int8Layer", "model_bytes"]
