"""Floor 5 of cbdnet: architectures and checkpoints (:mod:`.models`, :mod:`.segnet`), data specs
(:mod:`.data`, adapters onto the calibration protocol) and task metrics (:mod:`.metrics`). :func:`load` is
:func:`cbdnet.format.load` with the zoo's architectures, so a file of a registered architecture loads by name."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable

from torch import nn

from ..errors import CBDError
from ..format import cbdfile
from ..nn.state import record
from ..runtime import to_int8
from .inputs import InputSpec, input_spec
from .models import build, check_arch_kwargs, known_archs, load_weights, register

__all__ = ["build", "known_archs", "load_weights", "register", "load", "InputSpec", "input_spec"]


def _build_named(arch: str, kwargs: dict) -> nn.Module:
    check_arch_kwargs(arch, kwargs)  # a file's word: only documented parameters, within bounds
    return build(arch, **kwargs)


RUNTIMES = ("float", "int8")


def load(path: str | os.PathLike, model: nn.Module | None = None, *, runtime: str = "float",
         calibration: Iterable | None = None) -> nn.Module:
    """Load a ``.cbd`` file into ``model`` (an uncompressed skeleton of the same layout), or, when ``model`` is
    None, into a fresh model of the architecture the file names (registered or ``torchvision:NAME``; a user's
    ``module:factory`` is never imported on a file's word). Never unpickles anything.

    ``runtime="float"`` (default): the decoded FP32 model; each layer's code is re-read from ``path`` when it
    is needed (``cbdnet.save``), so the model holds no more memory than the FP32 one. ``runtime="int8"``:
    the stored integer codes run on PyTorch's int8 CPU kernels (:func:`cbdnet.runtime.to_int8`); it needs
    ``calibration`` images (training images) for the activation scales. Its report is
    ``model.cbdnet.int8_report``.
    """
    if runtime not in RUNTIMES:
        raise CBDError(f"unknown runtime {runtime!r}; expected one of: {', '.join(RUNTIMES)}")
    if runtime == "int8" and calibration is None:  # (checked again below, for the type checker)
        raise CBDError("runtime='int8' needs calibration images (training images) to set the activation scales: "
                       "pass calibration=...")
    if runtime == "float":
        return cbdfile.load(path, model, builder=_build_named)
    assert calibration is not None
    loaded = cbdfile.load(path, model, builder=_build_named, keep_codes=True)  # read once, not per layer
    qmodel, report = to_int8(loaded, calibration)
    del loaded
    gc.collect()  # torch.ao's graph objects form reference cycles: free the float model's tensors now
    cbdfile.release_free_memory()  # and give the freed pages (float model, calibration temporaries) back
    record(qmodel, int8_report=report)
    return qmodel
