"""Triton W4A16 / W8A16 dequant-GEMMs (same ops and layouts as csrc/cuda/int_gemm.cu).

One kernel for both: each program owns a ``BLOCK_M x BLOCK_N`` output tile and a slice of K (split-K, so that
decode-sized M still launches enough programs to fill the GPU). Weights are loaded as a ``[BLOCK_K, BLOCK_N]`` tile
straight from the ``[N, K]`` (int8) or ``[N, K/2]`` (packed int4) storage, decoded in registers
(``scale * (q - zero_point)`` in fp32, then x's dtype) and fed to ``tl.dot`` with an fp32 accumulator; int8 weights
are exact in fp16/bf16, so W8A16 applies its per-row scale to the accumulator instead. Split-K partial sums meet
in an fp32 buffer through ``tl.atomic_add``; without split-K (prefill-sized M) the kernel stores x's dtype directly.
fp32 activations use an IEEE fp32 dot (no TF32).

Range: each row of x enters the dot scaled by a power of two (``row_factors``) so that its largest |x| is below
2^-ceil(log2 K) (fp32 / bf16 x; fp16 x: below 1, its normal range being short): then no fp32 sum of x * w
overflows for any finite weight, subnormal x keeps its bits, and the epilogue multiplies the factor back (with
W8A16's per-row scale) in fp64, rounded once. Rows with NaN / inf keep factor 1: their products are IEEE's, as in
the reference. What stays approximate: weights below ~2^-100 / K, whose products with the scaled x are subnormal.

On a GPU the tile sizes are autotuned per (M bucket, N, K); under ``TRITON_INTERPRET=1`` (CPU tests) a fixed small
configuration runs instead, and tests may force one with ``config=``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import register


# ---- pieces shared with the fp8 / fp4 weight-only kernel (float_gemm.py) -----------------------------------------


@triton.jit
def tile_start(M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """This program's output rows and columns, their masks, a zeroed fp32 accumulator and the number of K steps of
    its split."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return offs_m, offs_n, offs_m < M, offs_n < N, acc, tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)


@triton.jit
def k_step(x_ptr, offs_m, m_mask, n_mask, i, per_split, K, xa, xb, BLOCK_K: tl.constexpr):
    """K indices of step i of this program's K split, their mask, the x tile (times its rows' factors xa * xb, see
    row_factors) and the weight tile's mask. Tiles past the end (uneven splits) are fully masked and add zero."""
    offs_k = (tl.program_id(2) * per_split + i) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    x = ((x.to(tl.float32) * xa[:, None]) * xb[:, None]).to(x.dtype)  # powers of two: exact
    return offs_k, x, k_mask[:, None] & n_mask[None, :]


@triton.jit
def row_factor_loads(f_ptr, offs_m, m_mask, M):
    """The factors of this program's rows: x's (two fp32 powers of two, their product may leave fp32's range) and
    the output's (one fp64 power of two)."""
    xa = tl.load(f_ptr + offs_m, mask=m_mask, other=1.0)
    xb = tl.load(f_ptr + M + offs_m, mask=m_mask, other=1.0)
    oa = tl.load(f_ptr + 2 * M + offs_m, mask=m_mask, other=1.0)
    ob = tl.load(f_ptr + 3 * M + offs_m, mask=m_mask, other=1.0)
    return xa, xb, oa.to(tl.float64) * ob.to(tl.float64)


@triton.jit
def dot_acc(acc, x, w, FP32_X: tl.constexpr):
    """acc += x @ w: an IEEE fp32 dot for fp32 x (no TF32), else w rounded to x's dtype."""
    if FP32_X:
        acc += tl.dot(x, w, input_precision="ieee")
    else:
        acc += tl.dot(x, w.to(x.dtype))
    return acc


@triton.jit
def store_tile(out_ptr, acc, offs_m, offs_n, m_mask, n_mask, N, SPLIT_K: tl.constexpr):
    """Without split-K: store (rounded once to the buffer's dtype); with it: atomically add into a zeroed fp32 buffer."""
    out_ptrs = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc.to(tl.float32), mask=out_mask)


