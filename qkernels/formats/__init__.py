"""Checkpoint formats: other quantizers' checkpoints (GPTQ, AWQ, compressed-tensors) converted once at load into
:class:`qkernels.nn.QuantLinear`, and qkernels' own save/load (:func:`save_quantized`, :func:`load_quantized`).
Writers of GPTQ / AWQ model directories: :func:`save_gptq`, :func:`save_awq`. GGUF files: :mod:`qkernels.gguf`
(load_gguf / export_gguf)."""

from ._common import CheckpointError
from .awq import save_awq
from .gptq import save_gptq
from .hf import load_quantized, save_quantized

__all__ = ["CheckpointError", "load_quantized", "save_awq", "save_gptq", "save_quantized"]
