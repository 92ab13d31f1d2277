"""Triton weight-only GEMMs with fp8 / fp4 weights (``fp8_weight_only_mm``, ``fp4_weight_only_mm``): the GPU
fallback where the CUDA extension is absent, and the ROCm path.

Same structure as the integer kernel in :mod:`.int_gemm` (and its tile configurations, autotuning and split-K):
each program decodes a ``[BLOCK_K, BLOCK_N]`` tile of the weight in registers and feeds it to ``tl.dot``. Decoding
is a table lookup built from the reference (256 fp32 values per fp8 format, 16 per fp4 element format) times the
block scale: the scale grid ``[N / br, K / bc]`` for fp8, a 256-entry table of block-scale codes for fp4 (e8m0 for
MXFP4, e4m3 times the tensor scale for NVFP4). The decoded weight is rounded to x's dtype for the dot (fp32 x: an
IEEE fp32 dot), the sums stay fp32, and the host applies x's row factors (int_gemm.row_factors) and adds the bias
in fp64 before the one rounding to x's dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference import float4 as ref4
from . import register
from ._common import value_table
from .int_gemm import (GEMM_CONFIGS, INTERPRET_CONFIG, dot_acc, finish_raw, k_step, launch, prune_configs,
                       row_factor_loads, row_factors, store_tile, tile_start)


@triton.jit
def _float_weight_mm_kernel(x_ptr, f_ptr, w_ptr, s_ptr, lut_ptr, slut_ptr, out_ptr, M, N, K, br, bc, nbc, m_bucket,
                            FP4: tl.constexpr, B: tl.constexpr, FP32_X: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    offs_m, offs_n, m_mask, n_mask, acc, per_split = tile_start(M, N, K, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K)
    xa, xb, _ = row_factor_loads(f_ptr, offs_m, m_mask, M)  # x's range guard (int_gemm.row_factors)
    for i in range(0, per_split):
        offs_k, x, wmask = k_step(x_ptr, offs_m, m_mask, n_mask, i, per_split, K, xa, xb, BLOCK_K)
        if FP4:
            # [BLOCK_K, BLOCK_N]: element k of row n is nibble (k % 2) of byte k // 2; block scale code per B elements
            b = tl.load(w_ptr + offs_n[None, :] * (K // 2) + (offs_k // 2)[:, None], mask=wmask, other=0).to(tl.int32)
            v = tl.load(lut_ptr + ((b >> ((offs_k % 2) * 4)[:, None]) & 0xF))
            sc = tl.load(s_ptr + offs_n[None, :] * (K // B) + (offs_k // B)[:, None], mask=wmask, other=0)
            s = tl.load(slut_ptr + sc.to(tl.int32))
        else:
            code = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None], mask=wmask, other=0).to(tl.int32)
            v = tl.load(lut_ptr + code)
            s = tl.load(s_ptr + (offs_n // br)[None, :] * nbc + (offs_k // bc)[:, None], mask=wmask, other=0.0)
        acc = dot_acc(acc, x, tl.where(wmask, v * s, 0.0), FP32_X)  # masked lanes: 0, even for a NaN table entry
    # into the zeroed fp32 buffer (sums of the scaled rows); the host applies the row factors (int_gemm.finish_raw)
    store_tile(out_ptr, acc, offs_m, offs_n, m_mask, n_mask, N, SPLIT_K)


_KEY = ["m_bucket", "N", "K", "FP4", "FP32_X"]
_tuned = triton.autotune(configs=GEMM_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": prune_configs},
                         reset_to_zero=["out_ptr"])(_float_weight_mm_kernel)

_E8M0: dict = {}


def _block_scale_lut(nv: bool, g: torch.Tensor, device) -> torch.Tensor:
    """fp32 factor of every fp4 block-scale code: e4m3 value times the tensor scale g (NVFP4), or the e8m0 power of
    two (MXFP4); the value tables are the reference's, built once per device."""
    if nv:
        return value_table(torch.float8_e4m3fn, device) * g.to(device).float().reshape(())
    key = str(device)
    if key not in _E8M0:
        _E8M0[key] = ref4.e8m0_to_float(torch.arange(256, dtype=torch.int32)).float().to(device)
    return _E8M0[key]


def _run(x, w, s, lut, slut, N, br, bc, nbc, fp4, B, bias, config):
    M, K = x.shape
    if M == 0 or N == 0 or K == 0:
        out = torch.zeros((M, N), dtype=torch.float32, device=x.device)
    else:
        m_bucket = min(triton.next_power_of_2(M), 4096)
        if config is None and os.environ.get("TRITON_INTERPRET") == "1":
            config = INTERPRET_CONFIG
        out = torch.zeros((M, N), dtype=torch.float32, device=x.device)  # split-K programs accumulate into it
        xc = x.contiguous()
        factors = row_factors(xc)
        args = (xc, factors, w.contiguous(), s.contiguous(), lut, slut, out, M, N, K, br, bc, nbc, m_bucket)
        flags = dict(FP4=fp4, B=B, FP32_X=x.dtype == torch.float32)
        launch(_float_weight_mm_kernel, _tuned, args, flags, M, N, config)
        return finish_raw(out, factors, None, bias, x.dtype)
    if bias is not None:
        out += bias.float()
    return out.to(x.dtype)


@register("fp8_weight_only_mm")
def fp8_weight_only_mm(x, w, w_scale, w_dtype, bias, *, config=None):
    """x float ``[M, K]``; w uint8 ``[N, K]`` (``w_dtype`` bits); w_scale fp32 ``[N / br, K / bc]``; bias ``[N]`` or
    None -> ``[M, N]`` in x's dtype."""
    N, K = w.shape
    G0, G1 = w_scale.shape
    br, bc = (N // G0 if G0 else 1), (K // G1 if G1 else 1)
    lut = value_table(w_dtype, x.device)
    return _run(x, w, w_scale.float(), lut, lut, N, br, bc, G1, False, 1, bias, config)


@register("fp4_weight_only_mm")
def fp4_weight_only_mm(x, w, w_scale, w_global_scale, format, element, bias, *, config=None):
    """x float ``[M, K]``; w uint8 ``[N, K/2]``; w_scale uint8 codes ``[N, K/B]``; w_global_scale fp32 0-d (1 for
    mxfp4) -> ``[M, N]`` in x's dtype."""
    nv = format == "nvfp4"
    B = ref4.FORMATS[format]
    slut = _block_scale_lut(nv, w_global_scale, x.device)
    return _run(x, w, w_scale, value_table(element, x.device), slut, w.shape[0], 1, 1, 1, True, B, bias, config)
