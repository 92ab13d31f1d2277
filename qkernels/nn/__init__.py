"""Quantized modules: :class:`QuantLinear`, the schemes and :func:`quantize_` (checkpoints: :mod:`qkernels.formats`),
:func:`fuse_projections` (q/k/v and gate/up as one GEMM) and :class:`GGUFLinear` (weights kept in llama.cpp
blocks)."""

from .embedding import QuantEmbedding
from .fuse import fuse_projections
from .gguf_linear import GGUFLinear
from .linear import QuantLinear
from .quantize import quantize_, use_int8_activations
from .schemes import (SCHEMES, Fp4, Fp8Dynamic, Fp8WeightOnly, Int4WeightOnly, Int8Dynamic, Int8DynamicInt4Weight,
                      Int8WeightOnly, IntWeightInt8Act, Scheme)

__all__ = ["QuantLinear", "QuantEmbedding", "quantize_", "SCHEMES", "Scheme", "Int4WeightOnly", "Int8WeightOnly",
           "Int8Dynamic",
           "Int8DynamicInt4Weight", "use_int8_activations",
           "IntWeightInt8Act", "Fp8WeightOnly", "Fp8Dynamic", "Fp4", "GGUFLinear", "fuse_projections"]
