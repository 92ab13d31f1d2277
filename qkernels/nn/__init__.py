"""Quantized nn modules."""

from .gguf_linear import GGUFLinear
