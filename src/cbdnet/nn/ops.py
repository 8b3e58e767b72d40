"""Honest operation counts: what a deployment of a compressed layer actually computes.

A factored plane ``P = B @ C (mod 2)`` saves *storage*, not arithmetic on real-valued activations: the sums
in ``B @ C`` are taken mod 2, and ``(B @ C mod 2) x`` is not ``B (C x)`` for a float vector ``x`` (the parity
of a sum of ones does not distribute over real numbers). So a float activation has to meet the decoded plane,
and the counts below are those of the two ways to run a decoded layer:

- **dense**: decode the weight once, run the ordinary conv/linear: ``weights x output positions``
  multiply-adds per sample (``macs_per_position = h * w``, exactly the FP32 layer's count);
- **bit-serial**: keep the 0/1 planes and add (or subtract, by sign) the activation of every set bit,
  then scale each plane's partial sum once: ``sum over planes of popcount(plane)`` signed additions and
  ``planes x output channels`` multiplications per output position.

``output_positions`` is the number of output pixels per sample for a conv (``out_h * out_w``; 1 for a
Linear on a flat input), found by a forward pass on a zero batch of the given input shape.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..codec import LayerCode
from .modules import is_compressible

__all__ = ["plane_popcounts", "output_positions", "layer_ops"]


def plane_popcounts(code: LayerCode) -> list[int]:
    """The number of 1s in each stored plane (factored planes are decoded to count them)."""
    h, w = code.matrix_shape
    counts = []
    for plane in code.planes:
        if plane.storage == "packed":
            counts.append(int(np.bitwise_count(plane.tensors["bits"]).sum()))
        else:
            counts.append(int(np.count_nonzero(plane.decode(h, w))))
    return counts


def output_positions(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Output positions per sample of every Conv2d/Linear (by module name), from one forward pass of zeros
    shaped ``input_shape`` (batch included; counts are per sample). A ConvTranspose2d counts its *input*
    positions: each one meets the whole ``[in, out, kh, kw]`` weight once, as an output position of a conv does."""
    positions: dict[str, int] = {}
    hooks = []

    def recorder(name: str):
        def hook(module, inputs, output):
            if isinstance(module, nn.MultiheadAttention):  # each query token meets the packed q/k/v weight once
                if inputs and inputs[0].dim() == 3:
                    query = inputs[0] if module.batch_first else inputs[0].transpose(0, 1)
                    positions[name] = int(query[0].numel() // module.embed_dim)
                return
            if isinstance(module, nn.ConvTranspose2d):
                output, channels = inputs[0], module.in_channels
            else:
                channels = module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
            per_sample = output[0] if output.dim() > 1 else output
            positions[name] = int(per_sample.numel() // channels)
        return hook

    for name, module in model.named_modules():
        if is_compressible(module):
            hooks.append(module.register_forward_hook(recorder(name)))
    try:
        parameter = next(model.parameters(), None)
        dtype = parameter.dtype if parameter is not None else torch.float32
        device = parameter.device if parameter is not None else "cpu"
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_shape, dtype=dtype, device=device))
        model.train(was_training)
    finally:
        for hook in hooks:
            hook.remove()
    return positions


def layer_ops(code: LayerCode, popcounts: list[int], positions: int | None) -> dict:
    """Per-position and (when ``positions`` is known) per-sample operation counts of one layer."""
    out_channels = int(code.shape[0])
    per_position = {
        "macs_per_position": code.numel,
        "bitserial_adds_per_position": int(sum(popcounts)),
        "bitserial_mults_per_position": len(code.planes) * out_channels,
    }
    totals = {"output_positions": positions, "dense_macs": None, "bitserial_adds": None, "bitserial_mults": None}
    if positions is not None:
        totals.update(dense_macs=code.numel * positions,
                      bitserial_adds=per_position["bitserial_adds_per_position"] * positions,
                      bitserial_mults=per_position["bitserial_mults_per_position"] * positions)
    return {**per_position, **totals}
