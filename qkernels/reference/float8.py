"""fp8 casts and the fp8 scaled GEMM: the plain-PyTorch specification.

Formats (OCP 8-bit Floating Point Specification (OFP8) rev 1.0 for e4m3fn/e5m2; the AMD/Graphcore "fnuz" variants
with exponent bias +1, a single NaN at 0x80 and no -0 / inf, used by MI300 = gfx942):

========================  =====  =========  ======================  ============
dtype                     bias   max        inf                     NaN
========================  =====  =========  ======================  ============
torch.float8_e4m3fn       7      448        none                    0x7F / 0xFF
torch.float8_e5m2         15     57344      0x7C / 0xFC             0x7D-0x7F...
torch.float8_e4m3fnuz     8      240        none                    0x80 only
torch.float8_e5m2fnuz     16     57344      none                    0x80 only
========================  =====  =========  ======================  ============

Conventions (every fast path reproduces these bit for bit):

* Ops see 2-D tensors ``x [R, C]`` and a 2-D grid of blocks ``block_rows x block_cols`` tiling it exactly; the
  scale has shape ``[R / block_rows, C / block_cols]``. Per-tensor is one block ``(R, C)``, per-row (per-token /
  per-output-channel) is ``(1, C)``, DeepSeek-V3-style block-wise is ``(1, 128)`` for activations and
  ``(128, 128)`` for weights. (The public API in :mod:`qkernels.ops.float8` does the reshaping.)
* ``scale = amax / fp8_max`` in fp32 with amax over the block's *finite* ``|x|`` (NaN/inf are encoded on their
  own, they do not poison the block), and ``scale = 1`` where that is 0 (an all-zero block).
* ``q = fp8(x / scale)``: fp32 division, then round-to-nearest-even to the format.
  ``saturate=True`` clamps to +-max (inf too); ``saturate=False`` is the IEEE-style conversion of ml_dtypes and the
  OCP spec's non-saturating mode: overflow -> +-inf for e5m2, NaN for e4m3fn and the fnuz types. NaN stays NaN
  (0x7F|sign for e4m3fn/e5m2, 0x80 for fnuz); fnuz has no -0 (tiny negatives round to +0).
* Codes travel as ``uint8`` bit patterns inside the ops; the public API views them as torch's float8 dtypes.
* ``dequantize``: ``float32(q) * scale`` (one fp32 product per element), then cast to ``out_dtype``.
* ``fp8_mm``: both operands dequantized exactly as above, then ``a @ b.T + bias``; this reference accumulates in
  fp64 (tests measure every kernel's error against it); kernels accumulate in fp32.
* ``fp8_weight_only_mm``: x (float, not quantized) times the dequantized weight, ``x @ b.T + bias``, fp64 here,
  the result in x's dtype.
"""

from __future__ import annotations

import torch

from . import minifloat
from ._arith import true_div as _div

# from the one table of element formats (reference/minifloat.py)
FP8_DTYPES = tuple(f.dtype for f in minifloat.FP8)
FP8_MAX = {f.dtype: f.max for f in minifloat.FP8}
# |v| beyond which round-to-nearest-even overflows e4m3fn: max + half an ulp = 464 (464 itself rounds to even 448)
_E4M3FN_OVERFLOW = 464.0


def cast_to_fp8_bits(v: torch.Tensor, dtype: torch.dtype, saturate: bool) -> torch.Tensor:
    """fp32 ``v`` -> uint8 fp8 bit patterns of ``dtype`` (RNE; see the module doc for overflow and NaN)."""
    m = FP8_MAX[dtype]
    v = v.float()
    if saturate:
        return torch.clamp(v, -m, m).to(dtype).view(torch.uint8)  # clamp keeps NaN, maps +-inf to +-max
    bits = v.to(dtype).view(torch.uint8)
    if dtype == torch.float8_e4m3fn:
        # torch's own e4m3fn cast saturates; the IEEE-style (non-saturating) conversion overflows to NaN
        nan = torch.where(torch.signbit(v), 0xFF, 0x7F).to(torch.uint8)
        bits = torch.where(v.abs() > _E4M3FN_OVERFLOW, nan, bits)
    return bits


def fp8_bits_to_float(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return q.view(dtype).float()


def _blocks(t: torch.Tensor, block_rows: int, block_cols: int) -> torch.Tensor:
    R, C = t.shape
    return t.reshape(R // block_rows, block_rows, C // block_cols, block_cols)


def fp8_scale_from_amax(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    s = _div(amax.float(), FP8_MAX[dtype])
    return torch.where(s > 0, s, torch.ones_like(s))


def finite_abs(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    return torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x))


def quantize_fp8(x, scale, dtype, block_rows, block_cols, saturate):
    """x [R, C] float -> (q uint8 [R, C], scale fp32 [R / block_rows, C / block_cols])."""
    R, C = x.shape
    xb = _blocks(x.float(), block_rows, block_cols)
    if scale is None:
        if x.numel() == 0:
            scale = torch.ones(R // block_rows, C // block_cols, dtype=torch.float32, device=x.device)
        else:
            scale = fp8_scale_from_amax(finite_abs(xb).amax(dim=(1, 3)), dtype)
    scale = scale.float().clone()
    q = cast_to_fp8_bits(xb / scale[:, None, :, None], dtype, saturate)
    return q.reshape(R, C), scale


def dequantize_fp8(q, scale, dtype, block_rows, block_cols, out_dtype):
    R, C = q.shape
    v = fp8_bits_to_float(_blocks(q, block_rows, block_cols), dtype) * scale.float()[:, None, :, None]
    return v.reshape(R, C).to(out_dtype)


def _grid_blocks(t: torch.Tensor, s: torch.Tensor) -> tuple[int, int]:
    """Block sizes of a scale grid ``s [G0, G1]`` tiling ``t [R, C]`` (1 where a dim is empty)."""
    (R, C), (G0, G1) = t.shape, s.shape
    return (R // G0 if G0 else 1), (C // G1 if G1 else 1)


def fp8_mm(a, a_scale, a_dtype, b, b_scale, b_dtype, bias, out_dtype):
    """a uint8 [M, K] (``a_dtype`` bits), a_scale fp32 [M / bm, K / bk]; b uint8 [N, K], b_scale fp32
    [N / bn, K / bk'] -> ``dequant(a) @ dequant(b).T + bias`` as ``out_dtype`` [M, N] (fp64 accumulation)."""
    af = dequantize_fp8(a, a_scale, a_dtype, *_grid_blocks(a, a_scale), torch.float64)
    bf = dequantize_fp8(b, b_scale, b_dtype, *_grid_blocks(b, b_scale), torch.float64)
    out = af @ bf.t()
    if bias is not None:
        out = out + bias.double()
    return out.to(out_dtype)


def fp8_weight_only_mm(x, w, w_scale, w_dtype, bias):
    """x float [M, K]; w uint8 [N, K] (``w_dtype`` bits) with w_scale fp32 [N / bn, K / bk] ->
    ``x @ dequant(w).T + bias`` in x's dtype [M, N] (fp64 accumulation here)."""
    wf = dequantize_fp8(w, w_scale, w_dtype, *_grid_blocks(w, w_scale), torch.float64)
    out = x.double() @ wf.t()
    if bias is not None:
        out = out + bias.double()
    return out.to(x.dtype)
