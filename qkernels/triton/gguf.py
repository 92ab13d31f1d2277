"""Triton decode for the GGUF (llama.cpp) block formats: ``gguf_dequantize`` and ``gguf_mm`` on GPUs.

One kernel, specialised per ggml type by a constexpr: every program decodes ``BLOCK`` consecutive values of the
flattened ``[rows, cols]`` tensor, i.e. ``BLOCK / block_size`` whole ggml blocks (BLOCK is a multiple of 256, so a
program never splits a block). Each value gathers the bytes it needs (its fp16 d / dmin, its sub-block scale, its
quant bits) straight from the uint8 block data; neighbouring values read the same bytes, which the L1 cache serves.

The decode is bit-exact with :mod:`qkernels.reference.gguf` (and so with ggml's ``dequantize_row_*`` and gguf-py):
the same float32 operations in the same order (e.g. Q4_K is ``(d * sc) * q - (dmin * m)``, two roundings each,
never an FMA: kernels are launched with ``enable_fp_fusion=False``); fp16 fields are widened from their bits, which
is exact; bf16 outputs are rounded to nearest even by hand on the bits (``float_cast.store_float``).

``gguf_mm`` dequantizes the weight with this kernel and multiplies with torch's matmul (cuBLAS): a fused
dequant-GEMM kernel is later work. Layout of every type: the table in :mod:`qkernels.reference.gguf`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference.gguf import GGML, describe_types, types_with
from . import register
from ._common import launch_opts, store_float

BLOCK = 1024  # values per program: 32 blocks of 32 or 4 super-blocks of 256
# the types this kernel decodes and the byte offset of each one's (low) quant bits: the reference's type table, whose
# ``kernels`` column is also what qkernels.triton.has_kernel tells the dispatch table
TYPES = types_with("triton", "gguf_dequantize")
_QS = {t: GGML[t].quant_offset for t in TYPES}
# output dtypes the kernel stores directly; others are decoded to float32 and cast by torch
_DIRECT_OUT = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@triton.jit
def _u8(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0).to(tl.int32)


@triton.jit
def _fp16(ptr, offs, mask):
    """The little-endian fp16 at byte ``offs``, widened to fp32 (exact)."""
    bits = _u8(ptr, offs, mask) | (_u8(ptr, offs + 1, mask) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _int8(ptr, offs, mask):
    return tl.load(ptr + offs, mask=mask, other=0).to(tl.int8, bitcast=True).to(tl.int32)


@triton.jit
def _scale_min_k4(ptr, base, s, mask):
    """ggml get_scale_min_k4: the 6-bit scale and min of sub-block ``s`` (0..7) from the 12 bytes at ``base``."""
    lo = s < 4
    sl = tl.where(lo, s, s - 4)
    a = _u8(ptr, base + sl, mask)  # scales[s] / scales[s - 4]
    b = _u8(ptr, base + 4 + sl, mask)  # scales[s + 4] / scales[s]
    c = _u8(ptr, base + 8 + sl, mask)  # scales[s + 4] (only for s >= 4)
    sc = tl.where(lo, a & 63, (c & 0xF) | ((a >> 6) << 4))
    mn = tl.where(lo, b & 63, (c >> 4) | ((b >> 6) << 4))
    return sc, mn


@triton.jit
def _gguf_dequantize_kernel(data_ptr, out_ptr, n, TYPE: tl.constexpr, BS: tl.constexpr, TS: tl.constexpr,
                            QS: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """QS: byte offset of the quant bits in a block (_QS)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = (offs // BS) * TS  # first byte of this value's block
    j = (offs % BS).to(tl.int32)  # position in the block
    if TYPE == 8:  # Q8_0: d | 32 x int8
        v = _int8(data_ptr, base + QS + j, mask).to(tl.float32) * _fp16(data_ptr, base, mask)
    elif TYPE == 2 or TYPE == 3 or TYPE == 6 or TYPE == 7:
        # Q4_0 / Q4_1 / Q5_0 / Q5_1: value j is the low nibble of byte j % 16 for j < 16, the high one after
        q = (_u8(data_ptr, base + QS + (j % 16), mask) >> (4 * (j // 16))) & 0xF
        if TYPE == 6 or TYPE == 7:  # 5th bit: bit j of the little-endian u32 before the nibbles
            q = q | (((_u8(data_ptr, base + QS - 4 + j // 8, mask) >> (j % 8)) & 1) << 4)
        d = _fp16(data_ptr, base, mask)
        if TYPE == 2:
            v = d * (q - 8).to(tl.float32)
        elif TYPE == 6:
            v = d * (q - 16).to(tl.float32)
        else:
            v = d * q.to(tl.float32) + _fp16(data_ptr, base + 2, mask)
    elif TYPE == 39:  # MXFP4: e8m0 | e2m1 nibbles (same halves layout); value = 2^(e-128) * (2 * e2m1)
        e = _u8(data_ptr, base, mask)
        # ggml_e8m0_to_fp32_half: e < 2 is a subnormal float32
        scale = tl.where(e < 2, 0x00200000 << e, (e - 1) << 23).to(tl.float32, bitcast=True)
        c = (_u8(data_ptr, base + QS + (j % 16), mask) >> (4 * (j // 16))) & 0xF
        m = c & 7  # 2 * e2m1 magnitude: 0 1 2 3 4 6 8 12
        mag = tl.where(m < 4, m, (4 + 2 * (m & 1)) << ((m >> 1) & 1))
        v = scale * tl.where(c >= 8, -mag, mag).to(tl.float32)  # -0 codes give +0, like KVALUES_MXFP4
    elif TYPE == 12 or TYPE == 13:  # Q4_K / Q5_K: d | dmin | 12 B scales+mins | (Q5_K: 32 B qh) | 128 B nibbles
        s = j // 32
        sc, mn = _scale_min_k4(data_ptr, base + 4, s, mask)
        dl = _fp16(data_ptr, base, mask) * sc.to(tl.float32)
        ml = _fp16(data_ptr, base + 2, mask) * mn.to(tl.float32)
        # 64 values per 32 bytes: the low nibbles, then the high nibbles
        q = (_u8(data_ptr, base + QS + 32 * (j // 64) + (j % 32), mask) >> (4 * (s % 2))) & 0xF
        if TYPE == 13:
            q = q | (((_u8(data_ptr, base + 16 + (j % 32), mask) >> s) & 1) << 4)
        v = dl * q.to(tl.float32) - ml
    elif TYPE == 14:  # Q6_K: 128 B ql | 64 B qh | 16 x int8 scales | d; per 128 values: 4 groups of 32
        h = j // 128
        k = (j // 32) % 4
        lane = j % 32
        lo = (_u8(data_ptr, base + QS + 64 * h + 32 * (k % 2) + lane, mask) >> (4 * (k // 2))) & 0xF
        hi = (_u8(data_ptr, base + 128 + 32 * h + lane, mask) >> (2 * k)) & 3
        dl = _fp16(data_ptr, base + 208, mask) * _int8(data_ptr, base + 192 + j // 16, mask).to(tl.float32)
        v = dl * ((lo | (hi << 4)) - 32).to(tl.float32)
    else:  # Q2_K / Q3_K: 2-bit quants, per 128 values byte l holds values l, l+32, l+64, l+96
        q = (_u8(data_ptr, base + QS + 32 * (j // 128) + (j % 32), mask) >> (2 * ((j // 32) % 4))) & 3
        s = j // 16
        if TYPE == 10:  # Q2_K: 16 B scales (4-bit scale | 4-bit min << 4) | 64 B quants | d | dmin
            b = _u8(data_ptr, base + s, mask)
            dl = _fp16(data_ptr, base + 80, mask) * (b & 0xF).to(tl.float32)
            ml = _fp16(data_ptr, base + 82, mask) * (b >> 4).to(tl.float32)
            v = dl * q.to(tl.float32) - ml
        else:  # Q3_K: 32 B hmask | 64 B quants | 12 B 6-bit scales | d; a clear hmask bit subtracts 4
            hbit = (_u8(data_ptr, base + (j % 32), mask) >> (j // 32)) & 1
            lo4 = (_u8(data_ptr, base + 96 + (s % 8), mask) >> (4 * (s // 8))) & 0xF
            hi2 = (_u8(data_ptr, base + 104 + (s % 4), mask) >> (2 * (s // 4))) & 3
            dl = _fp16(data_ptr, base + 108, mask) * ((lo4 | (hi2 << 4)) - 32).to(tl.float32)
            v = dl * (q - 4 * (1 - hbit)).to(tl.float32)
    store_float(out_ptr, offs, v, mask, OUT_BF16)


@register("gguf_dequantize")
def gguf_dequantize(data: torch.Tensor, type: int, rows: int, cols: int, out_dtype: torch.dtype) -> torch.Tensor:
    """data: uint8 [rows, cols / block * type_size] (ggml blocks, row-major) -> [rows, cols] in out_dtype.
    Types without a kernel (F32/F16/BF16 are plain casts) raise ValueError: the dispatch table only routes
    :data:`TYPES` here."""
    if type not in TYPES:
        raise ValueError(f"type must be a ggml type with a Triton decoder ({describe_types(TYPES)}), got {type}")
    bs, ts = GGML[type].block, GGML[type].size
    kernel_dtype = out_dtype if out_dtype in _DIRECT_OUT else torch.float32
    out = torch.empty((rows, cols), dtype=kernel_dtype, device=data.device)
    n = rows * cols
    if n:
        bf16 = kernel_dtype == torch.bfloat16
        dst = out.view(torch.int16) if bf16 else out  # bf16 is stored as its rounded bits (store_float)
        _gguf_dequantize_kernel[(triton.cdiv(n, BLOCK),)](data.contiguous(), dst, n, TYPE=type, BS=bs, TS=ts,
                                                          QS=_QS[type], OUT_BF16=bf16, BLOCK=BLOCK, **launch_opts())
    return out.to(out_dtype)


@register("gguf_mm")
def gguf_mm(x: torch.Tensor, data: torch.Tensor, type: int, N: int, K: int) -> torch.Tensor:
    """x: float [M, K] @ dequant(data: uint8 [N, K / block * type_size])^T -> [M, N] in x's dtype.

    Not fused: the weight is decoded to a temporary in x's dtype for fp16/bf16 x (cuBLAS then accumulates in fp32;
    the decoded values are rounded once to x's dtype, so results are within the bf16/fp16 GEMM tolerance of the
    reference, not bit-equal) and to fp32 otherwise (fp32 matmul, like the reference)."""
    wdt = x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float32
    w = gguf_dequantize(data, type, N, K, wdt)
    return (x.to(wdt) @ w.t()).to(x.dtype)
