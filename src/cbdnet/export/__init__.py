"""Floor 5.5 of cbdnet: deployment formats of a loaded compressed model. :mod:`.onnx` writes a QDQ ONNX file whose
Conv/Gemm weights are the stored integer codes; :mod:`.runtime` runs such a file with ONNX Runtime as a
module-like object that the zoo's metrics accept. Sits above ``format``, below ``cli``, and knows no architecture:
the caller passes the input shape (:func:`cbdnet.zoo.input_spec` has the registered architectures')."""

from __future__ import annotations

from .onnx import ExportReport, export_onnx, export_onnx_bytes
from .runtime import OnnxModel

__all__ = ["ExportReport", "export_onnx", "export_onnx_bytes", "OnnxModel"]
