"""Integer dequant-GEMMs (W4A16, W8A16, W8A8, W4A8): public functions and fake kernels.

All take activations ``x`` of shape ``[..., K]`` in float32/bf16/fp16 and a weight stored ``[N, K]`` like
``nn.Linear.weight``, and return ``x @ W^T`` of shape ``[..., N]`` in x's dtype. Semantics:
:mod:`qkernels.reference.int_gemm`.
"""

from __future__ import annotations

import torch

from .. import _ext
from . import autograd
from ._call import backend_forced_by_env, call, compiled_op
from ._validate import FLOAT_DTYPES, check_float_tensor, check_same_device, check_tensor


def _flatten_x(x):
    check_float_tensor(x, "x")
    d = x.dim()
    if d == 0:
        raise ValueError("x must have at least 1 dim [..., K], got a 0-d tensor")
    return x if d == 2 else x.reshape(-1, x.shape[-1])


def _run_compiled(fn, x, args, check):
    """Run the compiled kernel ``fn`` on ``x`` flattened to 2-D and ``args``, skipping the Python-side checks: the
    kernel checks every argument itself (TORCH_CHECK). If it raises, ``check()`` runs the Python checks, which raise
    the ValueError / TypeError naming the argument; if they pass, the kernel's own error stands. Decode calls the
    op once per layer per token, and the Python checks cost more than the kernel on small layers (issue 18)."""
    try:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        out = fn(x2, *args)
    except Exception:
        check()
        raise
    return out if x2 is x else out.reshape(*x.shape[:-1], out.shape[1])


