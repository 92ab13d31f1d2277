"""qkernels.gguf: llama.cpp's GGUF block formats, quantization mixes and files, in one namespace.

    data = qkernels.gguf.quantize(w, "Q4_K")              # uint8, byte-identical to llama.cpp / gguf-py
    w2 = qkernels.gguf.dequantize(data, "Q4_K", w.shape)   # float32, bit-identical to ggml's dequantize
    qkernels.gguf.tensor_type("blk.0.ffn_down.weight", (576, 1536), 30, "Q4_K_M")   # -> "Q6_K"
    model = qkernels.load_gguf("model.gguf")               # LlamaForCausalLM with GGUFLinear layers
    qkernels.export_gguf(model, "out.gguf", "Q4_K_M")

Block layouts: :mod:`qkernels.reference.gguf`. Docs: docs/gguf.md.
"""

from __future__ import annotations

import torch

from .formats.gguf import (
    MIXES,
    GGUFError,
    bits_per_weight,
    export_gguf,
    load_gguf,
    load_gguf_tokenizer,
    open_gguf,
    read_tensors,
    rope_permute_rows,
    rope_unpermute_rows,
    tensor_type,
)
from .nn.gguf_linear import GGUFLinear
from .ops.gguf import block_info, gguf_dequantize, gguf_mm, gguf_quantize, type_id
from .reference.gguf import BLOCK, TYPE_NAMES, TYPES

RECIPES = tuple(m for m in MIXES if m not in ("F16", "F32"))  # the llama.cpp quantization mixes we implement


def quantize(x: torch.Tensor, type: str = "Q4_K", imatrix: torch.Tensor | None = None, *, backend=None):
    """float ``x [..., cols]`` -> uint8 ggml blocks ``[..., cols / block * type_size]`` laid out exactly like
    ``gguf.quants.quantize(x.numpy(), GGMLQuantizationType[type])`` (rows of blocks). ``imatrix [cols]``: llama.cpp
    importance weights (K-quants)."""
    return gguf_quantize(x, type, imatrix, backend=backend)


def dequantize(data: torch.Tensor, type: str, shape, dtype=torch.float32, *, backend=None):
    """Inverse of :func:`quantize`: ggml blocks of a tensor of logical ``shape`` -> ``dtype``."""
    return gguf_dequantize(data, type, shape, dtype, backend=backend)


__all__ = [
    "BLOCK", "GGUFError", "GGUFLinear", "MIXES", "RECIPES", "TYPES", "TYPE_NAMES", "bits_per_weight", "block_info",
    "dequantize", "export_gguf", "gguf_dequantize", "gguf_mm", "gguf_quantize", "load_gguf", "load_gguf_tokenizer",
    "open_gguf", "quantize", "read_tensors", "rope_permute_rows", "rope_unpermute_rows", "tensor_type", "type_id",
]
