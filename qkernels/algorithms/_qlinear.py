"""A minimal quantized linear layer for the algorithms' output (to be replaced by ``qkernels.nn.QuantLinear``).

It holds one layer's weight in the op format of :mod:`qkernels.ops.int_quant`: integer codes ``q`` (int8 storage,
signed range), ``scale`` fp32 ``[N, G]`` and ``zero_point`` int32 ``[N, G]`` (None when symmetric) with groups of
``group_size`` consecutive input columns, plus an optional act-order permutation ``perm``.

* K not divisible by group_size (e.g. K=576, g=128 in SmolLM2-135M): the codes are stored zero-padded to
  ``Kp = G * group_size`` and the input is zero-padded too, so the last group is a ragged group of ``K % g`` columns
  (the same numbers as GPTQ's ``g_idx = k // g``). Zero codes at zero inputs add exactly nothing.
* ``perm`` (GPTQ desc_act): column ``j`` of the stored codes is input column ``perm[j]``; the groups are contiguous
  in that order, so the forward gathers ``x[..., perm]`` and runs the plain grouped kernel.
* bits <= 4 -> :func:`qkernels.int4_weight_only_mm` on packed nibbles; 8-bit symmetric per-channel ->
  :func:`qkernels.int8_weight_only_mm`; anything else (8-bit grouped/asymmetric) dequantizes and runs F.linear.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops


class QuantizedWeightLinear(nn.Module):
    """``y = x @ dequant(q)^T + bias``; ``x`` float ``[..., in_features]`` -> ``[..., out_features]``.

    Args:
        q: int8 ``[N, Kp]`` codes in ``[-2^(bits-1), 2^(bits-1)-1]`` (Kp = G * group_size >= K, padding columns 0).
        scale: fp32 ``[N, G]``. zero_point: int32 ``[N, G]`` or None (symmetric).
        perm: int64 ``[K]`` act-order permutation or None. bias: float ``[N]`` or None.
        act_quant: "int8_per_token" quantizes activations per token (fake-quant, as in QAT) before the GEMM.
    """

    def __init__(self, in_features, q, scale, zero_point, bits, group_size, perm=None, bias=None, act_quant=None):
        super().__init__()
        N, Kp = q.shape
        if q.dtype != torch.int8:
            raise TypeError(f"q must have dtype int8, got {q.dtype}")
        if Kp < in_features or Kp != scale.shape[1] * group_size:
            raise ValueError(f"q must be [N, G*group_size] >= K={in_features}, got {tuple(q.shape)} with "
                             f"group_size={group_size} and scale {tuple(scale.shape)}")
        self.in_features, self.out_features = in_features, N
        self.bits, self.group_size, self.act_quant = bits, group_size, act_quant
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("zero_point", None if zero_point is None else zero_point.to(torch.int32).contiguous())
        self.register_buffer("perm", None if perm is None else perm.long())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        if bits <= 4 and Kp % 2 == 0:
            self.kind = "int4"
            self.register_buffer("qweight", ops.pack_int4(q.contiguous()))
        elif bits == 8 and zero_point is None and scale.shape[1] == 1 and Kp == in_features:
            self.kind = "int8"
            self.register_buffer("qweight", q.contiguous())
        else:
            self.kind = "dequant"
            self.register_buffer("qweight", q.contiguous())

    def codes(self) -> torch.Tensor:
        """int8 ``[N, Kp]`` codes (in stored/permuted column order)."""
        return ops.unpack_int4(self.qweight) if self.kind == "int4" else self.qweight

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 ``[N, K]`` weight in the original input-column order."""
        w = ops.dequantize_affine(self.codes(), self.scale, self.zero_point, self.group_size)[:, : self.in_features]
        if self.perm is not None:
            w = w[:, torch.argsort(self.perm)]
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant == "int8_per_token":
            qx, sx = ops.quantize_per_token_int8(x)
            x = (qx.float() * sx.unsqueeze(-1)).to(x.dtype)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        Kp = self.qweight.shape[1] * (2 if self.kind == "int4" else 1)
        if Kp != self.in_features:
            x = F.pad(x, (0, Kp - self.in_features))
        if self.kind == "int4":
            y = ops.int4_weight_only_mm(x, self.qweight, self.scale, self.zero_point, self.group_size, signed=True)
        elif self.kind == "int8":
            y = ops.int8_weight_only_mm(x, self.qweight, self.scale[:, 0])
        else:
            w = ops.dequantize_affine(self.qweight, self.scale, self.zero_point, self.group_size, out_dtype=x.dtype)
            y = F.linear(x, w)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def storage_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scale, self.zero_point, self.perm, self.bias)
                   if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, kernel={self.kind}, act_order={self.perm is not None}")
