""":func:`cbdnet.calib.compress` plus the file it will make: the engine under :func:`cbdnet.compress` (which is
:func:`cbdnet.api.compress`, the call users make) and under the CLI and the sweep.

The calibration layer chooses codes without knowing the file's exact header (it sets aside an allowance, see
:func:`cbdnet.calib.pipeline.header_allowance`). Here, one floor up, the model is encoded as :func:`save` will
write it, so the report's ``file_bytes``/``file_bits_per_weight`` are the file's, and under a
:class:`~cbdnet.calib.BudgetConfig` the whole file is held to ``target_bits``: where the encoded file
overshoots (the header was larger than its allowance), the model is restored and compressed again with the
target lowered by the excess.
"""

from __future__ import annotations

import copy
import dataclasses

from torch import nn

from ..calib import BudgetConfig
from ..calib import compress as compress_layers_of
from ..calib.pipeline import CompressCache
from ..errors import CBDError
from ..nn import Report
from .cbdfile import encode_file

__all__ = ["compress", "compress_encoded", "MAX_BUDGET_TRIES"]

MAX_BUDGET_TRIES = 3


def compress(model: nn.Module, config=None, **options) -> tuple[nn.Module, Report]:
    """Compress ``model`` in place (see :func:`cbdnet.calib.compress` for ``config`` and ``options``); the
    report's ``file_bytes`` is the size :func:`cbdnet.save` will write. Under a ``BudgetConfig`` the whole file
    is at most ``target_bits`` bits per compressed weight, header, float tensors and checksum included
    (the model is copied once, to restore it if a second try is needed). To write the file too, use
    :func:`compress_encoded`: it returns the bytes this call encodes to measure the file, so they need not be
    encoded again."""
    model, report, _ = compress_encoded(model, config, **options)
    return model, report


def compress_encoded(model: nn.Module, config=None, **options) -> tuple[nn.Module, Report, bytes]:
    """:func:`compress`, plus the ``.cbd`` file's bytes: exactly what :func:`cbdnet.save` would write for the
    returned model (``encode_file(model)``), encoded once. ``report.file_bytes`` is their length."""
    if not isinstance(config, BudgetConfig):
        model, report = compress_layers_of(model, config, **options)
        return model, report, _measured(model, report)
    pristine = copy.deepcopy(model)
    target = config
    cache = CompressCache()  # a retry reuses the statistics and candidates of the first try
    try:
        for attempt in range(MAX_BUDGET_TRIES):
            if attempt:
                model.__dict__.update(copy.deepcopy(pristine).__dict__)  # the same object, back to its original state
            model, report = compress_layers_of(model, target, cache=cache, **options)
            encoded = _measured(model, report)
            excess = 8 * len(encoded) - config.target_bits * report.params
            report.extra["budget_retries"] = attempt
            if excess <= 0:
                return model, report, encoded
            # at least 64 bytes lower (on a small model 1e-3 bits/weight is less than the longer target the header
            # records), four times more on each further try: a choice that the first lowering did not move must move
            margin = max(1e-3, 512 / report.params) * 4 ** attempt
            target = dataclasses.replace(target, target_bits=target.target_bits - excess / report.params - margin)
    finally:
        cache.close()
    raise CBDError(f"target_bits {config.target_bits}: the file is {report.file_bits_per_weight:.4f} bits per "
                   f"weight after {MAX_BUDGET_TRIES} tries")


def _measured(model: nn.Module, report: Report) -> bytes:
    """The model's file bytes; sets ``report.file_bytes`` to their length."""
    encoded = encode_file(model)
    report.file_bytes = len(encoded)
    return encoded
