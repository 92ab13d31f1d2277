"""4-bit float elements (e2m1, e1m2), MXFP4 / NVFP4 block quantization and the fp4 scaled GEMM: public functions
and fake kernels. Semantics: :mod:`qkernels.reference.float4`.
"""

from __future__ import annotations

import torch

from .. import _ext
from . import autograd
from ..reference.float4 import ELEMENTS, FORMATS
from ._call import NATIVE, call, cpu_op
from ._validate import check_bias, check_float_tensor, check_same_device, check_tensor
from .float8 import check_out_dtype

# the torch dtype each format's block scales are returned as (uint8 is accepted too)
SCALE_DTYPES = {"mxfp4": torch.float8_e8m0fnu, "nvfp4": torch.float8_e4m3fn}


def _check_format(format):
    if not isinstance(format, str):
        raise TypeError(f"format must be one of {tuple(FORMATS)}, got {type(format).__name__} {format!r}")
    if format not in FORMATS:
        raise ValueError(f"format must be one of {tuple(FORMATS)}, got {format!r}")


def _check_element(element):
    if not isinstance(element, str):
        raise TypeError(f"element must be one of {tuple(ELEMENTS)}, got {type(element).__name__} {element!r}")
    if element not in ELEMENTS:
        raise ValueError(f"element must be one of {tuple(ELEMENTS)}, got {element!r}")


def fp4_encode(x, element="e2m1", *, backend=None):
    """Element-wise cast to 4-bit codes (no scaling), saturating round-to-nearest-even, packed two per byte.

    Args:
        x: float32/bf16/fp16 ``[..., K]``, K even.
        element: "e2m1" (OCP FP4: +-{0, 0.5, 1, 1.5, 2, 3, 4, 6}) or "e1m2" (+-{0, 0.5, ..., 3.5}).
    Returns: uint8 ``[..., K/2]``, element 2i in the low nibble (bits as ml_dtypes.float4_e2m1fn for e2m1).
    """
    check_float_tensor(x, "x")
    _check_element(element)
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ValueError(f"the last dim of x must be even to pack two fp4 per byte, got shape {tuple(x.shape)}")
    with torch.no_grad():  # codes: no gradient (see qkernels.ops.autograd)
        return call("fp4_encode", (x, element), x.device, backend)


def fp4_decode(packed, element="e2m1", out_dtype=torch.float32, *, backend=None):
    """uint8 ``[..., K/2]`` of packed codes -> their values ``[..., K]`` in out_dtype."""
    check_tensor(packed, "packed", (torch.uint8,))
    _check_element(element)
    check_out_dtype(out_dtype)
    if packed.dim() == 0:
        raise ValueError("packed must have at least 1 dim, got a 0-d tensor")
    return call("fp4_decode", (packed, element, out_dtype), packed.device, backend)


