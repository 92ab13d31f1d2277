"""Integer dequant-GEMMs (W4A16, W8A16, W8A8): public functions and fake kernels.

All take activations ``x`` of shape ``[..., K]`` in float32/bf16/fp16 and a weight stored ``[N, K]`` like
``nn.Linear.weight``, and return ``x @ W^T`` of shape ``[..., N]`` in x's dtype. Semantics:
:mod:`qkernels.reference.int_gemm`.
"""

from __future__ import annotations

import torch

from .. import _ext
from ._call import call
from ._validate import FLOAT_DTYPES, check_float_tensor, check_same_device, check_tensor


def _flatten_x(x):
    check_float_tensor(x, "x")
    d = x.dim()
    if d == 0:
        raise ValueError("x must have at least 1 dim [..., K], got a 0-d tensor")
    return x if d == 2 else x.reshape(-1, x.shape[-1])


def int4_weight_only_mm(x, packed_w, scale, zero_point=None, group_size=128, *, signed=True, backend=None):
    """W4A16: ``x @ dequant(W)^T`` with W = scale * (q - zero_point) per group of ``group_size`` along K.

    Args:
        x: float32/bf16/fp16 ``[..., K]``.
        packed_w: uint8 ``[N, K/2]`` from :func:`qkernels.pack_int4` (element 2i in the low nibble).
        scale: float ``[N, K // group_size]``.
        zero_point: int32 ``[N, K // group_size]`` in [-8, 16], or None (0).
        group_size: divisor of K; K means per-channel.
        signed: nibbles hold int4 in [-8, 7] (pack_int4 of int8 codes) or, if False, [0, 15] (of uint8 codes).
    Returns: ``[..., N]`` in x's dtype.
    """
    # decode calls this once per layer per token, so the checks avoid repeated shape/attribute lookups (~10 us saved)
    x2 = _flatten_x(x)
    K = x2.shape[1]
    check_tensor(packed_w, "packed_w", (torch.uint8,), dim=2)
    N, half_k = packed_w.shape
    if half_k * 2 != K:
        raise ValueError(f"packed_w must have shape [N, K/2] with K={K} (x's last dim), got {tuple(packed_w.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or K % group_size:
        raise ValueError(f"group_size must be a positive divisor of K={K}, got {group_size!r}")
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
    out = call("int4_weight_only_mm", (x2, packed_w, scale, zero_point, group_size, bool(signed)), device, backend,
               dtype=x.dtype, M=x2.shape[0], K=K, N=N, group_size=group_size)
    return out if x2 is x else out.reshape(*x.shape[:-1], N)


def int8_weight_only_mm(x, q_w, scale, *, backend=None):
    """W8A16: ``x @ (q_w * scale[:, None])^T``.

    Args:
        x: float32/bf16/fp16 ``[..., K]``; q_w: int8 ``[N, K]``; scale: float ``[N]`` (per output channel).
    """
    x2 = _flatten_x(x)
    K = x.shape[-1]
    check_tensor(q_w, "q_w", (torch.int8,), dim=2)
    if q_w.shape[1] != K:
        raise ValueError(f"q_w must have shape [N, K] with K={K} (x's last dim), got {tuple(q_w.shape)}")
    check_tensor(scale, "scale", FLOAT_DTYPES, dim=1)
    if scale.shape[0] != q_w.shape[0]:
        raise ValueError(f"scale must have shape [N] = [{q_w.shape[0]}], got {tuple(scale.shape)}")
    check_same_device("x", x, "q_w", q_w)
    check_same_device("x", x, "scale", scale)
    out = call("int8_weight_only_mm", (x2, q_w, scale), x.device, backend, dtype=x.dtype, M=x2.shape[0], K=K)
    return out if x2 is x else out.reshape(*x.shape[:-1], q_w.shape[0])


def quantize_per_token_int8(x, *, backend=None):
    """Symmetric per-token int8 of ``x [..., K]`` -> (int8 codes in [-127, 127], fp32 scale ``[...]``).
    Rows with NaN/inf get scale NaN (so downstream GEMM rows are NaN, never silently finite)."""
    x2 = _flatten_x(x)
    q, s = call("quantize_per_token_int8", (x2,), x.device, backend)
    return q.reshape(x.shape), s.reshape(x.shape[:-1])


def int8_dynamic_mm(x, q_w, w_scale, *, backend=None):
    """W8A8: x quantized per token to int8 (:func:`quantize_per_token_int8`), int32-exact products with the int8
    weight ``q_w [N, K]``, scaled by ``x_scale[m] * w_scale[n]``. Returns ``[..., N]`` in x's dtype."""
    x2 = _flatten_x(x)
    K = x.shape[-1]
    check_tensor(q_w, "q_w", (torch.int8,), dim=2)
    if q_w.shape[1] != K:
        raise ValueError(f"q_w must have shape [N, K] with K={K} (x's last dim), got {tuple(q_w.shape)}")
    check_tensor(w_scale, "w_scale", FLOAT_DTYPES, dim=1)
    if w_scale.shape[0] != q_w.shape[0]:
        raise ValueError(f"w_scale must have shape [N] = [{q_w.shape[0]}], got {tuple(w_scale.shape)}")
    check_same_device("x", x, "q_w", q_w)
    check_same_device("x", x, "w_scale", w_scale)
    out = call("int8_dynamic_mm", (x2, q_w, w_scale), x.device, backend, dtype=x.dtype, M=x2.shape[0], K=K)
    return out if x2 is x else out.reshape(*x.shape[:-1], q_w.shape[0])


if _ext.HAS_C:

    @torch.library.register_fake("qkernels::int4_weight_only_mm")
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
