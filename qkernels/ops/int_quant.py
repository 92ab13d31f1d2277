"""Integer affine quantization and int4 packing: public functions and fake kernels.

Semantics (rounding, ranges, zero points, degenerate groups) are specified in :mod:`qkernels.reference.int_quant`.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import _ext
from . import autograd
from ._call import call
from ._validate import check_bool, check_dtype, check_float_tensor, check_tensor, has_values

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _resolve_group(w: torch.Tensor, group_size, name: str = "w") -> tuple[torch.Tensor, int, bool]:
    """Returns (w viewed for the op, group size along its last dim, per_tensor); ``name`` is the caller's argument."""
    if w.dim() == 0:
        raise ValueError(f"{name} must have at least 1 dim, got a 0-d tensor")
    K = w.shape[-1]
    if group_size == "tensor":
        return w.reshape(1, -1), w.numel(), True
    if group_size in (None, -1, "channel"):
        return w, K, False
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise TypeError(f"group_size must be a positive int, -1/'channel' or 'tensor', got {group_size!r}")
    if group_size <= 0:
        raise ValueError(f"group_size must be positive (or -1/'channel', 'tensor'), got {group_size}")
    if K % group_size != 0:
        raise ValueError(f"group_size {group_size} must divide the last dim of {name} ({K}); {name} has shape "
                         f"{tuple(w.shape)}")
    return w, group_size, False


def _check_bits(bits):
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"bits must be an int in [2, 8], got {type(bits).__name__} {bits!r}")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in [2, 8], got {bits!r}")


def _check_flag(v, name: str) -> bool:
    # numpy bools come from configs read with numpy; a str ("no") or an int is a mistake, not a flag
    return bool(v) if isinstance(v, np.bool_) else check_bool(v, name)


def _check_domain(zero_point_domain: str) -> bool:
    if not isinstance(zero_point_domain, str):
        raise TypeError(f"zero_point_domain must be 'int' or 'float', got {type(zero_point_domain).__name__}")
    if zero_point_domain not in ("int", "float"):
        raise ValueError(f"zero_point_domain must be 'int' or 'float', got {zero_point_domain!r}")
    return zero_point_domain == "float"


def choose_qparams_affine(w, bits=8, group_size=-1, symmetric=True, *, signed=True, zero_point_domain="int",
                          backend=None):
    """Scale and zero point per group.

    Args:
        w: float32/bf16/fp16 ``[..., K]``, finite values.
        group_size: positive divisor of K (per-group), -1/"channel" (per-channel), or "tensor".
    Returns:
        ``(scale, zero_point)``: fp32 ``[..., K // group_size]`` (0-d for "tensor"); zero_point int32, or fp32
        group minima when ``zero_point_domain="float"``.
    """
    check_float_tensor(w, "w")
    _check_bits(bits)
    symmetric = _check_flag(symmetric, "symmetric")
    signed = _check_flag(signed, "signed")
    fz = _check_domain(zero_point_domain)
    if fz and signed:
        signed = False  # the float zero-point domain stores unsigned codes [0, 2^bits - 1]
    wv, g, per_tensor = _resolve_group(w, group_size)
    if wv.numel() == 0:
        raise ValueError(f"w must be non-empty, got shape {tuple(w.shape)}")
    # data-dependent checks run eagerly; under torch.compile the C++ kernels' own checks apply
    if has_values(wv) and not torch.isfinite(wv).all():
        raise ValueError("w contains NaN or inf; quantization needs finite values")
    with torch.no_grad():  # quantization parameters of a rounding: no gradient (see qkernels.ops.autograd)
        scale, zp = call("choose_qparams_affine", (wv, bits, g, symmetric, signed, fz), w.device, backend)
    if has_values(wv):
        _check_representable(wv, g, scale, zp, bits, symmetric, signed, fz)
    if per_tensor:
        scale, zp = scale.reshape(()), zp.reshape(())
    return scale, zp


