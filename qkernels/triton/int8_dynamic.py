"""Triton W8A8 (same ops as the CUDA path in csrc/cuda/int_gemm_ops.cpp): per-token int8 quantization of x, an int8
x int8 -> int32 tile GEMM (``tl.dot``, exact), and the epilogue ``(acc * x_scale[m]) * w_scale[n]`` in fp64 like the
reference and the CPU kernel (in fp32, acc * x_scale overflows for |x| >~ 1e35 where the result is finite), so
results are bit-identical to csrc/cpu/int_gemm.cpp. The ROCm path and the fallback where the
CUDA extension is absent.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import register
from ._common import kernel_input, launch_opts, load_f32, round_half_even

# one configuration (no autotuning yet): 64 x 64 output tiles, 64-deep K steps
BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 64


@triton.jit
def _quantize_per_token_kernel(x_ptr, q_ptr, s_ptr, K, IN_BF16: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], tl.int32)
    bad = tl.zeros([BLOCK], tl.int32)
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        a = load_f32(x_ptr, row * K + offs, offs < K, IN_BF16).to(tl.int32, bitcast=True) & 0x7FFFFFFF
        bad = bad | (a >= 0x7F800000).to(tl.int32)
        amax = tl.maximum(amax, tl.where(a < 0x7F800000, a, 0))  # non-negative floats order like their bits
    s = tl.math.div_rn(tl.max(amax, axis=0).to(tl.float32, bitcast=True), 127.0)
    s = tl.where(s > 0, s, 1.0)
    finite = tl.max(bad, axis=0) == 0
    tl.store(s_ptr + row, tl.where(finite, s, float("nan")))
    for k0 in range(0, K, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < K
        q = round_half_even(tl.math.div_rn(load_f32(x_ptr, row * K + offs, mask, IN_BF16), s))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + row * K + offs, tl.where(finite, q, 0.0).to(tl.int32).to(tl.int8), mask=mask)


@triton.jit
def _int8_mm_kernel(a_ptr, w_ptr, sa_ptr, sw_ptr, out_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        a = tl.load(a_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0)
        w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)
        acc += tl.dot(a, w, out_dtype=tl.int32)
    sa = tl.load(sa_ptr + offs_m, mask=m_mask, other=1.0)
    sw = tl.load(sw_ptr + offs_n, mask=n_mask, other=1.0)
    out = (acc.to(tl.float64) * sa.to(tl.float64)[:, None]) * sw.to(tl.float64)[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], out.to(tl.float32),
             mask=m_mask[:, None] & n_mask[None, :])


@register("quantize_per_token_int8")
def quantize_per_token_int8(x):
    """x float ``[M, K]`` -> (q int8 ``[M, K]`` in [-127, 127], scale fp32 ``[M]``; NaN and zero codes for a row
    with NaN/inf)."""
    M, K = x.shape
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M:
        _quantize_per_token_kernel[(M,)](kernel_input(x), q, s, K, IN_BF16=x.dtype == torch.bfloat16,
                                          BLOCK=min(1024, triton.next_power_of_2(max(K, 16))), **launch_opts())
    return q, s


@register("int8_dynamic_mm")
def int8_dynamic_mm(x, q_w, w_scale):
    """x float ``[M, K]``, q_w int8 ``[N, K]``, w_scale float ``[N]`` -> ``[M, N]`` in x's dtype."""
    M, K = x.shape
    N = q_w.shape[0]
    if K >= 1 << 17:
        raise ValueError(f"K={K} is too large for exact int32 accumulation (needs K < 131072)")
    out = torch.zeros((M, N), dtype=torch.float32, device=x.device)
    if M and N:
        qx, sx = quantize_per_token_int8(x)
        grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
        _int8_mm_kernel[grid](qx, q_w.contiguous(), sx, w_scale.float().contiguous(), out, M, N, K, BLOCK_M=BLOCK_M,
                              BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, **launch_opts())
    return out.to(x.dtype)


# ---- W4A8: int8 activations per row and weight group x int4 weights (int8_dynamic_int4_mm) ----------------------


@triton.jit
def _quantize_per_group_kernel(x_ptr, finite_ptr, q_ptr, s_ptr, K, group_size, n_groups, IN_BF16: tl.constexpr,
                               BLOCK: tl.constexpr):
    """One (row, group) per program: scale = amax / 127 (1 if 0), codes round_half_even(x / scale) in [-127, 127];
    a row with NaN/inf (finite_ptr[row] == 0) gets codes 0 and scale NaN."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    base = row * K + g * group_size
    amax = tl.zeros([BLOCK], tl.int32)
    for k0 in range(0, group_size, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        a = load_f32(x_ptr, base + offs, offs < group_size, IN_BF16).to(tl.int32, bitcast=True) & 0x7FFFFFFF
        amax = tl.maximum(amax, tl.where(a < 0x7F800000, a, 0))  # non-negative floats order like their bits
    s = tl.math.div_rn(tl.max(amax, axis=0).to(tl.float32, bitcast=True), 127.0)
    s = tl.where(s > 0, s, 1.0)
    finite = tl.load(finite_ptr + row) != 0
    tl.store(s_ptr + row * n_groups + g, tl.where(finite, s, float("nan")))
    for k0 in range(0, group_size, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        mask = offs < group_size
        q = round_half_even(tl.math.div_rn(load_f32(x_ptr, base + offs, mask, IN_BF16), s))
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
        tl.store(q_ptr + base + offs, tl.where(finite, q, 0.0).to(tl.int32).to(tl.int8), mask=mask)


def quantize_per_group_int8(x, group_size):
    """x float ``[M, K]`` -> (codes int8 ``[M, K]``, scales fp32 ``[M, K / group_size]``), as
    qkernels.reference.int_gemm.quantize_per_group_int8."""
    M, K = x.shape
    G = K // group_size
    q = torch.empty((M, K), dtype=torch.int8, device=x.device)
    s = torch.empty((M, G), dtype=torch.float32, device=x.device)
    if M and G:
        finite = torch.isfinite(x).all(dim=-1).to(torch.int32)
        _quantize_per_group_kernel[(M, G)](kernel_input(x), finite, q, s, K, group_size, G,
                                           IN_BF16=x.dtype == torch.bfloat16,
                                           BLOCK=min(1024, triton.next_power_of_2(max(group_size, 16))),
                                           **launch_opts())
    return q, s


@register("int8_dynamic_int4_mm")
def int8_dynamic_int4_mm(x, packed_w, scale, zero_point, group_size, is_signed):
    """x float ``[M, K]`` (padded to the weight's K by the caller) -> ``[M, N]`` in x's dtype: x quantized per row
    and group (above), then the Triton W4A16 kernel on the dequantized activations ``codes * scale`` (one fp32
    product each, exact up to that rounding), in fp32. A composite, not a fused kernel: the GPU path for
    correctness; the fused decode kernel is the CPU one (csrc/cpu/int_gemm_avx2.cpp, w4q8_tile)."""
    from .int_gemm import int4_weight_only_mm

    M, K = x.shape
    qx, sx = quantize_per_group_int8(x, group_size)
    xd = (qx.float().reshape(M, -1, group_size) * sx.unsqueeze(-1)).reshape(M, K)
    return int4_weight_only_mm(xd, packed_w, scale, zero_point, group_size, is_signed).to(x.dtype)
