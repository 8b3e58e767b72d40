"""Floor 1 of cbdnet: numpy only. The exact GF(2) kernels (:mod:`.gf2`), composite and uniform bit planes
(:mod:`.planes`), the scale search (:mod:`.search`), stored planes (:mod:`.bits`), the layer codes
(:mod:`.code`) and the encoders that make them (:mod:`.composite`, :mod:`.grid`)."""

from . import gf2
from .bits import PlaneCode, check_finite, pack_bits, plane_digest, unpack_bits
from .code import CODE_TYPES, MAX_PLANES, CodeError, CompositeCode, GridCode, LayerCode, UniformCode, ZeroCode
from .composite import FALLBACK_RULES, encode_uniform, encode_weight, rd_cost
from .grid import GRANULARITIES, encode_composite_grouped, encode_rtn, grid_code

__all__ = ["gf2", "PlaneCode", "pack_bits", "unpack_bits", "plane_digest", "check_finite", "LayerCode",
           "CompositeCode", "UniformCode", "GridCode", "ZeroCode", "CODE_TYPES", "CodeError", "MAX_PLANES",
           "encode_weight", "encode_uniform", "rd_cost", "FALLBACK_RULES", "GRANULARITIES", "encode_rtn",
           "encode_composite_grouped", "grid_code"]
