"""4-bit float elements, the MXFP4 / NVFP4 block formats and the fp4 scaled GEMM: the plain-PyTorch specification.

Element formats (a code is sign bit 3, then exponent bits, then mantissa bits; exponent field 0 = subnormal):

* ``e2m1`` - OCP Microscaling Formats (MX) Specification v1.0 (2023), sec. 5.3.3 "FP4": bias 1,
  values +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}; emax = 2. Same bits as ``ml_dtypes.float4_e2m1fn``.
* ``e1m2`` - emulated only (no hardware, not in the OCP spec): 1 exponent bit with the IEEE bias
  2^(1-1) - 1 = 0 and 2 mantissa bits: exp 0 (subnormal) 2 * 0.mm = {0, 0.5, 1, 1.5}, exp 1 2 * 1.mm =
  {2, 2.5, 3, 3.5}. So +-{0, 0.5, ..., 3.5}, a uniform grid (like sign-magnitude int3 / 2); emax = 1.

Encoding: round to nearest, ties to the even code, saturating to +-max (the formats have no inf/NaN); NaN encodes
as the -0 code 0x8 (ml_dtypes gives +-0 by the NaN's sign bit; no block format stores a NaN element: blocks
with NaN get a NaN scale). Packing: two codes per byte, element 2i in the low nibble.

Block formats (the last dim is split into blocks of B elements; ``x [R, K]`` gives ``scale [R, K / B]``):

* ``mxfp4`` (MX spec sec. 6.3, B = 32): shared scale X = 2^(floor(log2(amax)) - emax) stored as E8M0
  (code = exponent + 127, clamped to [0, 254]; 255 is NaN; code 0 for an all-zero block, as gguf does).
  This is exactly gguf's MXFP4 scale rule (``gguf.quants.MXFP4``: ``floor(log2(d)) - 2 + 127``).
  P_i = encode(V_i / X); value = decode(P_i) * X.
* ``nvfp4`` (NVIDIA Blackwell NVFP4, B = 16): fp32 per-tensor scale g (given, or amax_tensor / (448 * emax_val)
  with 1 for an all-zero tensor), block scale s_b = e4m3fn(amax_block / emax_val / g) (RNE, saturating),
  P_i = encode(V_i / (float(s_b) * g)); value = decode(P_i) * (float(s_b) * g). ``emax_val`` is the element's
  largest value (6 for e2m1). A block whose s_b rounds to 0 stores zero codes.
* A block holding NaN or +-inf gets the NaN scale (0xFF e8m0, 0x7F e4m3) and zero codes: it dequantizes to NaN.
  amax (block and tensor) is taken over finite values.

``fp4_mm``: both operands dequantized as above (fp32), then ``a @ b.T + bias``; fp64 accumulation here.
``fp4_weight_only_mm``: x (float, not quantized) times the dequantized weight, the result in x's dtype.
"""

from __future__ import annotations

import torch

from . import minifloat
from .float8 import _div, cast_to_fp8_bits, finite_abs

FORMATS = {"mxfp4": 32, "nvfp4": 16}  # block size
# element name -> (exponent bits, mantissa bits, bias), from the one table of element formats (reference/minifloat.py)
ELEMENTS = {f.name: (f.ebits, f.mbits, f.bias) for f in minifloat.FP4_ELEMENTS}


def element_values(element: str) -> torch.Tensor:
    """fp32 [16]: the value of every code 0..15 of ``element``."""
    ebits, mbits, bias = ELEMENTS[element]
    vals = []
    for c in range(16):
        e, m = (c & 7) >> mbits, c & ((1 << mbits) - 1)
        v = m * 2.0 ** (1 - bias - mbits) if e == 0 else (1 + m / 2**mbits) * 2.0 ** (e - bias)
        vals.append(-v if c & 8 else v)
    return torch.tensor(vals, dtype=torch.float32)


def element_max(element: str) -> float:
    return float(element_values(element)[7])


def element_emax(element: str) -> int:
    ebits, mbits, bias = ELEMENTS[element]
    return (1 << ebits) - 1 - bias


def encode_elements(v: torch.Tensor, element: str) -> torch.Tensor:
    """fp32 -> uint8 codes 0..15 (unpacked), RNE to the even code, saturating."""
    mags = element_values(element)[:8].tolist()
    v = v.float()
    a = v.abs()
    code = torch.zeros(v.shape, dtype=torch.int32, device=v.device)
    for i in range(7):
        mid = (mags[i] + mags[i + 1]) / 2  # exact in fp32
        # a tie goes to whichever neighbour has the even code (its mantissa LSB is 0)
        code += (a >= mid).int() if (i + 1) % 2 == 0 else (a > mid).int()
    code = code | (torch.signbit(v).int() << 3)
    code = torch.where(torch.isnan(v), torch.full_like(code, 8), code)
    return code.to(torch.uint8)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    c = codes.to(torch.int32)
    return (c[..., 0::2] | (c[..., 1::2] << 4)).to(torch.uint8)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    p = packed.to(torch.int64)
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def fp4_encode(x, element):
    return pack_nibbles(encode_elements(x, element))


