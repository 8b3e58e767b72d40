"""Run an ONNX file with ONNX Runtime as a module-like object, so the zoo's metrics evaluate it like a model."""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import nn

from ..errors import CBDError

__all__ = ["OnnxModel", "session"]


def session(path: str | os.PathLike, threads: int = 1, optimization: str = "all"):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (one inter-op thread, sequential)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                        "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CBDError(f"{path}: ONNX Runtime cannot load it ({text})") from None


class OnnxModel(nn.Module):
    """An ONNX file as a module: ``forward`` runs the session on the batch (float32) and returns a tensor.
    It has no parameters, so callers that look for a parameter dtype fall back to float32."""

    def __init__(self, path: str | os.PathLike, threads: int = 1) -> None:
        super().__init__()
        if threads < 1:
            raise CBDError(f"--threads must be at least 1, got {threads}")
        self.path = str(path)
        self.session = session(path, threads)
        self.input_name = self.session.get_inputs()[0].name
        self.metadata = dict(self.session.get_modelmeta().custom_metadata_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        array = x.detach().cpu().numpy().astype(np.float32, copy=False)
        try:
            out = self.session.run(None, {self.input_name: array})[0]
        except Exception as exc:  # shape/type mismatch of the data: the caller words it
            raise RuntimeError(str(exc).strip().splitlines()[0][:300] if str(exc).strip() else repr(exc)) from None
        return torch.from_numpy(out)
