"""Integer dequant-GEMMs: the plain-PyTorch specification.

All GEMMs take ``x`` of shape ``[M, K]`` (the public API flattens leading dims) in fp32/bf16/fp16 and a weight
stored ``[N, K]`` like ``nn.Linear.weight``; they return ``x @ W^T`` of shape ``[M, N]`` in ``x.dtype``.
The reference accumulates in fp64 so tests can measure every kernel's error against it.
"""

from __future__ import annotations

import torch

from . import int_quant
from ._arith import true_div


def int4_weight_only_mm(x, packed_w, scale, zero_point, group_size, is_signed):
    """``x [M, Kx]`` with ``Kx <= K = 2 * packed_w.shape[1]``: a weight whose ragged last group is stored padded to
    whole groups may take x unpadded; x's missing columns count as zeros, i.e. the weight's columns from Kx on are
    left out (qkernels.ops.int_gemm checks ``K - group_size < Kx``)."""
    q = int_quant.unpack_int4(packed_w, is_signed)
    w = int_quant.dequantize_affine(q, scale, zero_point, group_size, False, torch.float64)
    return (x.double() @ w[:, :x.shape[-1]].t()).to(x.dtype)


def int8_weight_only_mm(x, q_w, scale):
    w = q_w.double() * scale.double().reshape(-1, 1)
    return (x.double() @ w.t()).to(x.dtype)


def quantize_per_token_int8(x):
    """Symmetric per-row int8: ``scale = amax / 127`` (1 for an all-zero row), ``q`` in [-127, 127].

    A row holding NaN or inf gets ``scale = NaN`` and codes 0, so every GEMM output of that row is NaN (the
    non-finite input is reported, never turned into a finite number)."""
    xf = x.float()
    finite = torch.isfinite(xf).all(dim=-1)
    xf = torch.where(finite.unsqueeze(-1), xf, torch.zeros_like(xf))
    amax = xf.abs().amax(dim=-1) if xf.shape[-1] > 0 else torch.zeros(xf.shape[:-1], device=xf.device)
    scale = true_div(amax, 127.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(xf / scale.unsqueeze(-1)), -127, 127).to(torch.int8)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return q, scale


def int8_dynamic_mm(x, q_w, w_scale):
    """x is quantized per token (above); the int8 x int8 products are summed exactly (int64 here, int32 in the
    kernels, which cannot overflow for K < 2^17 since |q| <= 127*128), then scaled by x_scale[m] * w_scale[n]."""
    qx, sx = quantize_per_token_int8(x)
    acc = qx.long() @ q_w.long().t()
    out = acc.double() * sx.double().unsqueeze(-1) * w_scale.double().unsqueeze(0)
    return out.to(x.dtype)


def quantize_per_group_int8(x, group_size):
    """Symmetric int8 of ``x [M, K]`` per row and per block of ``group_size`` columns (the activations of
    :func:`int8_dynamic_int4_mm`): ``scale [M, K / group_size] = amax / 127`` (1 for an all-zero block), codes
    ``round_half_even(x / scale)`` in [-127, 127] (a true fp32 division). A row holding NaN or inf gets codes 0 and
    scale NaN in every block, as :func:`quantize_per_token_int8` does."""
    M, K = x.shape
    xf = x.float()
    finite = torch.isfinite(xf).all(dim=-1, keepdim=True)
    xf = torch.where(finite, xf, torch.zeros_like(xf))
    xg = xf.reshape(M, K // group_size, group_size)
    amax = xg.abs().amax(dim=-1) if group_size > 0 else torch.zeros(M, 0, device=x.device)
    scale = true_div(amax, 127.0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(xg / scale.unsqueeze(-1)), -127, 127).to(torch.int8).reshape(M, K)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    return q, scale


def int8_dynamic_int4_mm(x, packed_w, scale, zero_point, group_size, is_signed):
    """W4A8: ``x [M, Kx]`` (zero-padded to the weight's K, as in :func:`int4_weight_only_mm`) quantized by
    :func:`quantize_per_group_int8` with the weight's group size; per group the integer sum
    ``sum_k (q[n, k] - zero_point[n, g]) * qx[m, k]`` (exact: in fp64 every term and sum is an integer below 2^53),
    times ``x_scale[m, g] * scale[n, g]``, summed over groups in fp64, rounded once to x's dtype. The same int4 weight
    (codes, scales, zero points) as int4_weight_only_mm."""
    K = packed_w.shape[1] * 2
    M, N, G = x.shape[0], packed_w.shape[0], K // group_size
    if x.shape[1] < K:
        x = torch.nn.functional.pad(x, (0, K - x.shape[1]))
    qx, sx = quantize_per_group_int8(x, group_size)
    q = int_quant.unpack_int4(packed_w, is_signed).double().reshape(N, G, group_size)
    if zero_point is not None:
        q = q - zero_point.double().unsqueeze(-1)
    acc = torch.einsum("mgk,ngk->mng", qx.double().reshape(M, G, group_size), q)
    out = (acc * sx.double().unsqueeze(1) * scale.double().unsqueeze(0)).sum(-1)
    return out.to(x.dtype)
