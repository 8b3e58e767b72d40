"""GPTQ written out plainly, as a reference the solver's tests compare with: act order, column by column in
float64, from the textbook factor (Cholesky of ``H``, its inverse, Cholesky again)."""

from __future__ import annotations

import numpy as np
import torch


def gptq_reference(weight, steps, mag_bits, hessian, damp=0.01):
    """The levels of one grid (``steps`` per output row, ``mag_bits`` magnitude bits) under ``hessian``, in the
    weight's shape."""
    w = torch.from_numpy(weight.astype(np.float64).reshape(weight.shape[0], -1).copy())
    step = torch.from_numpy(np.asarray(steps, np.float64).reshape(-1))
    h = hessian.clone()
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(torch.diag(h), descending=True)
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    levels = torch.zeros_like(w)
    for col in range(w.shape[1]):
        levels[:, col] = torch.clamp(torch.round(w[:, col] / step), -(2**mag_bits - 1), 2**mag_bits - 1)
        error = (w[:, col] - levels[:, col] * step) / upper[col, col]
        w[:, col + 1:] -= error[:, None] * upper[col, col + 1:][None, :]
    restored = torch.empty_like(levels)
    restored[:, order] = levels
    return restored.numpy().astype(np.int64).reshape(weight.shape)
