"""Helpers shared by the Triton kernel modules: launch options, exact rounding / loads / stores that behave the same
on GPUs and under the CPU interpreter, and the reference's code-value tables."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..reference import float4 as ref4
from ..reference import float8 as ref8

# 1.5 * 2^23: (v + M) - M rounds v to the nearest integer, ties to even, for |v| <= 2^22
_RNE_MAGIC = tl.constexpr(12582912.0)
# 2^22; codes are clamped to at most 8 bits afterwards, so clamping here changes nothing
_RNE_LIMIT = tl.constexpr(4194304.0)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_opts() -> dict:
    # the interpreter runs numpy, which never contracts; on GPUs turn Triton's default FMA fusion off
    return {} if interpreting() else {"enable_fp_fusion": False}


@triton.jit
def round_half_even(v):
    v = tl.minimum(tl.maximum(v, -_RNE_LIMIT), _RNE_LIMIT)
    return (v + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def load_f32(ptr, offs, mask, IN_BF16: tl.constexpr):
    """Loads as fp32; bf16 inputs (ptr is the tensor viewed as int16) widen on the bits, exactly: the interpreter's
    own bf16 -> fp32 conversion gets subnormals wrong."""
    if IN_BF16:
        return ((tl.load(ptr + offs, mask=mask, other=0).to(tl.int32) & 0xFFFF) << 16).to(tl.float32, bitcast=True)
    return tl.load(ptr + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def store_float(ptr, offs, v, mask, OUT_BF16: tl.constexpr):
    """Stores fp32 v; for bf16 outputs (ptr is the bf16 tensor viewed as int16) rounds to nearest even by hand."""
    if OUT_BF16:
        bits = v.to(tl.uint32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(v != v, 0x7FC0, r)  # NaN stays a quiet NaN (the rounding carry could reach the sign)
        tl.store(ptr + offs, r.to(tl.int16), mask=mask)
    else:
        tl.store(ptr + offs, v.to(ptr.dtype.element_ty), mask=mask)


_VALUE_TABLES: dict = {}


def value_table(fmt, device) -> torch.Tensor:
    """fp32 value of every code of an fp8 dtype (256) or fp4 element format (16), from the reference."""
    key = (fmt, str(device))
    if key not in _VALUE_TABLES:
        if isinstance(fmt, str):
            t = ref4.element_values(fmt)
        else:
            t = ref8.fp8_bits_to_float(torch.arange(256, dtype=torch.uint8), fmt)
        _VALUE_TABLES[key] = t.to(device)
    return _VALUE_TABLES[key]


def kernel_input(x):
    """Contiguous kernel input; bf16 as its int16 bits (see load_f32)."""
    x = x.contiguous()
    return x.view(torch.int16) if x.dtype == torch.bfloat16 else x
