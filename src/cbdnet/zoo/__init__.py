"""Floor 5 of cbdnet: architectures and checkpoints (:mod:`.models`, :mod:`.segnet`), data specs
(:mod:`.data`, adapters onto the calibration protocol) and task metrics (:mod:`.metrics`). :func:`load` is
:func:`cbdnet.format.load` with the zoo's architectures, so a file of a registered architecture loads by name."""

from __future__ import annotations

import os

from torch import nn

from ..format import cbdfile
from .models import build, known_archs, load_weights, register

__all__ = ["build", "known_archs", "load_weights", "register", "load"]


def _build_named(arch: str, kwargs: dict) -> nn.Module:
    return build(arch, **kwargs)


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load a ``.cbd`` file into ``model`` (an uncompressed skeleton of the same layout), or, when ``model`` is
    None, into a fresh model of the architecture the file names (registered or ``torchvision:NAME``; a user's
    ``module:factory`` is never imported on a file's word). Never unpickles anything."""
    return cbdfile.load(path, model, builder=_build_named)