def fp4_decode(packed, element, out_dtype):
    return element_values(element).to(packed.device)[unpack_nibbles(packed)].to(out_dtype)


def _f32_from_bits(bits: torch.Tensor) -> torch.Tensor:
    return bits.to(torch.int32).view(torch.float32)


def e8m0_to_float(code: torch.Tensor) -> torch.Tensor:
    c = code.to(torch.int32)
    v = _f32_from_bits(torch.where(c == 0, torch.full_like(c, 0x00400000), c << 23))  # 2^-127 is subnormal
    return torch.where(c == 255, torch.full_like(v, float("nan")), v)


def floor_log2(a: torch.Tensor) -> torch.Tensor:
    """floor(log2(a)) for finite a > 0 (exact, subnormals included): frexp gives a = m * 2^e with m in [0.5, 1)."""
    return torch.frexp(a)[1].to(torch.int32) - 1


def mx_scale_code(amax: torch.Tensor, element: str) -> torch.Tensor:
    pos = amax > 0
    e = floor_log2(torch.where(pos, amax, torch.ones_like(amax))) - element_emax(element) + 127
    return torch.where(pos, e.clamp(0, 254), torch.zeros_like(e)).to(torch.uint8)


def nv_global_scale(x: torch.Tensor, element: str) -> torch.Tensor:
    amax = finite_abs(x).amax() if x.numel() else torch.zeros((), device=x.device)
    g = _div(amax.reshape(()), 448.0 * element_max(element))
    return torch.where(g > 0, g, torch.ones_like(g))


def _block_scale(code: torch.Tensor, nv: bool, g: torch.Tensor) -> torch.Tensor:
    if nv:
        return code.view(torch.float8_e4m3fn).float() * g
    return e8m0_to_float(code)


def quantize_fp4(x, format, element, global_scale):
    """x [R, K] float -> (packed uint8 [R, K/2], scale uint8 [R, K/B], global_scale fp32 0-d)."""
    nv = format == "nvfp4"
    B = FORMATS[format]
    R, K = x.shape
    xb = x.float().reshape(R, K // B, B)
    amax = finite_abs(xb).amax(dim=-1) if x.numel() else torch.zeros(R, K // B, device=x.device)
    finite = torch.isfinite(xb).all(dim=-1)
    if nv:
        g = nv_global_scale(x, element) if global_scale is None else global_scale.float().reshape(())
        code = cast_to_fp8_bits(_div(amax, element_max(element)) / g, torch.float8_e4m3fn, True)
        nan_code = 0x7F
    else:
        g = torch.ones((), dtype=torch.float32, device=x.device)
        code = mx_scale_code(amax, element)
        nan_code = 0xFF
    s = _block_scale(code, nv, g)
    usable = finite & (s > 0)
    s_safe = torch.where(usable, s, torch.ones_like(s))
    codes = encode_elements(xb / s_safe.unsqueeze(-1), element)
    codes = torch.where(usable.unsqueeze(-1), codes, torch.zeros_like(codes))
    code = torch.where(finite, code, torch.full_like(code, nan_code))
    return pack_nibbles(codes.reshape(R, K)), code, g


def dequantize_fp4(packed, scale, global_scale, format, element, out_dtype):
    nv = format == "nvfp4"
    B = FORMATS[format]
    R, K = packed.shape[0], packed.shape[1] * 2
    vals = element_values(element).to(packed.device)[unpack_nibbles(packed)].reshape(R, K // B, B)
    s = _block_scale(scale, nv, global_scale.float().reshape(()))
    return (vals * s.unsqueeze(-1)).reshape(R, K).to(out_dtype)


def fp4_mm(a, a_scale, a_global_scale, b, b_scale, b_global_scale, format, element, bias, out_dtype):
    """a uint8 [M, K/2] with a_scale uint8 [M, K/B]; b uint8 [N, K/2] with b_scale [N, K/B] ->
    ``dequant(a) @ dequant(b).T + bias`` as ``out_dtype`` [M, N] (fp64 accumulation)."""
    af = dequantize_fp4(a, a_scale, a_global_scale, format, element, torch.float32).double()
    bf = dequantize_fp4(b, b_scale, b_global_scale, format, element, torch.float32).double()
    out = af @ bf.t()
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)


def fp4_weight_only_mm(x, w, w_scale, w_global_scale, format, element, bias):
    """x float [M, K]; w uint8 [N, K/2] with w_scale uint8 [N, K/B] -> ``x @ dequant(w).T + bias`` in x's dtype
    [M, N] (fp64 accumulation here)."""
    wf = dequantize_fp4(w, w_scale, w_global_scale, format, element, torch.float32).double()
    out = x.double() @ wf.t()
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)