def _global_arg(g, name, device):
    if not isinstance(g, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (fp32, one element), got {type(g).__name__}")
    if g.numel() != 1:
        raise ValueError(f"{name} must have one element, got shape {tuple(g.shape)}")
    if not g.dtype.is_floating_point or g.dtype.itemsize < 2:
        raise TypeError(f"{name} must be a float32 tensor, got {g.dtype}")
    if g.device != device:
        raise ValueError(f"{name} must be on {device} like the data, got {g.device}")
    return g.float().reshape(())


def _scale_codes(scale, name, format, shape, device):
    """Block scales as uint8 codes; accepts uint8 or the format's scale dtype (e8m0fnu / e4m3fn)."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scale).__name__}")
    want = SCALE_DTYPES[format]
    if scale.dtype not in (torch.uint8, want):
        raise TypeError(f"{name} must have dtype {str(want).replace('torch.', '')} (or uint8 codes) for "
                        f"format={format!r}, got {scale.dtype}")
    if tuple(scale.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (one scale per {FORMATS[format]} elements), "
                         f"got {tuple(scale.shape)}")
    if scale.device != device:
        raise ValueError(f"{name} must be on {device} like the data, got {scale.device}")
    return scale.view(torch.uint8)


def quantize_fp4(x, format="mxfp4", *, element="e2m1", global_scale=None, backend=None):
    """Block-scaled 4-bit quantization along the last dim.

    Args:
        x: float32/bf16/fp16 ``[..., K]``, K a multiple of the block size (32 for "mxfp4", 16 for "nvfp4").
        format: "mxfp4" (OCP MX v1.0: E8M0 power-of-two scale per 32) or "nvfp4" (e4m3fn scale per 16 and an fp32
            per-tensor scale).
        element: "e2m1" (the standard FP4) or "e1m2" (emulated; see qkernels.reference.float4).
        global_scale: nvfp4 only: a given fp32 per-tensor scale (default amax / (448 * 6)).
    Returns:
        ``(packed, scale, global_scale)``: packed uint8 ``[..., K/2]`` (element 2i in the low nibble); scale
        ``[..., K/B]`` as torch.float8_e8m0fnu (mxfp4) or torch.float8_e4m3fn (nvfp4); global_scale fp32 0-d
        (nvfp4) or None (mxfp4).
    """
    check_float_tensor(x, "x")
    _check_format(format)
    _check_element(element)
    B = FORMATS[format]
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim [..., K], got a 0-d tensor")
    K = x.shape[-1]
    if K == 0:
        raise ValueError(f"the last dim of x must be positive (a multiple of the {format} block size {B}), got "
                         f"shape {tuple(x.shape)}")
    if K % B:
        raise ValueError(f"the last dim of x ({K}) must be a multiple of the {format} block size {B}; "
                         f"x has shape {tuple(x.shape)}")
    if global_scale is not None:
        if format != "nvfp4":
            raise ValueError(f"global_scale is only used by format='nvfp4', got format={format!r}")
        global_scale = _global_arg(global_scale, "global_scale", x.device)
    x2 = x.reshape(-1, K)
    with torch.no_grad():  # codes and scales of a rounding: no gradient (see qkernels.ops.autograd)
        packed, scale, g = call("quantize_fp4", (x2, format, element, global_scale), x.device, backend)
    packed = packed.reshape(*x.shape[:-1], K // 2)
    scale = scale.reshape(*x.shape[:-1], K // B).view(SCALE_DTYPES[format])
    return packed, scale, (g if format == "nvfp4" else None)


def _fp4_operand(packed, scale, g, format, pname, sname, gname):
    check_tensor(packed, pname, (torch.uint8,))
    if packed.dim() == 0:
        raise ValueError(f"{pname} must have at least 1 dim, got a 0-d tensor")
    B = FORMATS[format]
    K = packed.shape[-1] * 2
    if K == 0:
        raise ValueError(f"the last dim of {pname} must be positive (K/2, K a multiple of the {format} block size "
                         f"{B}), got shape {tuple(packed.shape)}")
    if K % B:
        raise ValueError(f"the unpacked last dim of {pname} ({K}) must be a multiple of the {format} block size {B}")
    codes = _scale_codes(scale, sname, format, (*packed.shape[:-1], K // B), packed.device)
    if format == "nvfp4":
        if g is None:
            raise ValueError(f"{gname} (the fp32 per-tensor scale from quantize_fp4) is required for format='nvfp4'")
        g = _global_arg(g, gname, packed.device)
    else:
        if g is not None:
            raise ValueError(f"{gname} is only used by format='nvfp4', got format={format!r}")
        g = torch.ones((), dtype=torch.float32, device=packed.device)
    return packed.reshape(-1, K // 2), codes.reshape(-1, K // B), g, K


def dequantize_fp4(packed, scale, global_scale=None, format="mxfp4", *, element="e2m1", out_dtype=torch.float32,
                   backend=None):
    """Inverse of :func:`quantize_fp4`: ``decode(code) * block_scale (* global_scale)`` -> ``[..., K]``."""
    _check_format(format)
    _check_element(element)
    check_out_dtype(out_dtype)
    p2, s2, g, K = _fp4_operand(packed, scale, global_scale, format, "packed", "scale", "global_scale")
    autograd.check_param_no_grad(global_scale, "global_scale", "dequantize_fp4")
    out = call("dequantize_fp4", (p2, s2, g, format, element, out_dtype), packed.device, backend)
    return out.reshape(*packed.shape[:-1], K)


_UNIT: dict = {}


def unit_scale(device) -> torch.Tensor:
    """A 0-d fp32 one on ``device``, the global scale the kernels take for mxfp4 (which has none), made once per
    device rather than per call (read only: never write into it)."""
    t = _UNIT.get(device)
    if t is None:
        with torch.inference_mode(False):  # a normal tensor, usable with and without autograd
            t = _UNIT[device] = torch.ones((), dtype=torch.float32, device=device)
    return t


def _kernel_operand(scale, g, format):
    """(block scales as uint8 codes, fp32 global scale) as the CPU kernels take them, when that needs no decision;
    else None (the checked path converts or refuses them). The CPU kernels read an nvfp4 global scale wherever it
    lies, so it must be on the CPU here, as the checked path requires it to be with the data."""
    want = SCALE_DTYPES.get(format)
    if want is None or not isinstance(scale, torch.Tensor):
        return None
    if scale.dtype is not torch.uint8:
        if scale.dtype is not want:
            return None
        scale = scale.view(torch.uint8)
    if format == "mxfp4":
        return None if g is not None else (scale, unit_scale(scale.device))
    if not isinstance(g, torch.Tensor) or g.dtype is not torch.float32 or not g.is_cpu:
        return None
    return scale, g


def _fp4_mm_fast(a_packed, a_scale, b_packed, b_scale, out_dtype, bias, format, element, a_global_scale,
                 b_global_scale):
    """fp4_mm on the CPU kernel straight from the arguments when they need no normalization (2-D a_packed, scales
    as :func:`_kernel_operand` takes them): the kernel checks every argument (TORCH_CHECK), so the Python checks are
    left out. None where that does not apply or the kernel refuses the arguments: the checked path then decides (and
    raises its ValueError / TypeError naming the argument). Decode calls a W4A4 layer's GEMM once per token."""
    try:
        fn = cpu_op("fp4_mm", a_packed.device)
        if fn is None or a_packed.dim() != 2 or not a_packed.shape[1]:
            return None
        a = _kernel_operand(a_scale, a_global_scale, format)
        b = _kernel_operand(b_scale, b_global_scale, format)
        if a is None or b is None:
            return None
        return fn(a_packed, a[0], a[1], b_packed, b[0], b[1], format, element, bias, out_dtype)
    except Exception:  # noqa: BLE001  (the checked path reports it)
        return None


def _fp4_weight_only_fast(x, w_packed, w_scale, bias, format, element, w_global_scale):
    """fp4_weight_only_mm on the CPU kernel straight from the arguments, as :func:`_fp4_mm_fast`."""
    try:
        fn = cpu_op("fp4_weight_only_mm", x.device)
        if fn is None:
            return None
        N, half_k = w_packed.shape
        w = _kernel_operand(w_scale, w_global_scale, format) if half_k else None
        if w is None:
            return None
        if x.dim() == 2:
            return fn(x, w_packed, w[0], w[1], format, element, bias)
        return fn(x.reshape(-1, 2 * half_k), w_packed, w[0], w[1], format, element, bias).reshape(*x.shape[:-1], N)
    except Exception:  # noqa: BLE001  (the checked path reports it)
        return None


def fp4_mm(a_packed, a_scale, b_packed, b_scale, out_dtype=torch.bfloat16, bias=None, *, format="mxfp4",
           element="e2m1", a_global_scale=None, b_global_scale=None, backend=None):
    """Block-scaled fp4 GEMM: ``dequant(a) @ dequant(b)^T + bias``, fp32 accumulation.

    Args:
        a_packed: uint8 ``[M, K/2]`` (or ``[..., K/2]``) and a_scale ``[..., K/B]`` from :func:`quantize_fp4`.
        b_packed: uint8 ``[N, K/2]`` (nn.Linear weight layout) and b_scale ``[N, K/B]``.
        a_global_scale, b_global_scale: the fp32 per-tensor scales (nvfp4 only).
        bias: float ``[N]`` or None (added in fp32). out_dtype: float32/bfloat16/float16/float64.
    Returns: ``[..., N]`` in out_dtype. Native block-scaled ``torch._scaled_mm`` on sm100 (e2m1 only), emulated
    (decode to fp32, then matmul) elsewhere.
    """
    if backend is None:
        out = _fp4_mm_fast(a_packed, a_scale, b_packed, b_scale, out_dtype, bias, format, element, a_global_scale,
                           b_global_scale)
        if out is not None:
            return out
    _check_format(format)
    _check_element(element)
    check_out_dtype(out_dtype)
    a2, sa, ga, K = _fp4_operand(a_packed, a_scale, a_global_scale, format, "a_packed", "a_scale", "a_global_scale")
    check_tensor(b_packed, "b_packed", (torch.uint8,), dim=2)
    if b_packed.shape[1] * 2 != K:
        raise ValueError(f"b_packed must have shape [N, K/2] with K/2={K // 2} (a_packed's last dim), got "
                         f"{tuple(b_packed.shape)}")
    b2, sb, gb, _ = _fp4_operand(b_packed, b_scale, b_global_scale, format, "b_packed", "b_scale", "b_global_scale")
    N = b2.shape[0]
    check_bias(bias, N)
    for name, t in (("b_packed", b_packed), ("bias", bias)):
        check_same_device("a_packed", a_packed, name, t)
    args = (a2, sa, ga, b2, sb, gb, format, element, bias, out_dtype)
    out = autograd.run("fp4_mm", args, lambda: call("fp4_mm", args, a_packed.device, backend, format=format,
                                                    element=element, out_dtype=out_dtype, M=a2.shape[0], K=K, N=N))
    return out.reshape(*a_packed.shape[:-1], N)


def fp4_weight_only_mm(x, w_packed, w_scale, bias=None, *, format="mxfp4", element="e2m1", w_global_scale=None,
                       backend=None):
    """Weight-only block-scaled fp4 GEMM: ``x @ dequant(w)^T + bias`` with fp32 accumulation, x not quantized.

    Args:
        x: float32/bfloat16/float16 activations ``[..., K]``; the result has x's dtype.
        w_packed: uint8 ``[N, K/2]`` and w_scale ``[N, K/B]`` from :func:`quantize_fp4` of the weight;
            w_global_scale: its fp32 per-tensor scale (nvfp4 only).
        bias: float ``[N]`` or None.
    Returns: ``[..., N]`` in x's dtype. On CPU a fused kernel decodes the weight in registers for decode-sized
    inputs (up to 16 rows of x, K % 32 == 0); on a GPU the cast kernel decodes it to x's dtype for cuBLAS.
    """
    if backend is None:
        out = _fp4_weight_only_fast(x, w_packed, w_scale, bias, format, element, w_global_scale)
        if out is not None:
            return out
    _check_format(format)
    _check_element(element)
    check_float_tensor(x, "x")
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dim [..., K], got a 0-d tensor")
    check_tensor(w_packed, "w_packed", (torch.uint8,), dim=2)
    K = x.shape[-1]
    if w_packed.shape[1] * 2 != K:
        raise ValueError(f"w_packed must have shape [N, K/2] with K/2={K / 2:g} (half of x's last dim), got "
                         f"{tuple(w_packed.shape)}")
    w2, sw, gw, _ = _fp4_operand(w_packed, w_scale, w_global_scale, format, "w_packed", "w_scale",
                                 "w_global_scale")
    N = w2.shape[0]
    check_bias(bias, N)
    for name, t in (("w_packed", w_packed), ("bias", bias)):
        check_same_device("x", x, name, t)
    x2 = x.reshape(-1, K)
    args = (x2, w2, sw, gw, format, element, bias)
    out = autograd.run("fp4_weight_only_mm", args, lambda: call("fp4_weight_only_mm", args, x.device, backend,
                                                                format=format, element=element, M=x2.shape[0],
                                                                K=K, N=N))
    return out.reshape(*x.shape[:-1], N)


# ---- the native backend: block-scaled torch._scaled_mm (qkernels/dispatch.py fp4_native picks it only where it can
# run). Same positional arguments as the qkernels op schema; call() in ops/_call.py runs it from NATIVE.


def _to_blocked(scale):
    """Block scales [rows, k_blocks] -> the swizzled layout cuBLAS block-scaled GEMMs read: 128 x 4 tiles,
    each rearranged to 32 x 16 (rows padded to 128, k blocks to 4; NVIDIA cuBLAS "1D block scaling factors layout",
    as torchao's mx_formats to_blocked)."""
    rows, cols = scale.shape
    pr, pc = -(-rows // 128) * 128, -(-cols // 4) * 4
    padded = scale
    if (pr, pc) != (rows, cols):
        padded = torch.zeros(pr, pc, dtype=scale.dtype, device=scale.device)
        padded[:rows, :cols] = scale
    blocks = padded.view(pr // 128, 128, pc // 4, 4).permute(0, 2, 1, 3)
    return blocks.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten()


def _native_fp4_mm(a, a_scale, a_global_scale, b, b_scale, b_global_scale, format, element, bias, out_dtype):
    """Block-scaled torch._scaled_mm on sm100: float4_e2m1fn_x2 operands, e8m0 (MXFP4) or e4m3 (NVFP4) scales in
    the swizzled layout; NVFP4's per-tensor scales multiply the fp32 result."""
    sdt = torch.float8_e8m0fnu if format == "mxfp4" else torch.float8_e4m3fn
    a4 = a.contiguous().view(torch.float4_e2m1fn_x2)
    b4 = b.contiguous().view(torch.float4_e2m1fn_x2)
    sa = _to_blocked(a_scale.view(torch.uint8)).view(sdt)
    sb = _to_blocked(b_scale.view(torch.uint8)).view(sdt)
    out = torch._scaled_mm(a4, b4.t(), sa, sb, out_dtype=torch.bfloat16).float()
    if format == "nvfp4":
        out = out * (a_global_scale.float() * b_global_scale.float())
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


NATIVE["fp4_mm"] = _native_fp4_mm


# ---- fake (meta) kernels ---------------------------------------------------------------------------------------
if _ext.HAS_C:

    @torch.library.register_fake("qkernels::fp4_encode")
    def _(x, element):
        torch._check(x.shape[-1] % 2 == 0, lambda: "the last dim of x must be even")
        return x.new_empty((*x.shape[:-1], x.shape[-1] // 2), dtype=torch.uint8)

    @torch.library.register_fake("qkernels::fp4_decode")
    def _(packed, element, out_dtype):
        return packed.new_empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=out_dtype)

    @torch.library.register_fake("qkernels::quantize_fp4")
    def _(x, format, element, global_scale):
        B = FORMATS[format]
        R, K = x.shape
        return (x.new_empty((R, K // 2), dtype=torch.uint8), x.new_empty((R, K // B), dtype=torch.uint8),
                x.new_empty((), dtype=torch.float32))

    @torch.library.register_fake("qkernels::dequantize_fp4")
    def _(packed, scale, global_scale, format, element, out_dtype):
        return packed.new_empty((packed.shape[0], packed.shape[1] * 2), dtype=out_dtype)

    @torch.library.register_fake("qkernels::fp4_mm")
    def _(a, a_scale, a_global_scale, b, b_scale, b_global_scale, format, element, bias, out_dtype):
        return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("qkernels::fp4_weight_only_mm")
    def _(x, w, w_scale, w_global_scale, format, element, bias):
        return x.new_empty((x.shape[0], w.shape[0]))
