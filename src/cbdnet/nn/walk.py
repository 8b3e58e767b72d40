"""The model walker: swap every Conv2d/ConvTranspose2d/Linear for its CBD twin, coded by a per-layer encoder,
and report what each layer costs (:func:`compress_layers`). Bits are counted exactly as the file stores them.

Which code each layer gets is the caller's choice (an ``encoder(name, weight) -> LayerCode``); the configs and
the calibrated methods that make encoders live in :mod:`cbdnet.calib`.
"""

from __future__ import annotations

import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..codec import LayerCode
from ..errors import CBDError
from ..fileio import parse_positive_int
from .modules import CBDLayer, CBDModule, coded_key, coded_weight, from_module, is_compressible
from .ops import output_positions
from .report import LayerReport, Report, layer_report

__all__ = ["compress_layers", "compressible_layers", "coded_keys", "float_state", "float_layers",
           "default_workers", "tied_weights", "owns_its_code", "Encoder"]

Encoder = Callable[[str, np.ndarray], LayerCode]


def compressible_layers(model: nn.Module, skip: Iterable[str] = ()) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs that compress: every Conv2d, ConvTranspose2d, Linear and packed
    MultiheadAttention (its ``in_proj_weight``) not named in ``skip``."""
    skipped = set(skip)
    return [(name, module) for name, module in model.named_modules()
            if is_compressible(module) and not isinstance(module, CBDModule) and name not in skipped]


def owns_its_code(model: nn.Module) -> Callable[[nn.Module], bool]:
    """A test of whether a module of ``model`` carries a code no other coded module shares (a tied weight is
    one code, coded once: changing it per layer would untie it)."""
    users = Counter(id(coded_weight(m)) for m in model.modules() if getattr(m, "code", None) is not None)
    return lambda module: getattr(module, "code", None) is not None and users[id(coded_weight(module))] == 1


def tied_weights(layers: list[tuple[str, nn.Module]]) -> dict[str, str]:
    """Layer name -> the earlier layer whose weight Parameter it shares (tied weights are coded once)."""
    first: dict[int, str] = {}
    tied = {}
    for name, module in layers:
        key = id(coded_weight(module))
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return tied


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


_FLOAT_REASONS: tuple[tuple[type, str], ...] = (
    (nn.modules.batchnorm._NormBase, "normalisation layer: per-channel affine/statistics, kept in float"),
    (nn.GroupNorm, "normalisation layer: per-channel affine, kept in float"),
    (nn.LayerNorm, "normalisation layer: per-channel affine, kept in float"),
    (nn.modules.conv._ConvTransposeNd, "1-D/3-D transposed convolution: no CBD twin, kept in float"),
    (nn.modules.conv._ConvNd, "1-D/3-D convolution: no CBD twin, kept in float"),
    (nn.Embedding, "embedding table: not a Conv2d/Linear, kept in float"),
    (nn.MultiheadAttention, "separate q/k/v projection weights (kdim/vdim differ from embed_dim): kept in float"),
)


def float_layers(model: nn.Module, skip: Iterable[str] = ()) -> list[dict]:
    """Every module that holds parameters of its own which are not a CBD code (biases of CBD layers aside):
    its name, type, parameter names and count, and why it stays float."""
    skipped = set(skip)
    rows = []
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if isinstance(module, CBDModule):
            continue
        if not own:
            continue
        if name in skipped:
            reason = "skipped on request (skip)"
        else:
            reason = next((text for kind, text in _FLOAT_REASONS if isinstance(module, kind)),
                          f"{type(module).__name__} parameters ({', '.join(own)}): not a Conv2d/Linear weight, "
                          "kept in float")
        rows.append({"name": name, "type": type(module).__name__, "tensors": sorted(own),
                     "params": sum(p.numel() for p in own.values()), "reason": reason})
    return rows


def float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every state-dict tensor the file stores as-is: all but the weights of CBD modules."""
    coded = coded_keys(model)
    return {key: value for key, value in model.state_dict().items() if key not in coded}


def coded_keys(model: nn.Module) -> set[str]:
    """The state-dict keys of every CBD module's coded weight, under every name a shared module has."""
    return {coded_key(name, m) for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, CBDModule)}


