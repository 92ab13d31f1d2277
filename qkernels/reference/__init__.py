"""The plain-PyTorch specification of every ``torch.ops.qkernels`` op, by op name.

Each family module defines functions named exactly like the ops (same positional arguments as the schema in
csrc/ops.cpp). :data:`OPS` maps op name -> reference function; the ``reference`` backend calls these.
"""

from __future__ import annotations

from . import attention, float4, float8, gguf, int_gemm, int_quant

OPS = {}


def _collect(module, names):
    for n in names:
        OPS[n] = getattr(module, n)


_collect(int_quant, ["choose_qparams_affine", "quantize_affine", "dequantize_affine", "pack_int4", "unpack_int4"])
_collect(int_gemm, ["int4_weight_only_mm", "int8_weight_only_mm", "quantize_per_token_int8", "int8_dynamic_mm",
                    "int8_dynamic_int4_mm"])
_collect(float8, ["quantize_fp8", "dequantize_fp8", "fp8_mm", "fp8_weight_only_mm"])
_collect(float4, ["fp4_encode", "fp4_decode", "quantize_fp4", "dequantize_fp4", "fp4_mm", "fp4_weight_only_mm"])
_collect(gguf, ["gguf_quantize", "gguf_dequantize", "gguf_mm"])
_collect(attention, ["decode_attention"])
