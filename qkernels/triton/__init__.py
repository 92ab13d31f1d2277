"""Triton kernels: the GPU fallback when the CUDA extension lacks an op or an arch, and the ROCm path.

Kernel modules register a Python callable per op name (same positional arguments as the op schema) with
:func:`register`. Importing this package never requires triton; the kernel modules are imported on first use.
"""

from __future__ import annotations

import importlib

KERNELS: dict = {}
# op name -> module that implements it (imported lazily so that `import qkernels` works without triton)
MODULES: dict[str, str] = {
    "choose_qparams_affine": "int_quant",
    "pack_int4": "int_quant",
    "unpack_int4": "int_quant",
    "quantize_affine": "int_quant",
    "dequantize_affine": "int_quant",
    "int4_weight_only_mm": "int_gemm",
    "int8_weight_only_mm": "int_gemm",
    "quantize_per_token_int8": "int8_dynamic",
    "int8_dynamic_mm": "int8_dynamic",
    "int8_dynamic_int4_mm": "int8_dynamic",
    "quantize_fp8": "float_cast",
    "dequantize_fp8": "float_cast",
    "fp4_encode": "float_cast",
    "fp4_decode": "float_cast",
    "quantize_fp4": "float_cast",
    "dequantize_fp4": "float_cast",
    "fp8_weight_only_mm": "float_gemm",
    "fp4_weight_only_mm": "float_gemm",
    "gguf_dequantize": "gguf",
    "gguf_mm": "gguf",
}
_loaded: set[str] = set()


def register(op: str):
    def deco(fn):
        KERNELS[op] = fn
        return fn

    return deco


def _gguf_types(op: str, ctx: dict) -> str | None:
    from ..reference import gguf as ref

    t, have = ctx.get("type"), ref.types_with("triton", op)
    if t is not None and t not in have:
        return f"no Triton decoder for ggml type {ref.TYPE_NAMES.get(t, t)} (it has {ref.describe_types(have)})"
    return None


# op -> what else a call must satisfy: ctx -> None, or why this backend has no kernel for it. The GGUF decoder's
# types come from the reference's type table (its ``kernels`` column), not from a list kept here.
_LIMITS = {
    "gguf_dequantize": lambda ctx: _gguf_types("gguf_dequantize", ctx),
    "gguf_mm": lambda ctx: _gguf_types("gguf_mm", ctx),
}


def unsupported(op: str, ctx: dict | None = None) -> str | None:
    """Why the Triton backend has no kernel for ``op`` with the dispatch context ``ctx`` (dtypes, ggml type, ...),
    or None when it has one. Never imports triton."""
    if op not in MODULES and op not in KERNELS:
        return f"no Triton kernel for {op}"
    limit = _LIMITS.get(op)
    return limit(ctx or {}) if limit is not None else None


def has_kernel(op: str, ctx: dict | None = None) -> bool:
    """Whether the Triton backend implements ``op`` for a call with context ``ctx`` (what the dispatch table asks)."""
    return unsupported(op, ctx) is None


def get(op: str):
    if op not in KERNELS and op in MODULES and MODULES[op] not in _loaded:
        importlib.import_module(f"{__name__}.{MODULES[op]}")
        _loaded.add(MODULES[op])
    return KERNELS[op]
