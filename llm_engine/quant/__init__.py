"""Weight-only quantization: int8 per-output-channel and int4 group-wise (asymmetric, group 128), as a
module swap at load (`quantize_model`). CUDA runs Triton kernels that dequantize in registers; CPU runs the
torch dequant reference."""

from llm_engine.quant.int4 import Int4Linear, quantize_int4
from llm_engine.quant.int8 import Int8Linear, quantize_int8
from llm_engine.quant.swap import quantize_model

__all__ = ["Int4Linear", "Int8Linear", "quantize_int4", "quantize_int8", "quantize_model"]
