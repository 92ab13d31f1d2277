"""Public op functions: validate arguments -> pick a backend (qkernels.dispatch) -> run it."""

from .attention import decode_attention
from .float4 import dequantize_fp4, fp4_decode, fp4_encode, fp4_mm, fp4_weight_only_mm, quantize_fp4
from .float8 import dequantize_fp8, fp8_mm, fp8_weight_only_mm, quantize_fp8
from .gguf import gguf_dequantize, gguf_mm, gguf_quantize
from .int_gemm import (int4_weight_only_mm, int8_dynamic_int4_mm, int8_dynamic_mm, int8_weight_only_mm,
                       quantize_per_token_int8)
from .int_quant import (
    choose_qparams_affine,
    dequantize_affine,
    pack_int4,
    quantize_affine,
    quantize_affine_with_qparams,
    unpack_int4,
)
from . import autograd  # registers the GEMM ops' gradients (after the families' fake kernels)