@triton.jit
def _weight_only_mm_kernel(x_ptr, f_ptr, w_ptr, scale_ptr, zp_ptr, out_ptr, M, N, K, group_size, n_groups, m_bucket,
                           IS_INT4: tl.constexpr, IS_SIGNED: tl.constexpr, HAS_ZP: tl.constexpr,
                           FP32_X: tl.constexpr, RAW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    offs_m, offs_n, m_mask, n_mask, acc, per_split = tile_start(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)
    xa, xb, of = row_factor_loads(f_ptr, offs_m, m_mask, M)
    for i in range(0, per_split):
        offs_k, x, wmask = k_step(x_ptr, offs_m, m_mask, n_mask, i, per_split, K, xa, xb, BLOCK_K)
        if IS_INT4:
            # [BLOCK_K, BLOCK_N]: element k of row n is nibble (k % 2) of byte k // 2
            b = tl.load(w_ptr + offs_n[None, :] * (K // 2) + (offs_k // 2)[:, None], mask=wmask, other=0)
            q = (b.to(tl.int32) >> ((offs_k % 2) * 4)[:, None]) & 0xF
            if IS_SIGNED:
                q = (q ^ 8) - 8
            gidx = offs_n[None, :] * n_groups + (offs_k // group_size)[:, None]
            if HAS_ZP:
                q = q - tl.load(zp_ptr + gidx, mask=wmask, other=0)
            w = tl.load(scale_ptr + gidx, mask=wmask, other=0.0) * q.to(tl.float32)
        else:
            w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=wmask, other=0).to(tl.float32)
        acc = dot_acc(acc, x, w, FP32_X)
    if RAW:
        # into the zeroed fp32 buffer: sums of the scaled rows, which cannot overflow; the host's epilogue applies the
        # factors (finish_raw), so partial sums of a split never overflow apart where their total does not
        store_tile(out_ptr, acc, offs_m, offs_n, m_mask, n_mask, N, SPLIT_K)
    else:
        # the epilogue in fp64 (row factor, W8A16's scale): no overflow on the way; out is x's dtype (no fp32 buffer,
        # no conversion pass): the sums are rounded once
        out = acc.to(tl.float64) * of[:, None]
        if not IS_INT4:
            out = out * tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float64)[None, :]
        store_tile(out_ptr, out, offs_m, offs_n, m_mask, n_mask, N, SPLIT_K)


def _cfg(bm, bn, bk, split, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": split}, num_warps=warps,
                         num_stages=stages)


GEMM_CONFIGS = [
    # decode (M <= 16): memory bound, split K so that few output tiles still fill every SM
    _cfg(16, 32, 128, 8, 4, 3), _cfg(16, 64, 128, 4, 4, 3), _cfg(16, 64, 256, 4, 4, 3), _cfg(16, 128, 128, 2, 4, 3),
    _cfg(16, 64, 128, 1, 4, 4),
    # small batches
    _cfg(32, 64, 128, 2, 4, 3), _cfg(64, 64, 64, 1, 4, 4), _cfg(64, 128, 64, 1, 4, 3),
    # prefill: compute bound
    _cfg(128, 128, 64, 1, 8, 3), _cfg(128, 64, 64, 1, 4, 4), _cfg(128, 256, 64, 1, 8, 3),
]


# M up to this bucket: decode / small-batch configurations, some with split-K, which accumulate into a zeroed fp32
# buffer. Beyond it: prefill configurations, all without split-K, which store x's dtype directly (no zero-fill and
# no fp32 -> dtype pass over the [M, N] output, ~10% of a prefill-sized call).
SPLIT_MAX_M = 128


def prune_configs(configs, named_args, **kwargs):
    m = named_args["m_bucket"]
    if m <= 16:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] == 16]
    elif m <= SPLIT_MAX_M:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] in (32, 64)]
    else:
        keep = [c for c in configs if c.kwargs["BLOCK_M"] >= 64 and c.kwargs["SPLIT_K"] == 1]
    return keep or configs


_KEY = ["m_bucket", "N", "K", "IS_INT4", "FP32_X"]
_tuned_kernel = triton.autotune(
    configs=GEMM_CONFIGS,
    key=_KEY,
    prune_configs_by={"early_config_prune": prune_configs},
    reset_to_zero=["out_ptr"],  # split-K configs accumulate into out: every timing run must start from zero
)(_weight_only_mm_kernel)
_tuned_kernel_no_split = triton.autotune(
    configs=[c for c in GEMM_CONFIGS if c.kwargs["SPLIT_K"] == 1],
    key=_KEY,
    prune_configs_by={"early_config_prune": prune_configs},
)(_weight_only_mm_kernel)

# the interpreter's default: small, and split-K on so the atomic path is exercised
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2}


