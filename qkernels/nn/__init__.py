"""Quantized modules: :class:`QuantLinear`, the schemes, :func:`quantize_`, save/load."""

from .linear import QuantLinear
from .quantize import quantize_
from .schemes import SCHEMES, Fp4, Fp8Dynamic, Fp8WeightOnly, Int4WeightOnly, Int8Dynamic, Int8WeightOnly, Scheme