def _check_representable(wv, g, scale, zp, bits, symmetric, signed, fz):
    """Finite in, finite out: a group whose range max - min exceeds float32 (e.g. [-3e38, 3e38]) gets an inf
    scale, and a range within an ulp of float32's max can dequantize its extreme code to inf. The per-group
    extremes the codes can dequantize to are checked (cheap: one value per group) and such weights refused."""
    if fz:
        hi = scale * float((1 << bits) - 1) + zp
        lo = zp
    elif symmetric:  # codes within +-(2^(b-1) - 1) of the zero point: |w| <= amax = scale * (2^(b-1) - 1)
        hi = scale * float((1 << (bits - 1)) - 1)
        lo = -hi
    else:
        qmin, qmax = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        hi, lo = scale * (qmax - zp).float(), scale * (qmin - zp).float()
    bad = ~(torch.isfinite(scale) & torch.isfinite(hi) & torch.isfinite(lo))
    if bad.any():
        i = int(bad.reshape(-1).nonzero()[0])
        grp = wv.reshape(-1, g)[i].float()
        lim = torch.finfo(torch.float32).max
        raise ValueError(f"w's group {i} spans [{float(grp.min()):.4g}, {float(grp.max()):.4g}]: its quantization "
                         f"range (max - min, or the largest dequantized code) exceeds float32's largest value "
                         f"{lim:.4g}, so the scale or the dequantized weight would be inf; scale w down (or use "
                         f"symmetric quantization, whose range is max |w|)")


def quantize_affine(w, bits=8, group_size=-1, symmetric=True, *, signed=True, zero_point_domain="int",
                    backend=None):
    """Quantize ``w`` -> ``(q, scale, zero_point)`` with ``w ~= scale * (q - zero_point)``.

    Args:
        w: float32/bf16/fp16 ``[..., K]``; NaN/inf are rejected.
        bits: 2..8. signed: codes in [-2^(b-1), 2^(b-1)-1] stored as int8 (default), else [0, 2^b-1] as uint8.
        group_size: positive divisor of K, -1/"channel" for per-channel, "tensor" for per-tensor.
        symmetric: zero_point 0 (signed) / 2^(b-1) (unsigned) and scale = max|w| / (2^(b-1)-1); otherwise
            scale = (vmax - vmin) / (qmax - qmin), zero_point = qmin - round(vmin / scale), range covering 0.
        zero_point_domain: "int" as above, or "float": ``w ~= scale * q + min`` (GGUF-style, unsigned codes).
    Returns:
        q with w's shape; scale fp32 ``[..., K // group_size]``; zero_point int32 (fp32 minima in the float domain).
    """
    scale, zp = choose_qparams_affine(w, bits, group_size, symmetric, signed=signed,
                                      zero_point_domain=zero_point_domain, backend=backend)
    q = quantize_affine_with_qparams(w, scale, zp, bits, group_size, signed=signed,
                                     zero_point_domain=zero_point_domain, backend=backend)
    return q, scale, zp


