"""qkernels: quantized LLM inference kernels for PyTorch.

Public API (all backed by ``torch.ops.qkernels.*``; see ``qkernels.explain(op)`` for which kernel runs where):

* integer quantization: :func:`quantize_affine`, :func:`dequantize_affine`, :func:`choose_qparams_affine`,
  :func:`pack_int4`, :func:`unpack_int4`
* dequant-GEMMs: :func:`int4_weight_only_mm` (W4A16), :func:`int8_weight_only_mm` (W8A16),
  :func:`int8_dynamic_mm` (W8A8)
* GGUF (llama.cpp) blocks: :func:`gguf_quantize`, :func:`gguf_dequantize`, :func:`gguf_mm`; files and mixes in
  :mod:`qkernels.gguf` (:func:`load_gguf`, :func:`export_gguf`)
"""

from . import _ext, dispatch, reference
from .dispatch import explain
from .ops import (
    choose_qparams_affine,
    dequantize_affine,
    gguf_dequantize,
    gguf_mm,
    gguf_quantize,
    int4_weight_only_mm,
    int8_dynamic_mm,
    int8_weight_only_mm,
    pack_int4,
    quantize_affine,
    quantize_affine_with_qparams,
    quantize_per_token_int8,
    unpack_int4,
)

from . import gguf  # noqa: E402  (after .ops: it builds on them)
from .formats.gguf import export_gguf, load_gguf  # noqa: E402

__version__ = "0.1.0"
HAS_EXTENSION = _ext.HAS_C
