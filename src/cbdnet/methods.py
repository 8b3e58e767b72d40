"""The compression methods behind ``cbdnet compress`` flags: which encoder each layer gets, and the
corrections applied to the compressed model before it is saved.

- ``--method cbd`` (default, the paper): ``--granularity tensor`` (default) is the original per-layer code;
  ``--granularity channel`` is the composite code with one step per output channel (:mod:`cbdnet.grid`).
- ``--method rtn --bits K --granularity channel|tensor``: the round-to-nearest baseline.
- ``--method uniform``: the plain J-bit code of the core engine.
"""

from __future__ import annotations

import argparse

import numpy as np
from torch import nn

from .codec import LayerCode, _check_finite
from .errors import CBDError
from .grid import GRANULARITIES, encode_composite_grouped, encode_rtn

__all__ = ["add_method_args", "build_encoder", "finish_model"]


def add_method_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bits", type=int, default=4,
                        help="--method rtn: bits per weight K, sign included (2^(K-1)-1 levels per side; default 4)")
    parser.add_argument("--granularity", choices=GRANULARITIES, default=None,
                        help="one scale per output channel or per tensor (default: channel for rtn, tensor "
                             "for cbd, i.e. the paper's code)")


def _granularity(args) -> str:
    if args.granularity is not None:
        return args.granularity
    return "channel" if args.method == "rtn" else "tensor"


def build_encoder(args, model: nn.Module):
    """``(encoder or None, config entries)`` for the parsed ``compress`` arguments."""
    granularity = _granularity(args)
    if args.method == "rtn":
        if not 2 <= args.bits <= 17:
            raise CBDError(f"--bits must be in 2..17 (sign included), got {args.bits}")

        def rtn(name: str, weight: np.ndarray) -> LayerCode:
            _check_finite(weight, name)
            return encode_rtn(weight, args.bits, granularity)

        return rtn, {"method": "rtn", "bits": args.bits, "granularity": granularity}
    if args.method == "cbd" and granularity == "channel":
        def composite(name: str, weight: np.ndarray) -> LayerCode:
            _check_finite(weight, name)
            return encode_composite_grouped(weight, args.planes, args.bottleneck, granularity)

        return composite, {"method": "cbd", "granularity": granularity}
    if args.granularity == "channel":
        raise CBDError(f"--granularity channel is not available for --method {args.method}")
    return None, {"method": args.method, "granularity": granularity}


def finish_model(args, model: nn.Module, report) -> None:
    """Corrections applied to the compressed model before it is saved (none yet)."""