def quantize_affine_with_qparams(w, scale, zero_point, bits=8, group_size=-1, *, signed=True,
                                 zero_point_domain="int", backend=None):
    """Quantize with given ``scale``/``zero_point`` (shapes as returned by :func:`choose_qparams_affine`)."""
    check_float_tensor(w, "w")
    _check_bits(bits)
    signed = _check_flag(signed, "signed")
    fz = _check_domain(zero_point_domain)
    if fz:
        signed = False
    wv, g, per_tensor = _resolve_group(w, group_size)
    if wv.numel() == 0:
        raise ValueError(f"w must be non-empty, got shape {tuple(w.shape)}")
    # data-dependent checks run eagerly; under torch.compile the C++ kernels' own checks apply
    if has_values(wv) and not torch.isfinite(wv).all():
        raise ValueError("w contains NaN or inf; quantization needs finite values")
    pshape = (*wv.shape[:-1], wv.shape[-1] // g)
    scale = _param(scale, "scale", torch.float32, pshape, per_tensor, w.device)
    if zero_point is not None:
        zero_point = _param(zero_point, "zero_point", torch.float32 if fz else torch.int32, pshape, per_tensor, w.device)
    elif fz:
        raise ValueError("zero_point (the group minima) is required when zero_point_domain='float'")
    if has_values(scale) and not (torch.isfinite(scale) & (scale > 0)).all():
        raise ValueError("scale must be finite and positive (as choose_qparams_affine returns it)")
    with torch.no_grad():
        q = call("quantize_affine", (wv, scale, zero_point, bits, g, signed, fz), w.device, backend)
    return q.reshape(w.shape)


def dequantize_affine(q, scale, zero_point=None, group_size=-1, *, zero_point_domain="int",
                      out_dtype=torch.float32, backend=None):
    """``scale * (q - zero_point)`` (or ``scale * q + min`` in the float domain) in ``out_dtype``.

    Args:
        q: int8/uint8 codes ``[..., K]``; scale/zero_point as returned by :func:`quantize_affine`.
    """
    check_tensor(q, "q", (torch.int8, torch.uint8))
    fz = _check_domain(zero_point_domain)
    check_dtype(out_dtype, "out_dtype", FLOAT_DTYPES + (torch.float64,))
    qv, g, per_tensor = _resolve_group(q, group_size, "q")
    autograd.check_param_no_grad(scale, "scale", "dequantize_affine")
    autograd.check_param_no_grad(zero_point, "zero_point", "dequantize_affine")
    pshape = (*qv.shape[:-1], qv.shape[-1] // g if g else 0)
    scale = _param(scale, "scale", torch.float32, pshape, per_tensor, q.device)
    if zero_point is not None:
        zero_point = _param(zero_point, "zero_point", torch.float32 if fz else torch.int32, pshape, per_tensor, q.device)
    elif fz:
        raise ValueError("zero_point (the group minima) is required when zero_point_domain='float'")
    if qv.numel() == 0:
        return torch.empty(q.shape, dtype=out_dtype, device=q.device)
    w = call("dequantize_affine", (qv, scale, zero_point, g, fz, out_dtype), q.device, backend)
    return w.reshape(q.shape)


def _param(t, name, dtype, shape, per_tensor, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like the data, got {t.device}")
    if dtype == torch.float32 and t.dtype in FLOAT_DTYPES:
        t = t.float()
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if per_tensor:
        if t.numel() != 1:
            raise ValueError(f"{name} must have one element for per-tensor quantization, got shape {tuple(t.shape)}")
        return t.reshape(shape)
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def pack_int4(q, backend=None):
    """int4 codes -> uint8 ``[..., K/2]``: element 2i in the low nibble, 2i+1 in the high nibble.

    Args:
        q: int8 with values in [-8, 7] (stored as two's-complement nibbles) or uint8 in [0, 15]; last dim even.
    """
    check_tensor(q, "q", (torch.int8, torch.uint8))
    if q.dim() == 0 or q.shape[-1] % 2 != 0:
        raise ValueError(f"the last dim of q must be even to pack two int4 per byte, got shape {tuple(q.shape)}")
    if q.numel() > 0 and has_values(q):
        lo, hi = (-8, 7) if q.dtype == torch.int8 else (0, 15)
        qmin, qmax = int(q.min()), int(q.max())
        if qmin < lo or qmax > hi:
            raise ValueError(f"q values must be in [{lo}, {hi}] for dtype {q.dtype}, got [{qmin}, {qmax}]")
    return call("pack_int4", (q,), q.device, backend)


def unpack_int4(packed, signed=True, backend=None):
    """uint8 ``[..., K/2]`` -> int8 in [-8, 7] (signed) or uint8 in [0, 15]; inverse of :func:`pack_int4`."""
    check_tensor(packed, "packed", (torch.uint8,))
    if packed.dim() == 0:
        raise ValueError("packed must have at least 1 dim, got a 0-d tensor")
    return call("unpack_int4", (packed, _check_flag(signed, "signed")), packed.device, backend)


# ---- fake (meta) kernels: shapes and dtypes only, for torch.compile / opcheck ---------------------------------
if _ext.HAS_C:

    @torch.library.register_fake("qkernels::choose_qparams_affine")
    def _(w, bits, group_size, symmetric, is_signed, float_zero_point):
        shape = (*w.shape[:-1], w.shape[-1] // group_size)
        zdt = torch.float32 if float_zero_point else torch.int32
        return w.new_empty(shape, dtype=torch.float32), w.new_empty(shape, dtype=zdt)

    @torch.library.register_fake("qkernels::quantize_affine")
    def _(w, scale, zero_point, bits, group_size, is_signed, float_zero_point):
        return w.new_empty(w.shape, dtype=torch.int8 if is_signed else torch.uint8)

    @torch.library.register_fake("qkernels::dequantize_affine")
    def _(q, scale, zero_point, group_size, float_zero_point, out_dtype):
        return q.new_empty(q.shape, dtype=out_dtype)

    @torch.library.register_fake("qkernels::pack_int4")
    def _(q):
        torch._check(q.shape[-1] % 2 == 0, lambda: "the last dim of q must be even")
        return q.new_empty((*q.shape[:-1], q.shape[-1] // 2), dtype=torch.uint8)

    @torch.library.register_fake("qkernels::unpack_int4")
    def _(packed, is_signed):
        return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2),
                                dtype=torch.int8 if is_signed else torch.uint8)
