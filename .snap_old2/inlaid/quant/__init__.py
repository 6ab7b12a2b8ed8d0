"""inlaid.quant: offline and incremental quantization of the shared base.

Public API of the algorithm layer (no model knowledge):
``gptq_quantize``/``rtn_quantize`` -> ``QuantResult``; Hessian accumulation,
aggregation and storage; the standard GPTQ checkpoint layout (``pack``,
``unpack``, ``dequantize``, ``save_quantized_checkpoint``,
``load_quantized_checkpoint``).
"""

from inlaid.quant.gptq import QuantResult, gptq_quantize, output_error
from inlaid.quant.hessian import (
    GROUPS,
    HessianAccumulator,
    HessianStore,
    aggregate,
    ensure_pd,
    update_aggregate,
)
from inlaid.quant.pack import (
    CheckpointError,
    QuantizedCheckpoint,
    dequantize,
    load_quantized_checkpoint,
    pack,
    quantization_config,
    save_quantized_checkpoint,
    unpack,
)
from inlaid.quant.rtn import rtn_quantize

__all__ = [
    "GROUPS", "CheckpointError", "HessianAccumulator", "HessianStore", "QuantResult", "QuantizedCheckpoint",
    "aggregate", "dequantize", "ensure_pd", "gptq_quantize", "load_quantized_checkpoint", "output_error",
    "pack", "quantization_config", "rtn_quantize", "save_quantized_checkpoint", "unpack", "update_aggregate",
]  # fmt: skip
