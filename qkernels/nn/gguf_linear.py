"""GGUFLinear: an nn.Linear whose weight stays in llama.cpp's block format (any ggml type qkernels decodes)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops._call import cpu_op
from ..ops._validate import FLOAT_DTYPES
from ..ops.gguf import block_info, gguf_dequantize, gguf_mm, gguf_quantize, type_id
from ..reference.gguf import TYPE_NAMES
from .layouts import add_bias, add_bias_eager, run_2d


class GGUFLinear(nn.Module):
    """``y = x @ W^T + b`` with W ``[out_features, in_features]`` kept as ggml blocks.

    Buffers:
        data: uint8 ``[out_features, in_features / block * type_size]``, each row the ggml blocks of one output row
            (exactly a GGUF tensor's bytes).
        bias: optional float ``[out_features]``.
    The forward is :func:`qkernels.gguf_mm` (C++ on CPU: decode tiles of rows, then sgemm). On the CPU it calls the
    op directly on ``data`` (checked here, when the layer is built; the kernel checks every argument again) and runs
    the public function, with its Python-side errors, only if the kernel refuses the input.
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
        self._bias_cast = None  # the bias in the last activation dtype: see layouts.add_bias

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
        b = self._buffers
        N, K = self.out_features, self.in_features
        fn = cpu_op("gguf_mm", x.device) if isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES else None
        if fn is not None:
            try:
                y = fn(x, b["data"], self.type, N, K) if x.dim() == 2 else run_2d(fn, x, (b["data"], self.type, N, K))
            except Exception:  # noqa: BLE001  (gguf_mm raises its Python-side error)
                pass
            else:
                return add_bias_eager(self, y, b["bias"])
        return add_bias(self, gguf_mm(x, b["data"], self.type, N, K), b["bias"])

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, type={self.type_name}, "
                f"bias={self.bias is not None}")
