"""Triton kernels for the fp8 and fp4 casts (same ops as csrc/cuda/float_cast.cu): the GPU fallback where the CUDA
extension is absent or lacks the arch, and the ROCm path (e4m3fnuz / e5m2fnuz on MI300).

Bit-exact with :mod:`qkernels.reference.float8` / :mod:`qkernels.reference.float4`:

* encoding is the integer-arithmetic conversion of csrc/include/qkernels/float8.h (``minifloat_encode``), ported
  line by line: round to nearest even on the fp32 bits, subnormals through one fp32 add of a power of two,
  saturation / IEEE overflow / NaN codes as the spec says. It does not use the GPU's fp8 conversion instructions:
  the same code then runs on every GPU and under the CPU interpreter, and the fnuz and non-saturating variants
  (which have no instruction) come for free;
* decoding is a table lookup (256 fp32 values per fp8 format, 16 per fp4 element format) built from the
  reference, then one fp32 product with the block scale;
* divisions are correctly rounded (``tl.math.div_rn``: Triton's ``/`` is approximate on NVIDIA GPUs);
* block maxima and the per-block fp8 scales (``amax / fp8_max``) and the NVFP4 per-tensor scale are computed with
  the reference's own PyTorch expressions (exact reductions, true division) before the cast kernels run;
* bf16 outputs are rounded to nearest even by hand on the bits (the interpreter truncates fp32 -> bf16 casts).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import float4 as ref4
from ..reference import float8 as ref8
from ..reference import minifloat
from . import register
from ._common import kernel_input, launch_opts, load_f32, store_float, value_table

BLOCK = 1024
BLOCKS_PER_PROGRAM = 32  # MXFP4 / NVFP4 blocks quantized by one program


def _encoder(fmt, saturate: bool) -> dict:
    """float8.h make_encoder as constexpr kernel arguments (ENC_*) for ``fmt`` (an fp8 dtype or an fp4 element
    name), from the reference's format table. OVF = -1 stands for "overflow is NaN"."""
    f = minifloat.fmt(fmt)
    ebits, m, bias, has_inf, fnuz, has_nan, max_code = f.ebits, f.mbits, f.bias, f.has_inf, f.fnuz, f.has_nan, \
        f.max_code
    nbits = ebits + m

    def nan_code(sign):
        if fnuz:
            return 0x80
        if not has_nan:
            return 1 << nbits  # -0: the fp4 elements have no NaN
        return (sign << nbits) | ((1 << nbits) - 1)

    sat = saturate or not has_nan
    ovf = max_code if sat else ((((1 << ebits) - 1) << m) if has_inf else -1)
    return dict(ENC_MIN_NORMAL=(128 - bias) << 23, ENC_MAGIC_BITS=(151 - bias - m) << 23,
                ENC_MAGIC=2.0 ** (24 - bias - m), ENC_ROUND_HALF=(1 << (22 - m)) - 1, ENC_SHIFT=23 - m,
                ENC_REBIAS=(127 - bias) << m, ENC_MAX_CODE=max_code, ENC_OVF=ovf, ENC_NBITS=nbits,
                ENC_NAN_POS=nan_code(0), ENC_NAN_NEG=nan_code(1), ENC_ZERO_MASK=0 if fnuz else 0xFF)


# the NVFP4 block scale encoder: e4m3fn, saturating
_S = _encoder(torch.float8_e4m3fn, True)
_S_MIN_NORMAL, _S_MAGIC_BITS = (tl.constexpr(_S[k]) for k in ("ENC_MIN_NORMAL", "ENC_MAGIC_BITS"))
_S_MAGIC = tl.constexpr(_S["ENC_MAGIC"])
_S_ROUND_HALF, _S_SHIFT, _S_REBIAS = (tl.constexpr(_S[k]) for k in ("ENC_ROUND_HALF", "ENC_SHIFT", "ENC_REBIAS"))
_S_MAX_CODE, _S_OVF, _S_NBITS = (tl.constexpr(_S[k]) for k in ("ENC_MAX_CODE", "ENC_OVF", "ENC_NBITS"))
_S_NAN_POS, _S_NAN_NEG, _S_ZERO_MASK = (tl.constexpr(_S[k]) for k in ("ENC_NAN_POS", "ENC_NAN_NEG", "ENC_ZERO_MASK"))


