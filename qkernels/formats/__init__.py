"""Checkpoint formats: other quantizers' checkpoints (GPTQ, AWQ, compressed-tensors) converted once at load into
:class:`qkernels.nn.QuantLinear`, and qkernels' own save/load (:func:`save_quantized`, :func:`load_quantized`).
GGUF files: :mod:`qkernels.gguf` (load_gguf / export_gguf)."""

from ._common import CheckpointError
from .hf import load_quantized, save_quantized

__all__ = ["CheckpointError", "load_quantized", "save_quantized"]
