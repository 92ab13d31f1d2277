"""Runs an op on the backend the dispatch table picks. Every public function in qkernels.ops ends here."""

from __future__ import annotations

import os

import torch

from .. import _ext, dispatch
from .. import reference as _reference

# op name -> callable for the "native" backend (torch's own hardware ops). The fp8 / fp4 scaled GEMMs below are the
# only ones; they live here, not in ops/float8.py / float4.py, because this module calls them (and the families
# import from it: the other way round would be an import cycle).
NATIVE: dict = {}


# ---- fp8 / fp4 scaled GEMMs on torch._scaled_mm (the dispatch table only picks these where they can run:
# qkernels/dispatch.py fp8_native / fp4_native). Same positional arguments as the qkernels op schemas.


def _native_fp8_mm(a, a_scale, a_dtype, b, b_scale, b_dtype, bias, out_dtype):
    """torch._scaled_mm for tensor-wise and row-wise scales: a [M, K] row-major, b [N, K] -> b.t() column-major."""
    M, N = a.shape[0], b.shape[0]
    a8, b8 = a.contiguous().view(a_dtype), b.contiguous().view(b_dtype)
    if a_scale.numel() == 1 and b_scale.numel() == 1:
        # tensor-wise: ask for an fp32 result (cuBLAS accumulates in fp32) and add bias in fp32, like the emulation
        out = torch._scaled_mm(a8, b8.t(), a_scale.reshape(()), b_scale.reshape(()), out_dtype=torch.float32)
        if bias is not None:
            out = out + bias.float()
        return out.to(out_dtype)
    if a_scale.shape[1] > 1 or b_scale.shape[1] > 1:
        return _native_fp8_mm_blockwise(a8, b8, a_scale, b_scale, bias)
    # row-wise (scale_a [M, 1], scale_b [1, N] fp32; bf16 output, bf16 bias fused): the table routes only bf16 here
    sa = a_scale.float().expand(M, 1).contiguous()
    sb = b_scale.float().reshape(-1).expand(N).reshape(1, N).contiguous()
    return torch._scaled_mm(a8, b8.t(), sa, sb, bias=None if bias is None else bias.to(torch.bfloat16),
                            out_dtype=torch.bfloat16).to(out_dtype)


def _native_fp8_mm_blockwise(a8, b8, a_scale, b_scale, bias):
    """sm90 block-wise fp8 (dispatch.fp8_native_blockwise): a_scale [M, K/128] (1x128 blocks), b_scale [N, K/128]
    (1x128) or [N/128, K/128] (128x128). Scale layouts as in torch's own scaled_mm samples
    (torch/testing/_internal/common_methods_invocations.py, sample_inputs_scaled_mm_v2): 1x128 scales "outer-dim
    major" ([K/128, rows] contiguous, seen transposed), 128x128 scales [N/128, K/128] contiguous, seen transposed.
    bf16 result; the bias is added in fp32 like the emulation, then rounded once more to bf16."""
    from torch.nn.functional import ScalingType, SwizzleType, scaled_mm

    N = b8.shape[0]
    sa = a_scale.float().t().contiguous().t()
    if b_scale.shape[0] == N:
        sb, rb = b_scale.float().t().contiguous().t(), ScalingType.BlockWise1x128
    else:
        sb, rb = b_scale.float().contiguous().t(), ScalingType.BlockWise128x128
    out = scaled_mm(a8, b8.t(), sa, ScalingType.BlockWise1x128, sb, rb, swizzle_a=SwizzleType.NO_SWIZZLE,
                    swizzle_b=SwizzleType.NO_SWIZZLE, output_dtype=torch.bfloat16)
    if bias is not None:
        out = (out.float() + bias.float()).to(torch.bfloat16)
    return out


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


NATIVE["fp8_mm"] = _native_fp8_mm
NATIVE["fp4_mm"] = _native_fp4_mm


def _overload(op: str):
    return getattr(torch.ops.qkernels, op).default


# (op, device, shape class) -> the compiled kernel's OpOverload, or None where an unforced call runs something else
_COMPILED: dict = {}
# QKERNELS_BACKEND is read on every call: os.environ.get costs ~1 us (it encodes the key), a look-up in the mapping
# os.environ keeps in sync (its _data, what os.environ.get reads too) ~0.05 us; a call decodes the value only when
# the variable is set
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("QKERNELS_BACKEND") if _ENV_DATA is not None else None


def backend_forced_by_env() -> bool:
    if _ENV_DATA is None:
        return bool(os.environ.get("QKERNELS_BACKEND"))
    return bool(_ENV_DATA.get(_ENV_KEY))


def compiled_op(op: str, device: torch.device, **ctx):
    """The op's compiled kernel (``torch.ops.qkernels.<op>.default``) when an unforced call on ``device`` runs it
    (the dispatch table picks "cpu" or "cuda"), else None: then go through :func:`call`.

    The decode hot path: the answer is cached per (op, device, :func:`dispatch.shape_class` of ``ctx``), so a call
    costs a dict lookup instead of a walk of the table. Never cached and always None under torch.compile (the caller
    takes its traceable path), ``mock_device`` or QKERNELS_BACKEND (read on every call, so setting it takes effect at
    once): there ``call`` runs ``choose``. The compiled kernels check their arguments themselves (TORCH_CHECK), so a
    caller may skip its Python-side checks when it gets an op here and run them only if the kernel raises, to turn
    the kernel's message into the Python one."""
    if dispatch._MOCK is not None or backend_forced_by_env() or torch.compiler.is_compiling():
        return None
    key = (op, device) if device.type == "cpu" else (op, device, dispatch.shape_class(ctx))
    try:
        return _COMPILED[key]
    except KeyError:
        pass
    if device.type == "cpu":
        fn = _overload(op) if dispatch.cpu_fast_path(op) else None  # without choose: see dispatch.cpu_fast_path
    else:
        fn = _overload(op) if dispatch.choose(op, device, **ctx).backend == "cuda" else None
    _COMPILED[key] = fn
    return fn


def call(op: str, args: tuple, device: torch.device, backend: str | None = None, **ctx):
    """``args`` are the schema's positional arguments. Under torch.compile the registered op is called directly
    (its fake kernel makes it traceable; the dispatcher then picks the CPU/CUDA kernel)."""
    if torch.compiler.is_compiling() and _ext.HAS_C:
        return getattr(torch.ops.qkernels, op)(*args)
    if backend is None:
        fn = compiled_op(op, device, **ctx)
        if fn is not None:
            return fn(*args)
    decision = dispatch.choose(op, device, backend, **ctx)
    b = decision.backend
    if b in ("cpu", "cuda"):
        return getattr(torch.ops.qkernels, op)(*args)
    if b == "triton":
        from .. import triton as qtriton

        return qtriton.get(op)(*args)
    if b == "native":
        return NATIVE[op](*args)
    return _reference.OPS[op](*args)