@triton.jit
def _encode(v, ENC_MIN_NORMAL: tl.constexpr, ENC_MAGIC_BITS: tl.constexpr, ENC_MAGIC: tl.constexpr,
            ENC_ROUND_HALF: tl.constexpr, ENC_SHIFT: tl.constexpr, ENC_REBIAS: tl.constexpr,
            ENC_MAX_CODE: tl.constexpr, ENC_OVF: tl.constexpr, ENC_NBITS: tl.constexpr, ENC_NAN_POS: tl.constexpr,
            ENC_NAN_NEG: tl.constexpr, ENC_ZERO_MASK: tl.constexpr):
    """fp32 -> code (int32) exactly as float8.h minifloat_encode; int64 intermediates, so nothing wraps."""
    u = v.to(tl.int32, bitcast=True)
    sign = ((u >> 31) & 1).to(tl.int64)
    a32 = u & 0x7FFFFFFF
    a = a32.to(tl.int64)
    # subnormal result: the fp32 add rounds |v| to the subnormal spacing (RNE); the bit difference is the code
    sub = (a32.to(tl.float32, bitcast=True) + ENC_MAGIC).to(tl.int32, bitcast=True).to(tl.int64) - ENC_MAGIC_BITS
    nor = ((a + ENC_ROUND_HALF + ((a >> ENC_SHIFT) & 1)) >> ENC_SHIFT) - ENC_REBIAS
    code = tl.where(a < ENC_MIN_NORMAL, sub, nor)
    code = tl.where((a >= 0x7F800000) | (code > ENC_MAX_CODE), ENC_OVF, code)
    signed = sign << ENC_NBITS
    out = tl.where(code == 0, signed & ENC_ZERO_MASK, signed | code)
    is_nan = (a > 0x7F800000) | (code < 0)
    return tl.where(is_nan, tl.where(sign != 0, ENC_NAN_NEG, ENC_NAN_POS), out).to(tl.int32)


