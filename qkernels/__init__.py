"""qkernels: quantized LLM inference kernels for PyTorch.

Public API (all backed by ``torch.ops.qkernels.*``; see ``qkernels.explain(op)`` for which kernel runs where):

* integer quantization: :func:`quantize_affine`, :func:`dequantize_affine`, :func:`choose_qparams_affine`,
  :func:`pack_int4`, :func:`unpack_int4`
* dequant-GEMMs: :func:`int4_weight_only_mm` (W4A16), :func:`int8_weight_only_mm` (W8A16),
  :func:`int8_dynamic_mm` (W8A8), :func:`int8_dynamic_int4_mm` (W4A8)
* modules: :class:`QuantLinear` and the schemes (:class:`Int4WeightOnly`, :class:`Int8WeightOnly`,
  :class:`Int8Dynamic`, :class:`Int8DynamicInt4Weight`, :class:`IntWeightInt8Act`, :class:`Fp8WeightOnly`, :class:`Fp8Dynamic`, :class:`Fp4`),
  :func:`quantize_`, :func:`fuse_projections`,
  :func:`use_int8_activations` (int4 layers to W4A8)
* checkpoints: :func:`save_quantized`, :func:`load_quantized` (qkernels, GPTQ, AWQ, compressed-tensors)
* fp8: :func:`quantize_fp8`, :func:`dequantize_fp8` (per-tensor / per-row / block scales, e4m3fn, e5m2, fnuz),
  :func:`fp8_mm` (scaled fp8 GEMM: torch._scaled_mm where the GPU has fp8, emulated elsewhere),
  :func:`fp8_weight_only_mm` (float x times an fp8 weight)
* fp4: :func:`fp4_encode`, :func:`fp4_decode` (e2m1 / e1m2 elements), :func:`quantize_fp4`,
  :func:`dequantize_fp4` (MXFP4, NVFP4), :func:`fp4_mm`, :func:`fp4_weight_only_mm`
* GGUF (llama.cpp) blocks: :func:`gguf_quantize`, :func:`gguf_dequantize`, :func:`gguf_mm`; files and mixes in
  :mod:`qkernels.gguf` (:func:`load_gguf`, :func:`export_gguf`)
"""

from . import _ext, dispatch, reference
from .dispatch import explain
from .ops import (
    choose_qparams_affine,
    dequantize_affine,
    dequantize_fp4,
    dequantize_fp8,
    fp4_decode,
    fp4_encode,
    fp4_mm,
    fp4_weight_only_mm,
    fp8_mm,
    fp8_weight_only_mm,
    gguf_dequantize,
    gguf_mm,
    gguf_quantize,
    int4_weight_only_mm,
    int8_dynamic_int4_mm,
    int8_dynamic_mm,
    int8_weight_only_mm,
    pack_int4,
    quantize_affine,
    quantize_affine_with_qparams,
    quantize_fp4,
    quantize_fp8,
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
    Int8DynamicInt4Weight,
    IntWeightInt8Act,
    QuantEmbedding,
    QuantLinear,
    fuse_projections,
    quantize_,
    use_int8_activations,
)
from .formats import load_quantized, save_quantized
from . import gguf  # noqa: E402  (after .ops: it builds on them)
from .formats.gguf import export_gguf, load_gguf  # noqa: E402

__version__ = "0.1.0"
HAS_EXTENSION = _ext.HAS_C

# quant_method="qkernels" for transformers' from_pretrained / save_pretrained: registered when transformers loads its
# quantizer table (an import hook: importing transformers here would cost seconds)
from .integrations import install_transformers_hook as _install_transformers_hook  # noqa: E402

_install_transformers_hook()