def _check_int4_args(x, packed_w, scale, zero_point, group_size):
    """The Python-side checks of int4_weight_only_mm; returns (x as [M, Kx], N). K = 2 * packed_w.shape[1] is the
    weight's (stored) width; x holds Kx = K columns, or fewer within a ragged last group (see int4_weight_only_mm)."""
    x2 = _flatten_x(x)
    Kx = x2.shape[1]
    check_tensor(packed_w, "packed_w", (torch.uint8,), dim=2)
    N, half_k = packed_w.shape
    K = half_k * 2
    if K < Kx:
        raise ValueError(f"packed_w must have shape [N, K/2] with K={Kx} (x's last dim), got {tuple(packed_w.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or K % group_size:
        raise ValueError(f"group_size must be a positive divisor of K={K}, got {group_size!r} (K: 2 * packed_w.shape[1])")
    if K - Kx >= group_size:
        raise ValueError(f"packed_w must have shape [N, K/2] with K={Kx} (x's last dim), got "
                         f"{tuple(packed_w.shape)}: x may be shorter than the weight's K={K} only within its last "
                         f"group, K - group_size < x's last dim <= K (group_size={group_size})")
    check_tensor(scale, "scale", FLOAT_DTYPES, dim=2)
    s_shape = scale.shape
    if s_shape[0] != N or s_shape[1] != K // group_size:
        raise ValueError(f"scale must have shape [N, K/group_size] = {(N, K // group_size)}, got {tuple(s_shape)}")
    if zero_point is not None:
        check_tensor(zero_point, "zero_point", (torch.int32,), dim=2)
        if zero_point.shape != s_shape:
            raise ValueError(f"zero_point must have the shape of scale {tuple(s_shape)}, got {tuple(zero_point.shape)}")
    device = x.device
    for name, t in (("packed_w", packed_w), ("scale", scale), ("zero_point", zero_point)):
        if t is not None and t.device != device:
            raise ValueError(f"{name} must be on the same device as x ({device}), got {t.device}")
    return x2, N


def int4_weight_only_mm(x, packed_w, scale, zero_point=None, group_size=128, *, signed=True, backend=None):
    """W4A16: ``x @ dequant(W)^T`` with W = scale * (q - zero_point) per group of ``group_size`` along K.

    Args:
        x: float32/bf16/fp16 ``[..., Kx]`` with ``Kx = K``, or ``K - group_size < Kx < K`` for a weight whose ragged
            last group is stored padded to whole groups (e.g. K = 576 as 640 with group 128): x's missing columns
            count as zeros, so the call equals one with x zero-padded to K, and the CPU kernel skips the padding
            columns' work instead of padding x (other backends get x padded here).
        packed_w: uint8 ``[N, K/2]`` from :func:`qkernels.pack_int4` (element 2i in the low nibble).
        scale: float ``[N, K // group_size]``.
        zero_point: int32 ``[N, K // group_size]`` in [-8, 16], or None (0).
        group_size: divisor of K; K means per-channel.
        signed: nibbles hold int4 in [-8, 7] (pack_int4 of int8 codes) or, if False, [0, 15] (of uint8 codes).
    Returns: ``[..., N]`` in x's dtype.
    """
    return _int4_mm("int4_weight_only_mm", x, packed_w, scale, zero_point, group_size, signed, backend)


def _int4_mm(op, x, packed_w, scale, zero_point, group_size, signed, backend):
    """The public call of an op with int4_weight_only_mm's arguments (``op``: it or int8_dynamic_int4_mm)."""
    if backend is None and type(group_size) is int and isinstance(x, torch.Tensor):
        fn = compiled_op(op, x.device)
        if fn is not None:
            return _run_compiled(fn, x, (packed_w, scale, zero_point, group_size, bool(signed)),
                                 lambda: _check_int4_args(x, packed_w, scale, zero_point, group_size))
    x2, N = _check_int4_args(x, packed_w, scale, zero_point, group_size)
    K = packed_w.shape[1] * 2
    if x2.shape[1] != K and not _takes_ragged_x(x2, backend):
        x2 = torch.nn.functional.pad(x2, (0, K - x2.shape[1]))
    args = (x2, packed_w, scale, zero_point, group_size, bool(signed))
    # autograd.run: the chosen backend (Triton, the reference ...) gets the same grad_x formula as the C++ kernel
    out = autograd.run(op, args, lambda: call(
        op, args, x.device, backend, dtype=x.dtype, M=x2.shape[0], K=K, N=N, group_size=group_size))
    return out if x2 is x else out.reshape(*x.shape[:-1], N)


def int8_dynamic_int4_mm(x, packed_w, scale, zero_point=None, group_size=128, *, signed=True, backend=None):
    """W4A8 ("8da4w"): the int4 weight of :func:`int4_weight_only_mm` (same arguments, same storage) times x
    quantized on the fly to int8 per row and per weight group (symmetric, ``scale = amax / 127``, as llama.cpp's
    Q8_0 activations but one scale per weight group), with exact integer products inside each group. Faster than
    W4A16 on CPUs at decode sizes (u8 x s8 ``vpmaddubsw`` multiplies 32 pairs per instruction), at the cost of
    rounding x to 8 bits (relative error up to ~1/254 of each group's largest |x|). Semantics:
    :func:`qkernels.reference.int_gemm.int8_dynamic_int4_mm`. Returns ``[..., N]`` in x's dtype.
    """
    return _int4_mm("int8_dynamic_int4_mm", x, packed_w, scale, zero_point, group_size, signed, backend)


def _takes_ragged_x(x2, backend) -> bool:
    """Whether the backend that runs takes an x shorter than the int4 weight (a ragged last group): the C++ CPU kernel
    and the reference do; the CUDA and Triton kernels want x padded to K. A forced backend (argument or
    QKERNELS_BACKEND) other than those two gets x padded, whatever it is."""
    if x2.device.type != "cpu":
        return False
    if backend is None and not backend_forced_by_env():
        return True
    return backend in ("cpu", "reference")


def _check_int8_args(x, q_w, scale, scale_name):
    """The Python-side checks of the W8A16 / W8A8 GEMMs (int8 ``q_w [N, K]``, per-channel ``scale [N]``); returns
    x as [M, K]."""
    x2 = _flatten_x(x)
    K = x.shape[-1]
    check_tensor(q_w, "q_w", (torch.int8,), dim=2)
    if q_w.shape[1] != K:
        raise ValueError(f"q_w must have shape [N, K] with K={K} (x's last dim), got {tuple(q_w.shape)}")
    check_tensor(scale, scale_name, FLOAT_DTYPES, dim=1)
    if scale.shape[0] != q_w.shape[0]:
        raise ValueError(f"{scale_name} must have shape [N] = [{q_w.shape[0]}], got {tuple(scale.shape)}")
    check_same_device("x", x, "q_w", q_w)
    check_same_device("x", x, scale_name, scale)
    return x2


def _int8_mm(op, x, q_w, scale, scale_name, backend):
    if backend is None and isinstance(x, torch.Tensor):
        fn = compiled_op(op, x.device)
        if fn is not None:
            return _run_compiled(fn, x, (q_w, scale), lambda: _check_int8_args(x, q_w, scale, scale_name))
    x2 = _check_int8_args(x, q_w, scale, scale_name)
    # W8A16 on CUDA: the C++ host picks decode kernel or cuBLAS from these (dispatch.int_gemm_cuda_path explains it)
    ctx = dict(dtype=x.dtype, M=x2.shape[0], K=x2.shape[1]) if op == "int8_weight_only_mm" else {}
    args = (x2, q_w, scale)
    out = autograd.run(op, args, lambda: call(op, args, x.device, backend, **ctx))
    return out if x2 is x else out.reshape(*x.shape[:-1], q_w.shape[0])


def int8_weight_only_mm(x, q_w, scale, *, backend=None):
    """W8A16: ``x @ (q_w * scale[:, None])^T``.

    Args:
        x: float32/bf16/fp16 ``[..., K]``; q_w: int8 ``[N, K]``; scale: float ``[N]`` (per output channel).
    """
    return _int8_mm("int8_weight_only_mm", x, q_w, scale, "scale", backend)


def quantize_per_token_int8(x, *, backend=None):
    """Symmetric per-token int8 of ``x [..., K]`` -> (int8 codes in [-127, 127], fp32 scale ``[...]``).
    Rows with NaN/inf get scale NaN (so downstream GEMM rows are NaN, never silently finite)."""
    x2 = _flatten_x(x)
    with torch.no_grad():  # codes and scales of a rounding: never part of the autograd graph
        q, s = call("quantize_per_token_int8", (x2,), x.device, backend)
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


def int8_dynamic_mm(x, q_w, w_scale, *, backend=None):
    """W8A8: x quantized per token to int8 (:func:`quantize_per_token_int8`), int32-exact products with the int8
    weight ``q_w [N, K]``, scaled by ``x_scale[m] * w_scale[n]``. Returns ``[..., N]`` in x's dtype."""
    return _int8_mm("int8_dynamic_mm", x, q_w, w_scale, "w_scale", backend)


if _ext.HAS_C:

    @torch.library.register_fake("qkernels::int4_weight_only_mm")
    def _(x, packed_w, scale, zero_point, group_size, is_signed):
        return x.new_empty((x.shape[0], packed_w.shape[0]))

    @torch.library.register_fake("qkernels::int8_dynamic_int4_mm")
    def _(x, packed_w, scale, zero_point, group_size, is_signed):
        return x.new_empty((x.shape[0], packed_w.shape[0]))

    @torch.library.register_fake("qkernels::int8_weight_only_mm")
    def _(x, q_w, scale):
        return x.new_empty((x.shape[0], q_w.shape[0]))

    @torch.library.register_fake("qkernels::quantize_per_token_int8")
    def _(x):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("qkernels::int8_dynamic_mm")
    def _(x, q_w, w_scale):
        return x.new_empty((x.shape[0], q_w.shape[0]))