@triton.jit
def _block_scale(s_ptr, offs, mask, C, br, bc, nbc):
    """The scale of flat element ``offs`` of a [R, C] tensor scaled per (br x bc) block (nbc blocks per row)."""
    r = offs // C
    c = offs - r * C
    return tl.load(s_ptr + (r // br) * nbc + c // bc, mask=mask, other=1.0)


@triton.jit
def _quantize_fp8_kernel(x_ptr, s_ptr, q_ptr, n, C, br, bc, nbc, IN_BF16: tl.constexpr, BLOCK: tl.constexpr,
                         ENC_MIN_NORMAL: tl.constexpr, ENC_MAGIC_BITS: tl.constexpr, ENC_MAGIC: tl.constexpr,
                         ENC_ROUND_HALF: tl.constexpr, ENC_SHIFT: tl.constexpr, ENC_REBIAS: tl.constexpr,
                         ENC_MAX_CODE: tl.constexpr, ENC_OVF: tl.constexpr, ENC_NBITS: tl.constexpr,
                         ENC_NAN_POS: tl.constexpr, ENC_NAN_NEG: tl.constexpr, ENC_ZERO_MASK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = _block_scale(s_ptr, offs, mask, C, br, bc, nbc)
    v = tl.math.div_rn(load_f32(x_ptr, offs, mask, IN_BF16), s)
    code = _encode(v, ENC_MIN_NORMAL, ENC_MAGIC_BITS, ENC_MAGIC, ENC_ROUND_HALF, ENC_SHIFT, ENC_REBIAS, ENC_MAX_CODE,
                   ENC_OVF, ENC_NBITS, ENC_NAN_POS, ENC_NAN_NEG, ENC_ZERO_MASK)
    tl.store(q_ptr + offs, code.to(tl.uint8), mask=mask)


@triton.jit
def _dequantize_fp8_kernel(q_ptr, s_ptr, lut_ptr, out_ptr, n, C, br, bc, nbc, OUT_BF16: tl.constexpr,
                           BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    s = _block_scale(s_ptr, offs, mask, C, br, bc, nbc)
    code = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.int32)
    store_float(out_ptr, offs, tl.load(lut_ptr + code, mask=mask, other=0.0) * s, mask, OUT_BF16)


@triton.jit
def _fp4_encode_kernel(x_ptr, out_ptr, n_bytes, IN_BF16: tl.constexpr, BLOCK: tl.constexpr,
                       ENC_MIN_NORMAL: tl.constexpr, ENC_MAGIC_BITS: tl.constexpr, ENC_MAGIC: tl.constexpr,
                       ENC_ROUND_HALF: tl.constexpr, ENC_SHIFT: tl.constexpr, ENC_REBIAS: tl.constexpr,
                       ENC_MAX_CODE: tl.constexpr, ENC_OVF: tl.constexpr, ENC_NBITS: tl.constexpr,
                       ENC_NAN_POS: tl.constexpr, ENC_NAN_NEG: tl.constexpr, ENC_ZERO_MASK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    lo = _encode(load_f32(x_ptr, 2 * offs, mask, IN_BF16), ENC_MIN_NORMAL, ENC_MAGIC_BITS,
                 ENC_MAGIC, ENC_ROUND_HALF, ENC_SHIFT, ENC_REBIAS, ENC_MAX_CODE, ENC_OVF, ENC_NBITS, ENC_NAN_POS,
                 ENC_NAN_NEG, ENC_ZERO_MASK)
    hi = _encode(load_f32(x_ptr, 2 * offs + 1, mask, IN_BF16), ENC_MIN_NORMAL, ENC_MAGIC_BITS,
                 ENC_MAGIC, ENC_ROUND_HALF, ENC_SHIFT, ENC_REBIAS, ENC_MAX_CODE, ENC_OVF, ENC_NBITS, ENC_NAN_POS,
                 ENC_NAN_NEG, ENC_ZERO_MASK)
    tl.store(out_ptr + offs, (lo | (hi << 4)).to(tl.uint8), mask=mask)


@triton.jit
def _fp4_decode_kernel(p_ptr, lut_ptr, out_ptr, n_bytes, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    p = tl.load(p_ptr + offs, mask=mask, other=0).to(tl.int32)
    store_float(out_ptr, 2 * offs, tl.load(lut_ptr + (p & 0xF), mask=mask, other=0.0), mask, OUT_BF16)
    store_float(out_ptr, 2 * offs + 1, tl.load(lut_ptr + (p >> 4), mask=mask, other=0.0), mask, OUT_BF16)


@triton.jit
def _floor_log2(bits):
    """floor(log2(a)) of a finite a > 0 given as its (positive) fp32 bits, subnormals included: a subnormal is
    mant * 2^-149 and the int -> fp32 conversion of mant (< 2^23, exact) exposes floor(log2(mant))."""
    e = bits >> 23
    sub = ((bits.to(tl.float32).to(tl.int32, bitcast=True) >> 23) - 127) - 149
    return tl.where(e > 0, e - 127, sub)


@triton.jit
def _quantize_fp4_kernel(x_ptr, g_ptr, e4m3_lut_ptr, packed_ptr, scale_ptr, nblocks, ELEM_MAX: tl.constexpr,
                         ELEM_EMAX: tl.constexpr, B: tl.constexpr, NV: tl.constexpr, IN_BF16: tl.constexpr,
                         NBP: tl.constexpr,
                         ENC_MIN_NORMAL: tl.constexpr, ENC_MAGIC_BITS: tl.constexpr, ENC_MAGIC: tl.constexpr,
                         ENC_ROUND_HALF: tl.constexpr, ENC_SHIFT: tl.constexpr, ENC_REBIAS: tl.constexpr,
                         ENC_MAX_CODE: tl.constexpr, ENC_OVF: tl.constexpr, ENC_NBITS: tl.constexpr,
                         ENC_NAN_POS: tl.constexpr, ENC_NAN_NEG: tl.constexpr, ENC_ZERO_MASK: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64) * NBP + tl.arange(0, NBP)
    bmask = blk < nblocks
    i = tl.arange(0, B // 2)
    m2 = bmask[:, None]
    even = load_f32(x_ptr, blk[:, None] * B + 2 * i[None, :], m2, IN_BF16)
    odd = load_f32(x_ptr, blk[:, None] * B + 2 * i[None, :] + 1, m2, IN_BF16)
    ae = even.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    ao = odd.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    bad = tl.max(((ae >= 0x7F800000) | (ao >= 0x7F800000)).to(tl.int32), axis=1)
    amax_bits = tl.max(tl.maximum(tl.where(ae < 0x7F800000, ae, 0), tl.where(ao < 0x7F800000, ao, 0)), axis=1)
    amax = amax_bits.to(tl.float32, bitcast=True)
    if NV:
        g = tl.load(g_ptr)
        # e4m3fn, saturating (float8.h make_encoder(e4m3fn, true))
        code = _encode(tl.math.div_rn(tl.math.div_rn(amax, ELEM_MAX), g), _S_MIN_NORMAL, _S_MAGIC_BITS, _S_MAGIC,
                       _S_ROUND_HALF, _S_SHIFT, _S_REBIAS, _S_MAX_CODE, _S_OVF, _S_NBITS, _S_NAN_POS, _S_NAN_NEG,
                       _S_ZERO_MASK)
        s = tl.load(e4m3_lut_ptr + code) * g
        nan_code = 0x7F
    else:
        e = _floor_log2(tl.maximum(amax_bits, 1)) - ELEM_EMAX + 127
        code = tl.where(amax_bits > 0, tl.minimum(tl.maximum(e, 0), 254), 0)
        s = tl.where(code == 0, 0x00400000, code << 23).to(tl.float32, bitcast=True)  # E8M0: 2^(code - 127)
        nan_code = 0xFF
    usable = (bad == 0) & (s > 0)
    s = tl.where(usable, s, 1.0)[:, None]
    lo = _encode(tl.math.div_rn(even, s), ENC_MIN_NORMAL, ENC_MAGIC_BITS, ENC_MAGIC, ENC_ROUND_HALF, ENC_SHIFT,
                 ENC_REBIAS, ENC_MAX_CODE, ENC_OVF, ENC_NBITS, ENC_NAN_POS, ENC_NAN_NEG, ENC_ZERO_MASK)
    hi = _encode(tl.math.div_rn(odd, s), ENC_MIN_NORMAL, ENC_MAGIC_BITS, ENC_MAGIC, ENC_ROUND_HALF, ENC_SHIFT,
                 ENC_REBIAS, ENC_MAX_CODE, ENC_OVF, ENC_NBITS, ENC_NAN_POS, ENC_NAN_NEG, ENC_ZERO_MASK)
    byte = tl.where(usable[:, None], lo | (hi << 4), 0)
    tl.store(packed_ptr + blk[:, None] * (B // 2) + i[None, :], byte.to(tl.uint8), mask=m2)
    tl.store(scale_ptr + blk, tl.where(bad == 0, code, nan_code).to(tl.uint8), mask=bmask)


@triton.jit
def _dequantize_fp4_kernel(p_ptr, s_ptr, g_ptr, elem_lut_ptr, e4m3_lut_ptr, out_ptr, n_bytes, B: tl.constexpr,
                           NV: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    code = tl.load(s_ptr + (2 * offs) // B, mask=mask, other=0).to(tl.int32)
    if NV:
        s = tl.load(e4m3_lut_ptr + code, mask=mask, other=0.0) * tl.load(g_ptr)
    else:
        s = tl.where(code == 0, 0x00400000, code << 23).to(tl.float32, bitcast=True)
        s = tl.where(code == 255, float("nan"), s)
    p = tl.load(p_ptr + offs, mask=mask, other=0).to(tl.int32)
    store_float(out_ptr, 2 * offs, tl.load(elem_lut_ptr + (p & 0xF), mask=mask, other=0.0) * s, mask, OUT_BF16)
    store_float(out_ptr, 2 * offs + 1, tl.load(elem_lut_ptr + (p >> 4), mask=mask, other=0.0) * s, mask, OUT_BF16)


# ---- host wrappers (same positional arguments as the op schemas) -------------------------------------------------
def _out(shape, out_dtype, device):
    """(result tensor, what the kernel writes through, OUT_BF16)."""
    out = torch.empty(shape, dtype=out_dtype, device=device)
    bf16 = out_dtype == torch.bfloat16
    return out, (out.view(torch.int16) if bf16 else out), bf16


def _grid(n):
    return (triton.cdiv(n, BLOCK),)


def _check_fp8_dtype(dtype):
    if dtype not in ref8.FP8_DTYPES:
        raise ValueError(f"dtype must be one of {ref8.FP8_DTYPES}, got {dtype!r}")


def _check_element(element):
    if element not in ref4.ELEMENTS:
        raise ValueError(f"element must be one of {tuple(ref4.ELEMENTS)}, got {element!r}")


def _check_format(format):
    if format not in ref4.FORMATS:
        raise ValueError(f"format must be one of {tuple(ref4.FORMATS)}, got {format!r}")


@register("quantize_fp8")
def quantize_fp8(x, scale, dtype, block_rows, block_cols, saturate):
    """x float [R, C] -> (q uint8 [R, C] fp8 bits, scale fp32 [R / block_rows, C / block_cols])."""
    _check_fp8_dtype(dtype)
    R, C = x.shape
    if scale is None:
        if x.numel() == 0:
            scale = torch.ones(R // block_rows, C // block_cols, dtype=torch.float32, device=x.device)
        else:
            amax = ref8.finite_abs(ref8._blocks(x, block_rows, block_cols)).amax(dim=(1, 3))
            scale = ref8.fp8_scale_from_amax(amax, dtype)
    scale = scale.float().contiguous().clone()
    q = torch.empty((R, C), dtype=torch.uint8, device=x.device)
    if x.numel():
        _quantize_fp8_kernel[_grid(x.numel())](kernel_input(x), scale, q, x.numel(), C, block_rows, block_cols,
                                               C // block_cols, IN_BF16=x.dtype == torch.bfloat16, BLOCK=BLOCK,
                                               **_encoder(dtype, bool(saturate)), **launch_opts())
    return q, scale


@register("dequantize_fp8")
def dequantize_fp8(q, scale, dtype, block_rows, block_cols, out_dtype):
    """q uint8 [R, C] fp8 bits of ``dtype``, scale fp32 [R / block_rows, C / block_cols] -> out_dtype [R, C]."""
    _check_fp8_dtype(dtype)
    R, C = q.shape
    out, dst, bf16 = _out((R, C), out_dtype, q.device)
    if q.numel():
        _dequantize_fp8_kernel[_grid(q.numel())](q.contiguous(), scale.float().contiguous(),
                                                 value_table(dtype, q.device),
                                                 dst, q.numel(), C, block_rows, block_cols, C // block_cols,
                                                 OUT_BF16=bf16, BLOCK=BLOCK)
    return out


@register("fp4_encode")
def fp4_encode(x, element):
    """x float [..., K] (K even) -> uint8 [..., K / 2], two RNE-saturated codes per byte (element 2i low)."""
    _check_element(element)
    out = torch.empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8, device=x.device)
    if out.numel():
        _fp4_encode_kernel[_grid(out.numel())](kernel_input(x), out, out.numel(), IN_BF16=x.dtype == torch.bfloat16,
                                               BLOCK=BLOCK, **_encoder(element, True), **launch_opts())
    return out


@register("fp4_decode")
def fp4_decode(packed, element, out_dtype):
    """uint8 [..., K / 2] -> out_dtype [..., K]."""
    _check_element(element)
    out, dst, bf16 = _out((*packed.shape[:-1], packed.shape[-1] * 2), out_dtype, packed.device)
    if packed.numel():
        _fp4_decode_kernel[_grid(packed.numel())](packed.contiguous(), value_table(element, packed.device), dst,
                                                  packed.numel(), OUT_BF16=bf16, BLOCK=BLOCK)
    return out


@register("quantize_fp4")
def quantize_fp4(x, format, element, global_scale):
    """x float [R, K] -> (packed uint8 [R, K / 2], scale codes uint8 [R, K / B], global_scale fp32 0-d)."""
    _check_format(format)
    _check_element(element)
    nv = format == "nvfp4"
    B = ref4.FORMATS[format]
    R, K = x.shape
    if nv:
        g = ref4.nv_global_scale(x, element) if global_scale is None else global_scale.float().reshape(())
        g = g.to(x.device).contiguous().clone()
    else:
        g = torch.ones((), dtype=torch.float32, device=x.device)
    packed = torch.empty((R, K // 2), dtype=torch.uint8, device=x.device)
    scale = torch.empty((R, K // B), dtype=torch.uint8, device=x.device)
    nblocks = scale.numel()
    if nblocks:
        _quantize_fp4_kernel[(triton.cdiv(nblocks, BLOCKS_PER_PROGRAM),)](
            kernel_input(x), g, value_table(torch.float8_e4m3fn, x.device), packed, scale, nblocks,
            ELEM_MAX=ref4.element_max(element), ELEM_EMAX=ref4.element_emax(element), B=B, NV=nv,
            IN_BF16=x.dtype == torch.bfloat16, NBP=BLOCKS_PER_PROGRAM, **_encoder(element, True), **launch_opts())
    return packed, scale, g


@register("dequantize_fp4")
def dequantize_fp4(packed, scale, global_scale, format, element, out_dtype):
    """packed uint8 [R, K / 2], scale codes uint8 [R, K / B], global_scale fp32 (one value) -> out_dtype [R, K]."""
    _check_format(format)
    _check_element(element)
    R, K = packed.shape[0], packed.shape[1] * 2
    out, dst, bf16 = _out((R, K), out_dtype, packed.device)
    if packed.numel():
        g = global_scale.float().reshape(()).to(packed.device)
        _dequantize_fp4_kernel[_grid(packed.numel())](
            packed.contiguous(), scale.contiguous(), g, value_table(element, packed.device),
            value_table(torch.float8_e4m3fn, packed.device), dst, packed.numel(), B=ref4.FORMATS[format],
            NV=format == "nvfp4", OUT_BF16=bf16, BLOCK=BLOCK)
    return out