def row_factors(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``[4, M]``: rows (a, b) scale x in the kernel, rows (c, d) its output, a * b * c * d = 1 per row, all
    powers of two (a pair: 2^e may leave fp32's range). The scaled row's largest |x| lies in [2^(-t-1), 2^-t):
    t = ceil(log2 K) for fp32 / bf16 x (so sum_k |x_k| < 1 and no fp32 sum of x * w overflows for a finite w),
    t = 0 for fp16 x (whose own range is short). Rows with NaN / inf or all zero: 1. Torch ops on x's device, no
    sync."""
    K = x.shape[1]
    t = 0 if x.dtype == torch.float16 else max(K - 1, 1).bit_length()
    amax = x.abs().amax(dim=1).float() if K else torch.zeros(x.shape[0], device=x.device)
    e = torch.frexp(amax)[1]  # amax = m * 2^e, m in [0.5, 1)
    s = torch.where(torch.isfinite(amax) & (amax > 0), -t - e, torch.zeros_like(e))

    def pair(p):  # 2^p as two fp32 powers of two
        hi = p.clamp(-126, 127)
        one = torch.ones_like(amax)
        return torch.ldexp(one, hi), torch.ldexp(one, p - hi)

    return torch.stack([*pair(s), *pair(-s)]).contiguous()


def _run(x, w, scale, zp, N, group_size, is_int4, is_signed, config=None):
    M, K = x.shape
    if M == 0 or N == 0 or K == 0:
        return torch.zeros((M, N), dtype=x.dtype, device=x.device)
    xc = x.contiguous()
    wc = w.contiguous()
    sc = scale.contiguous().float()
    zc = zp.contiguous() if zp is not None else sc  # dummy pointer, never read when HAS_ZP is False
    m_bucket = min(triton.next_power_of_2(M), 4096)
    if config is None and os.environ.get("TRITON_INTERPRET") == "1":
        config = INTERPRET_CONFIG
    # split-K sums meet in a zeroed fp32 buffer, finished afterwards; without split-K the kernel stores x's dtype
    split = config["SPLIT_K"] > 1 if config is not None else m_bucket <= SPLIT_MAX_M
    flags = dict(IS_INT4=is_int4, IS_SIGNED=bool(is_signed), HAS_ZP=zp is not None, FP32_X=x.dtype == torch.float32,
                 RAW=split)
    out = (torch.zeros((M, N), dtype=torch.float32, device=x.device) if split
           else torch.empty((M, N), dtype=x.dtype, device=x.device))
    factors = row_factors(xc)
    args = (xc, factors, wc, sc, zc, out, M, N, K, group_size, K // group_size, m_bucket)
    launch(_weight_only_mm_kernel, _tuned_kernel if split else _tuned_kernel_no_split, args, flags, M, N, config)
    return finish_raw(out, factors, None if is_int4 else sc, None, x.dtype) if split else out


def finish_raw(buf, factors, col_scale, bias, dtype):
    """The epilogue of the fp32 split-K buffer, in fp64 and rounded once to dtype: times the rows' output factors
    (row_factors), the per-column scale (W8A16) and plus the bias."""
    res = buf.double() * (factors[2].double() * factors[3].double())[:, None]
    if col_scale is not None:
        res = res * col_scale.double()[None, :]
    if bias is not None:
        res = res + bias.double()[None, :]
    return res.to(dtype)


def launch(kernel, tuned, args, flags, M, N, config):
    """Run ``kernel`` with a fixed ``config`` (tests, the interpreter) or its autotuned wrapper ``tuned``; the grid
    is (M tiles, N tiles, K splits)."""
    if config is not None:
        grid = (triton.cdiv(M, config["BLOCK_M"]), triton.cdiv(N, config["BLOCK_N"]), config["SPLIT_K"])
        kernel[grid](*args, **flags, **config)
    else:
        def grid(meta):
            return (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT_K"])

        tuned[grid](*args, **flags)


@register("int4_weight_only_mm")
def int4_weight_only_mm(x, packed_w, scale, zero_point, group_size, is_signed, *, config=None):
    """x float ``[M, K]``; packed_w uint8 ``[N, K/2]`` (element 2i in the low nibble); scale float
    ``[N, K/group_size]``; zero_point int32 of the same shape or None -> ``[M, N]`` in x's dtype."""
    return _run(x, packed_w, scale, zero_point, packed_w.shape[0], group_size, True, is_signed, config)


@register("int8_weight_only_mm")
def int8_weight_only_mm(x, q_w, scale, *, config=None):
    """x float ``[M, K]``; q_w int8 ``[N, K]``; scale float ``[N]`` -> ``[M, N]`` in x's dtype."""
    return _run(x, q_w, scale, None, q_w.shape[0], q_w.shape[1] or 1, False, True, config)
