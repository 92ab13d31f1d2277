"""qkernels: quantized LLM inference kernels for PyTorch.

Public API (all backed by ``torch.ops.qkernels.*``; see ``qkernels.explain(op)`` for which kernel runs where):

* integer quantization: :func:`quantize_affine`, :func:`dequantize_affine`, :func:`choose_qparams_affine`,
  :func:`pack_int4`, :func:`unpack_int4`
* dequant-GEMMs: :func:`int4_weight_only_mm` (W4A16), :func:`int8_weight_only_mm` (W8A16),
  :func:`int8_dynamic_mm` (W8A8)
* modules: :class:`QuantLinear` and the schemes (:class:`Int4WeightOnly`, :class:`Int8WeightOnly`,
  :class:`Int8Dynamic`; fp8/fp4 schemes defined, pending their ops), :func:`quantize_`
* checkpoints: :func:`save_quantized`, :func:`load_quantized` (qkernels, GPTQ, AWQ, compressed-tensors)
"""

from . import _ext, dispatch, reference
from .dispatch import explain
from .ops import (
    choose_qparams_affine,
    dequantize_affine,
    int4_weight_only_mm,
    int8_dynamic_mm,
    int8_weight_only_mm,
    pack_int4,
    quantize_affine,
    quantize_affine_with_qparams,
    quantize_per_token_int8,
    unpack_int4,
)

from .nn import (
    Fp4,
    Fp8Dynamic,
    Fp8WeightOnly,
    Int4WeightOnly,
    Int8Dynamic,
    Int8WeightOnly,
    QuantLinear,
    quantize_,
)
from .formats import load_quantized, save_quantized

__version__ = "0.1.0"
HAS_EXTENSION = _ext.HAS_C