def default_workers() -> int:
    """Layers encoded at once: ``CBDNET_WORKERS`` (1..256) if set, else 1 (two threads showed no gain on a loaded
    2-core machine and double the peak memory of the largest layers)."""
    value = os.environ.get("CBDNET_WORKERS", "").strip()
    return parse_positive_int(value, name="CBDNET_WORKERS", high=256) if value else 1


def check_skip(model: nn.Module, skip: Iterable[str]) -> list[str]:
    """``skip`` as a sorted list, each name checked to be a compressible layer of ``model``."""
    names = {name for name, module in model.named_modules() if is_compressible(module)}
    unknown = sorted(set(skip) - names)
    if unknown:
        raise CBDError(f"skip names {unknown[:5]}, which {'is' if len(unknown) == 1 else 'are'} not a "
                       f"Conv2d/ConvTranspose2d/Linear/MultiheadAttention layer of the model")
    return sorted(set(skip))


def _encode_layer(name: str, module: nn.Module, encoder: Encoder, positions: int | None
                  ) -> tuple[LayerCode, LayerReport]:
    start = time.perf_counter()
    original = coded_weight(module).detach().to(device="cpu", dtype=torch.float32).numpy()
    code = encoder(name, original)
    return code, layer_report(name, module, code, original, time.perf_counter() - start, positions)


def _finish(model: nn.Module, report: Report, bar, name: str, module: nn.Module,
            job: Future[tuple[LayerCode, LayerReport]], twins: dict[str, CBDLayer]) -> None:
    code, layer = job.result()
    twins[name] = from_module(module, code)
    _set_submodule(model, name, twins[name])
    report.layers.append(layer)
    bar.set_postfix_str(name)
    bar.update(1)


def compress_layers(model: nn.Module, encoder: Encoder, *, skip: Iterable[str] = (), config: dict | None = None,
                    progress: bool = True, workers: int | None = None, input_shape: tuple[int, ...] | None = None
                    ) -> tuple[nn.Module, Report]:
    """Swap every Conv2d/ConvTranspose2d/Linear of ``model`` not named in ``skip`` for its CBD twin carrying
    ``encoder(name, weight)``, in place; returns ``(model, report)``.

    ``workers`` layers are encoded at once in threads (the GF(2) kernels release the GIL; default
    :func:`default_workers`); the result does not depend on it, layers are swapped in model order. A weight
    Parameter shared by several layers (tied weights) is coded once, and its twins share the decoded weight.
    With ``input_shape`` (e.g. ``(1, 3, 224, 224)``) the report also counts operations per sample
    (see :mod:`cbdnet.nn.ops`).
    """
    start = time.perf_counter()
    skip = check_skip(model, skip)
    report = Report(config=dict(config or {}))
    layers = compressible_layers(model, skip)
    tied = tied_weights(layers)
    positions = output_positions(model, input_shape) if input_shape is not None else {}
    workers = default_workers() if workers is None else max(1, int(workers))
    coded = [(name, module) for name, module in layers if name not in tied]
    bar = tqdm(total=len(coded), desc="compress", unit="layer", disable=None if progress else True, leave=False)
    twins: dict[str, CBDLayer] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # at most `workers` layers in flight, so a failing layer stops the run without encoding the rest
        jobs: deque[tuple[str, nn.Module, Future[tuple[LayerCode, LayerReport]]]] = deque()
        for name, module in coded:
            jobs.append((name, module, pool.submit(_encode_layer, name, module, encoder, positions.get(name))))
            if len(jobs) >= workers:
                _finish(model, report, bar, *jobs.popleft(), twins)
        while jobs:
            _finish(model, report, bar, *jobs.popleft(), twins)
    bar.close()
    for name, owner in tied.items():  # same code, same decoded Parameter: still tied, counted once
        module = model.get_submodule(name)
        code = twins[owner].code
        assert code is not None
        twin = from_module(module, code)
        twin.share_weight(twins[owner])
        _set_submodule(model, name, twin)
    report.tied = dict(tied)
    report.float_tensors = {key: value.numel() * value.element_size() * 8
                            for key, value in float_state(model).items()}
    report.float_layers = float_layers(model, skip)
    report.seconds = time.perf_counter() - start
    return model, report
