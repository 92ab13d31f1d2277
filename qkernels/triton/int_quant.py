"""Triton kernels for int4 packing and integer affine (de)quantization (same ops as csrc/cuda/int_quant.cu).

Bit-exact with :mod:`qkernels.reference.int_quant`: fp32 arithmetic, correctly rounded division
(``tl.math.div_rn``; Triton's plain ``/`` is approximate on NVIDIA GPUs), round-half-to-even via the 1.5 * 2^23
trick, and no FMA contraction where the reference rounds a product before an add (``enable_fp_fusion=False``).
Tensors are processed flattened: groups are ``group_size`` consecutive elements of the contiguous tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import register
from ._common import launch_opts, round_half_even

BLOCK = 1024
@triton.jit
def _pack_int4_kernel(q_ptr, out_ptr, n_out, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_out
    lo = tl.load(q_ptr + 2 * offs, mask=mask, other=0).to(tl.int32)
    hi = tl.load(q_ptr + 2 * offs + 1, mask=mask, other=0).to(tl.int32)
    tl.store(out_ptr + offs, ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8), mask=mask)


@triton.jit
def _unpack_int4_kernel(p_ptr, out_ptr, n_in, IS_SIGNED: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_in
    p = tl.load(p_ptr + offs, mask=mask, other=0).to(tl.int32)
    lo = p & 0xF
    hi = (p >> 4) & 0xF
    if IS_SIGNED:
        lo = (lo ^ 8) - 8
        hi = (hi ^ 8) - 8
    tl.store(out_ptr + 2 * offs, lo.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_ptr + 2 * offs + 1, hi.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _quantize_kernel(w_ptr, scale_ptr, zp_ptr, q_ptr, n, group_size, qmin, qmax,
                     HAS_ZP: tl.constexpr, FLOAT_ZP: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = offs // group_size
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + g, mask=mask, other=1.0)
    if FLOAT_ZP:
        mn = tl.load(zp_ptr + g, mask=mask, other=0.0)
        q = round_half_even(tl.math.div_rn(w - mn, s))
    else:
        q = round_half_even(tl.math.div_rn(w, s))
        if HAS_ZP:
            q = q + tl.load(zp_ptr + g, mask=mask, other=0).to(tl.float32)
    q = tl.minimum(tl.maximum(q, qmin), qmax)
    tl.store(q_ptr + offs, q.to(tl.int32).to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequantize_kernel(q_ptr, scale_ptr, zp_ptr, out_ptr, n, group_size,
                       HAS_ZP: tl.constexpr, FLOAT_ZP: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = offs // group_size
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    s = tl.load(scale_ptr + g, mask=mask, other=1.0)
    if FLOAT_ZP:
        mn = tl.load(zp_ptr + g, mask=mask, other=0.0)
        w = s * q.to(tl.float32) + mn
    else:
        if HAS_ZP:
            q = q - tl.load(zp_ptr + g, mask=mask, other=0)
        w = s * q.to(tl.float32)
    if OUT_BF16:
        # fp32 -> bf16 rounding to nearest even by hand on the bits (out_ptr is the bf16 tensor viewed as int16):
        # the Triton interpreter truncates bf16 casts, and this keeps CPU tests and GPUs bit-identical
        bits = w.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + offs, bits.to(tl.int16), mask=mask)
    else:
        tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _choose_qparams_kernel(w_ptr, scale_ptr, zp_ptr, group_size, qmin, qmax, levels, sym_max, sym_zp,
                           SYMMETRIC: tl.constexpr, FLOAT_ZP: tl.constexpr, BLOCK: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    vmin = tl.full([BLOCK], float("inf"), tl.float32)
    vmax = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, group_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < group_size
        v = tl.load(w_ptr + g * group_size + offs, mask=mask, other=0.0).to(tl.float32)
        vmin = tl.minimum(vmin, tl.where(mask, v, float("inf")))
        vmax = tl.maximum(vmax, tl.where(mask, v, float("-inf")))
    mn = tl.min(vmin, axis=0)
    mx = tl.max(vmax, axis=0)
    if FLOAT_ZP:
        s = tl.math.div_rn(mx - mn, levels)
        s = tl.where(s > 0, s, 1.0)
        tl.store(scale_ptr + g, s)
        tl.store(zp_ptr + g, mn)
    else:
        lo = tl.minimum(mn, 0.0)
        hi = tl.maximum(mx, 0.0)
        if SYMMETRIC:
            s = tl.math.div_rn(tl.maximum(-lo, hi), sym_max)
            s = tl.where(s > 0, s, 1.0)
            zp = sym_zp.to(tl.float32)
        else:
            s = tl.math.div_rn(hi - lo, qmax - qmin)
            s = tl.where(s > 0, s, 1.0)
            zp = qmin - round_half_even(tl.math.div_rn(lo, s))
            zp = tl.minimum(tl.maximum(zp, qmin), qmax)
        tl.store(scale_ptr + g, s)
        tl.store(zp_ptr + g, zp.to(tl.int32))


@register("choose_qparams_affine")
def choose_qparams_affine(w, bits, group_size, symmetric, is_signed, float_zero_point):
    """w float ``[..., K]`` -> (scale fp32, zero_point int32 or fp32 group minima) of shape
    ``[..., K / group_size]``; one program per group."""
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or inf; quantization needs finite values")
    pshape = (*w.shape[:-1], w.shape[-1] // group_size)
    scale = torch.empty(pshape, dtype=torch.float32, device=w.device)
    zp = torch.empty(pshape, dtype=torch.float32 if float_zero_point else torch.int32, device=w.device)
    if scale.numel():
        qmin, qmax = _int_range(bits, bool(is_signed))
        block = min(1024, triton.next_power_of_2(group_size))
        _choose_qparams_kernel[(scale.numel(),)](
            w.contiguous(), scale, zp, group_size, float(qmin), float(qmax), float((1 << bits) - 1),
            float((1 << (bits - 1)) - 1), 0 if is_signed else (1 << (bits - 1)), SYMMETRIC=bool(symmetric),
            FLOAT_ZP=bool(float_zero_point), BLOCK=block, **launch_opts())
    return scale, zp


def _grid(n):
    return (triton.cdiv(n, BLOCK),)


@register("pack_int4")
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 [-8, 7] / uint8 [0, 15] codes ``[..., K]`` (K even) -> uint8 ``[..., K/2]``, element 2i low nibble."""
    if q.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"q must have dtype int8/uint8, got {q.dtype}")
    if q.dim() == 0 or q.shape[-1] % 2:
        raise ValueError(f"the last dim of q must be even to pack two int4 per byte, got shape {tuple(q.shape)}")
    lo, hi = (-8, 7) if q.dtype == torch.int8 else (0, 15)
    if q.numel() and bool(((q < lo) | (q > hi)).any()):
        raise ValueError(f"q has values outside the int4 range [{lo}, {hi}] for dtype {q.dtype}")
    qc = q.contiguous()
    out = torch.empty((*q.shape[:-1], q.shape[-1] // 2), dtype=torch.uint8, device=q.device)
    if out.numel():
        _pack_int4_kernel[_grid(out.numel())](qc, out, out.numel(), BLOCK=BLOCK)
    return out


@register("unpack_int4")
def unpack_int4(packed: torch.Tensor, is_signed: bool) -> torch.Tensor:
    """uint8 ``[..., K/2]`` -> int8 in [-8, 7] (is_signed) or uint8 in [0, 15], ``[..., K]``."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed must have dtype uint8, got {packed.dtype}")
    pc = packed.contiguous()
    out = torch.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=torch.int8 if is_signed else torch.uint8,
                      device=packed.device)
    if pc.numel():
        _unpack_int4_kernel[_grid(pc.numel())](pc, out, pc.numel(), IS_SIGNED=bool(is_signed), BLOCK=BLOCK)
    return out


def _int_range(bits, is_signed):
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if is_signed else (0, (1 << bits) - 1)


@register("quantize_affine")
def quantize_affine(w, scale, zero_point, bits, group_size, is_signed, float_zero_point):
    """w float ``[..., K]``, scale fp32 ``[..., K/group_size]``, zero_point int32 (or fp32 minima when
    float_zero_point) of the same shape or None -> int8 (is_signed) / uint8 codes ``[..., K]``."""
    if float_zero_point and zero_point is None:
        raise ValueError("zero_point (the group minimum) is required when float_zero_point=True")
    if w.numel() and not bool(torch.isfinite(w).all()):
        raise ValueError("w contains NaN or inf; quantization needs finite values")
    signed = bool(is_signed) and not float_zero_point
    qmin, qmax = (0, (1 << bits) - 1) if float_zero_point else _int_range(bits, signed)
    q = torch.empty(w.shape, dtype=torch.int8 if signed else torch.uint8, device=w.device)
    n = w.numel()
    if n:
        wc, sc = w.contiguous(), scale.contiguous().float()
        zc = zero_point.contiguous() if zero_point is not None else sc  # dummy pointer when absent
        _quantize_kernel[_grid(n)](wc, sc, zc, q, n, group_size, float(qmin), float(qmax),
                                   HAS_ZP=zero_point is not None, FLOAT_ZP=bool(float_zero_point), BLOCK=BLOCK,
                                   **launch_opts())
    return q


@register("dequantize_affine")
def dequantize_affine(q, scale, zero_point, group_size, float_zero_point, out_dtype):
    """int8/uint8 codes ``[..., K]`` -> ``scale * (q - zero_point)`` (or ``scale * q + min``) in out_dtype."""
    if float_zero_point and zero_point is None:
        raise ValueError("zero_point (the group minimum) is required when float_zero_point=True")
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    n = q.numel()
    if n:
        qc, sc = q.contiguous(), scale.contiguous().float()
        zc = zero_point.contiguous() if zero_point is not None else sc
        bf16 = out_dtype == torch.bfloat16
        _dequantize_kernel[_grid(n)](qc, sc, zc, out.view(torch.int16) if bf16 else out, n, group_size,
                                     HAS_ZP=zero_point is not None, FLOAT_ZP=bool(float_zero_point),
                                     OUT_BF16=bf16, BLOCK=BLOCK, **launch_opts())
    return out
