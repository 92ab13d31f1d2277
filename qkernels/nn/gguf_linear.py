"""GGUFLinear: an nn.Linear whose weight stays in llama.cpp's block format (any ggml type qkernels decodes)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.gguf import block_info, gguf_dequantize, gguf_mm, gguf_quantize, type_id
from ..reference.gguf import TYPE_NAMES


class GGUFLinear(nn.Module):
    """``y = x @ W^T + b`` with W ``[out_features, in_features]`` kept as ggml blocks.

    Buffers:
        data: uint8 ``[out_features, in_features / block * type_size]``, each row the ggml blocks of one output row
            (exactly a GGUF tensor's bytes).
        bias: optional float ``[out_features]``.
    The forward is :func:`qkernels.gguf_mm` (C++ on CPU: decode tiles of rows, then sgemm).
    """

    def __init__(self, in_features: int, out_features: int, type, data: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.type = type_id(type)
        bs, ts = block_info(self.type)
        if in_features % bs:
            raise ValueError(f"in_features ({in_features}) must be a multiple of the {TYPE_NAMES[self.type]} block "
                             f"size {bs}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        shape = (self.out_features, self.in_features // bs * ts)
        if data is None:
            data = torch.zeros(shape, dtype=torch.uint8)
        if data.dtype != torch.uint8 or tuple(data.shape) != shape:
            raise ValueError(f"data must be uint8 of shape {shape} for a {TYPE_NAMES[self.type]} weight "
                             f"[{out_features}, {in_features}], got {data.dtype} {tuple(data.shape)}")
        self.register_buffer("data", data)
        self.register_buffer("bias", bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, type, imatrix: torch.Tensor | None = None) -> "GGUFLinear":
        """Quantize ``linear.weight`` with llama.cpp's reference quantizer for ``type`` ("Q4_K", ...)."""
        w = linear.weight.detach().to(torch.float32)
        data = gguf_quantize(w, type, imatrix)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(linear.in_features, linear.out_features, type, data, bias)

    @property
    def type_name(self) -> str:
        return TYPE_NAMES[self.type]

    def dequantize_weight(self, dtype=torch.float32) -> torch.Tensor:
        return gguf_dequantize(self.data, self.type, (self.out_features, self.in_features), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = gguf_mm(x, self.data, self.type, self.out_features, self.in_features)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, type={self.type_name}, "
                f"bias={self.bias is not None}")
