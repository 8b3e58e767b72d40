"""Floor 2 of cbdnet: PyTorch modules that carry a layer code (:mod:`.modules`), the model walker that swaps
them in (:mod:`.walk`), the report (:mod:`.report`) and operation counts (:mod:`.ops`)."""

from .modules import (
    COMPRESSIBLE,
    CBDConv2d,
    CBDConvTranspose2d,
    CBDLinear,
    CBDModule,
    CBDMultiheadAttention,
    from_module,
    is_compressible,
)
from .report import LayerReport, Report
from .walk import compress_layers, compressible_layers

__all__ = ["COMPRESSIBLE", "CBDModule", "CBDConv2d", "CBDConvTranspose2d", "CBDLinear", "CBDMultiheadAttention",
           "from_module", "is_compressible",
           "LayerReport", "Report", "compress_layers", "compressible_layers"]
