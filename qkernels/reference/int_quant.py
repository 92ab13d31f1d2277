"""Integer affine quantization: the plain-PyTorch specification.

Every fast path (C++ CPU, CUDA, Triton) must reproduce these functions bit for bit. Conventions:

* ``w`` has shape ``[..., K]``; quantization groups are ``group_size`` consecutive elements along the last dim
  (``group_size == K`` is per-channel). ``scale`` and ``zero_point`` have shape ``[..., K // group_size]``.
  Per-tensor quantization is the special case ``w.reshape(1, -1)`` with ``group_size = w.numel()``
  (the public API in :mod:`qkernels.ops.int_quant` does that reshape).
* All arithmetic is fp32. Rounding is round-half-to-even (``torch.round``, C's ``nearbyint``).
* Integer zero-point domain: ``q = clamp(round(w / scale) + zero_point, qmin, qmax)``,
  ``w_hat = scale * (q - zero_point)``. The range ``[min(w, 0), max(w, 0)]`` always covers 0, so 0 is exactly
  representable (padding and ReLU zeros stay zero).

  - symmetric: ``scale = max|w| / (2^(bits-1) - 1)``; zero_point 0 for the signed range, 2^(bits-1) for unsigned.
  - asymmetric: ``scale = (vmax - vmin) / (qmax - qmin)``, ``zero_point = qmin - round(vmin / scale)``.
* Float zero-point domain (GGUF's "scale + min"): ``q = clamp(round((w - min) / scale), 0, 2^bits - 1)``,
  ``w_hat = scale * q + min`` with ``min = min(w)`` and ``scale = (max(w) - min(w)) / (2^bits - 1)`` of the group
  (the group's own range, as in Q4_1; it need not contain 0).
* A group whose scale would be 0 (all-zero or constant-zero-range) gets ``scale = 1``: no division by zero, and
  the group still round-trips exactly.
* Storage: signed codes in ``torch.int8``, unsigned in ``torch.uint8``; zero points are ``int32`` (integer
  domain) or ``float32`` (float domain, the group minimum); scales are ``float32``.
"""

from __future__ import annotations

import torch

from ._arith import true_div


def int_range(bits: int, is_signed: bool) -> tuple[int, int]:
    if is_signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    return w.float().reshape(*w.shape[:-1], w.shape[-1] // group_size, group_size)


def choose_qparams_affine(w, bits, group_size, symmetric, is_signed, float_zero_point):
    wg = _grouped(w, group_size)
    gmin = wg.amin(dim=-1)
    gmax = wg.amax(dim=-1)
    one = torch.ones((), dtype=torch.float32, device=w.device)
    if float_zero_point:
        scale = true_div(gmax - gmin, float((1 << bits) - 1))
        scale = torch.where(scale > 0, scale, one)
        return scale, gmin
    qmin, qmax = int_range(bits, is_signed)
    vmin = torch.clamp(gmin, max=0.0)
    vmax = torch.clamp(gmax, min=0.0)
    if symmetric:
        amax = torch.maximum(-vmin, vmax)
        scale = true_div(amax, float((1 << (bits - 1)) - 1))
        scale = torch.where(scale > 0, scale, one)
        zp = torch.full_like(scale, 0 if is_signed else (1 << (bits - 1)), dtype=torch.int32)
        return scale, zp
    scale = true_div(vmax - vmin, float(qmax - qmin))
    scale = torch.where(scale > 0, scale, one)
    zp = float(qmin) - torch.round(vmin / scale)
    zp = torch.clamp(zp, qmin, qmax).to(torch.int32)
    return scale, zp


def quantize_affine(w, scale, zero_point, bits, group_size, is_signed, float_zero_point):
    wg = _grouped(w, group_size)
    s = scale.float().unsqueeze(-1)
    if float_zero_point:
        q = torch.round((wg - zero_point.float().unsqueeze(-1)) / s)
        q = torch.clamp(q, 0, (1 << bits) - 1)
        dtype = torch.uint8
    else:
        qmin, qmax = int_range(bits, is_signed)
        zp = 0.0 if zero_point is None else zero_point.to(torch.float32).unsqueeze(-1)
        q = torch.clamp(torch.round(wg / s) + zp, qmin, qmax)
        dtype = torch.int8 if is_signed else torch.uint8
    return q.reshape(w.shape).to(dtype)


def dequantize_affine(q, scale, zero_point, group_size, float_zero_point, out_dtype):
    qg = _grouped(q, group_size)
    s = scale.float().unsqueeze(-1)
    if float_zero_point:
        w = s * qg + zero_point.float().unsqueeze(-1)
    else:
        zp = 0 if zero_point is None else zero_point.to(torch.int32).unsqueeze(-1)
        # integer subtraction first, exactly as the kernels do (q - zp fits easily in int32)
        w = s * (q.to(torch.int32).reshape(qg.shape) - zp).float()
    return w.reshape(q.shape).to(out_dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``q`` int8 in [-8, 7] or uint8 in [0, 15], last dim even -> uint8 ``[..., K/2]``, element 2i low nibble."""
    v = q.to(torch.int32) & 0xF
    return (v[..., 0::2] | (v[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, is_signed: bool) -> torch.Tensor:
    p = packed.to(torch.int32)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    v = torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if is_signed:
        return ((v ^ 8) - 8).to(torch.int8)
    return v.to(torch.uint8)
