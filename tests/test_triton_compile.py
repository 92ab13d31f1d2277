"""The Triton cast, W8A8 and GGUF decode kernels compile for real GPU targets (NVIDIA sm90 / sm100, AMD gfx942), checked
offline: triton.compile needs no GPU. The interpreter tests (tests/test_triton.py) check the numerics on CPU but run
numpy, not the compiler; this catches what only code generation rejects. Results on a GPU:
tests/test_cuda_float_kernels.py."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":  # pragma: no cover
    pytest.skip("the interpreter replaces the compiler", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from qkernels.reference.gguf import BLOCK as GGML_BLOCK  # noqa: E402
from qkernels.triton import float_cast as fc  # noqa: E402
from qkernels.triton import float_gemm as fg  # noqa: E402
from qkernels.triton import gguf as tg  # noqa: E402
from qkernels.triton import int8_dynamic as i8  # noqa: E402

TARGETS = {"sm90": GPUTarget("cuda", 90, 32), "sm100": GPUTarget("cuda", 100, 32),
           "gfx942": GPUTarget("hip", "gfx942", 64)}


def _compile(fn, types: dict, consts: dict, target, options=None):
    sig = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target, options=options)


def _cases():
    enc8 = fc._encoder(torch.float8_e4m3fnuz, False)
    enc4 = fc._encoder("e2m1", True)
    return {
        "quantize_fp8": (fc._quantize_fp8_kernel, {"x_ptr": "*i16", "s_ptr": "*fp32", "q_ptr": "*u8", "n": "i64",
                                                   "C": "i32", "br": "i32", "bc": "i32", "nbc": "i32"},
                         {"IN_BF16": True, "BLOCK": 1024, **enc8}),
        "quantize_fp4": (fc._quantize_fp4_kernel, {"x_ptr": "*fp16", "g_ptr": "*fp32", "e4m3_lut_ptr": "*fp32",
                                                   "packed_ptr": "*u8", "scale_ptr": "*u8", "nblocks": "i32"},
                         {"ELEM_MAX": 6.0, "ELEM_EMAX": 2, "B": 16, "NV": True, "IN_BF16": False, "NBP": 32, **enc4}),
        "dequantize_fp4": (fc._dequantize_fp4_kernel, {"p_ptr": "*u8", "s_ptr": "*u8", "g_ptr": "*fp32",
                                                       "elem_lut_ptr": "*fp32", "e4m3_lut_ptr": "*fp32",
                                                       "out_ptr": "*i16", "n_bytes": "i64"},
                           {"B": 32, "NV": False, "OUT_BF16": True, "BLOCK": 1024}),
        "int8_mm": (i8._int8_mm_kernel, {"a_ptr": "*i8", "w_ptr": "*i8", "sa_ptr": "*fp32", "sw_ptr": "*fp32",
                                         "out_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32"},
                    {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}),
    }


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("kernel", ["quantize_fp8", "quantize_fp4", "dequantize_fp4", "int8_mm"])
def test_kernel_compiles(kernel, target):
    fn, types, consts = _cases()[kernel]
    k = _compile(fn, types, consts, TARGETS[target])
    asm = k.asm.get("ptx") or k.asm.get("amdgcn") or ""
    assert asm
    if kernel == "int8_mm":  # the int8 dot must reach the tensor cores / matrix cores
        assert "mma" in asm or "mfma" in asm


@pytest.mark.parametrize("out", ["*fp32", "*i16"])
@pytest.mark.parametrize("type", tg.TYPES)
def test_gguf_decode_compiles_without_fma(type, out):
    """Every GGUF type's decode compiles for sm90 (fp32 and bf16-bits output), and with enable_fp_fusion=False (what
    the launcher passes) no multiply-add is contracted to an FMA, which would break bit-exactness with ggml."""
    bs, ts = GGML_BLOCK[type]
    consts = {"TYPE": type, "BS": bs, "TS": ts, "QS": tg._QS[type], "OUT_BF16": out == "*i16", "BLOCK": tg.BLOCK}
    k = _compile(tg._gguf_dequantize_kernel, {"data_ptr": "*u8", "out_ptr": out, "n": "i64"}, consts,
                 TARGETS["sm90"], {"enable_fp_fusion": False})
    ptx = k.asm["ptx"]
    assert "mul.rn.f32" in ptx and "fma" not in ptx


@pytest.mark.parametrize("type", [12, 14, 39])
def test_gguf_decode_compiles_for_rocm(type):
    bs, ts = GGML_BLOCK[type]
    consts = {"TYPE": type, "BS": bs, "TS": ts, "QS": tg._QS[type], "OUT_BF16": False, "BLOCK": tg.BLOCK}
    k = _compile(tg._gguf_dequantize_kernel, {"data_ptr": "*u8", "out_ptr": "*fp16", "n": "i64"}, consts,
                 TARGETS["gfx942"], {"enable_fp_fusion": False})
    assert k.asm.get("amdgcn")


@pytest.mark.parametrize("target", ["sm90", "gfx942"])
@pytest.mark.parametrize("fp4", [False, True])
def test_float_weight_only_mm_compiles_to_mma(target, fp4):
    """The fp8 / fp4 weight-only GEMM (bf16 x, split-K) compiles and its dot reaches the tensor / matrix cores."""
    types = {"x_ptr": "*bf16", "f_ptr": "*fp32", "w_ptr": "*u8", "s_ptr": "*u8" if fp4 else "*fp32",
             "lut_ptr": "*fp32", "slut_ptr": "*fp32", "out_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32", "br": "i32", "bc": "i32",
             "nbc": "i32", "m_bucket": "i32"}
    consts = {"FP4": fp4, "B": 32, "FP32_X": False, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 4}
    k = _compile(fg._float_weight_mm_kernel, types, consts, TARGETS[target])
    asm = k.asm.get("ptx") or k.asm.get("amdgcn") or ""
    assert "mma" in asm or "mfma" in asm
