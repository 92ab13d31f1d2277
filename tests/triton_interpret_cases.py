"""Triton kernel cases, run by tests/test_triton.py in a fresh interpreter with TRITON_INTERPRET=1 (not collected
on its own: the file name does not match test_*.py).

Why a separate process: whether a ``@triton.jit`` function (ours, and triton.language's own tl.min/tl.cdiv) is
interpreted is decided when it is decorated, i.e. when triton is imported; a test session that imported triton
earlier (torch.compile does) would otherwise get compiled kernels that cannot take CPU tensors, and setting the
variable in-process would leak the interpreter into GPU tests collected later.

Limits of the interpreter: it stores bf16 as raw uint16 and multiplies those in ``tl.dot`` and it truncates
fp32 -> bf16 casts, so the bf16-activation GEMM is verified on GPU only (tests/test_cuda_kernels.py); the bf16
*dequantize* output is rounded by hand in the kernel and is tested here.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - only when someone runs this file by hand
    pytest.skip("run through tests/test_triton.py (needs TRITON_INTERPRET=1 before triton is imported)",
                allow_module_level=True)

triton = pytest.importorskip("triton")

import qkernels  # noqa: E402
from qkernels import reference as ref  # noqa: E402
from qkernels import triton as qtriton  # noqa: E402


from tests.conftest import GEMM_RTOL_TABLE  # noqa: E402
from tests.conftest import rel_err  # noqa: E402


# ---- packing and (de)quantization: bit-exact --------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(2,), (3, 34), (2, 3, 10)])
def test_pack_unpack_bit_exact(signed, shape):
    lo, hi, dt = (-8, 8, torch.int8) if signed else (0, 16, torch.uint8)
    q = torch.randint(lo, hi, shape, dtype=dt)
    packed = qtriton.get("pack_int4")(q)
    assert torch.equal(packed, ref.OPS["pack_int4"](q))
    assert torch.equal(qtriton.get("unpack_int4")(packed, signed), q)
    assert torch.equal(qtriton.get("unpack_int4")(packed, signed), ref.OPS["unpack_int4"](packed, signed))


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match=r"outside the int4 range \[-8, 7\]"):
        qtriton.get("pack_int4")(torch.tensor([0, 8], dtype=torch.int8))


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group,symmetric,signed,fz", [
    (4, 32, True, True, False), (4, 16, False, False, False), (8, 48, False, True, False), (4, 3, True, False, False),
    (4, 32, False, False, True), (3, 12, False, True, False),
])
def test_quantize_dequantize_bit_exact(wdtype, bits, group, symmetric, signed, fz):
    w = (torch.randn(5, 96) * 3).to(wdtype)
    w[0, :group] = 0.0  # an all-zero group: scale 1, exact round trip
    w[1, 5] = 1e-3  # tiny values next to large ones
    scale, zp = ref.OPS["choose_qparams_affine"](w, bits, group, symmetric, signed and not fz, fz)
    got_s, got_z = qtriton.get("choose_qparams_affine")(w, bits, group, symmetric, signed and not fz, fz)
    assert torch.equal(got_s, scale) and torch.equal(got_z, zp) and got_z.dtype == zp.dtype
    args = (w, scale, zp, bits, group, signed and not fz, fz)
    q = qtriton.get("quantize_affine")(*args)
    assert torch.equal(q, ref.OPS["quantize_affine"](*args))
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        got = qtriton.get("dequantize_affine")(q, scale, zp, group, fz, out_dtype)
        want = ref.OPS["dequantize_affine"](q, scale, zp, group, fz, out_dtype)
        assert got.dtype == out_dtype and torch.equal(got, want), out_dtype


def test_quantize_without_zero_point_and_ties():
    # exact .5 ties must round to even like torch.round / nearbyint
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, -7.5]])
    scale = torch.ones(1, 1)
    q = qtriton.get("quantize_affine")(w, scale, None, 4, 8, True, False)
    assert q.tolist() == [[0, 2, 2, 0, -2, -2, 3, -8]]
    assert torch.equal(q, ref.OPS["quantize_affine"](w, scale, None, 4, 8, True, False))


def test_quantize_rejects_nan():
    w = torch.randn(2, 8)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        qtriton.get("quantize_affine")(w, torch.ones(2, 1), None, 4, 8, True, False)


def test_public_api_forced_triton():
    w = torch.randn(4, 64)
    q, s, z = qkernels.quantize_affine(w, 4, 32, False, signed=False, backend="triton")
    q_ref, s_ref, z_ref = qkernels.quantize_affine(w, 4, 32, False, signed=False, backend="reference")
    assert torch.equal(q, q_ref)
    d = qkernels.dequantize_affine(q, s, z, 32, backend="triton")
    assert torch.equal(d, qkernels.dequantize_affine(q, s, z, 32, backend="reference"))
    assert torch.equal(qkernels.pack_int4(q, backend="triton"), qkernels.pack_int4(q, backend="reference"))


# ---- GEMMs: documented relative error against the fp64 reference ---------------------------------------------
# fp32 x: IEEE fp32 dot, error ~ K * 2^-24; fp16 x: weights rounded to fp16 (2^-11) and output rounded to fp16.
TOL = GEMM_RTOL_TABLE["triton_int"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K,group,signed,with_zp,config", [
    (1, 40, 96, 32, True, False, None),  # K tail: 96 = 3 tiles of 32 over 2 splits (one split gets 1 tile)
    (5, 24, 64, 64, False, True, None),  # per-channel, unsigned codes with zero points
    (17, 33, 128, 32, True, True, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "SPLIT_K": 1}),  # no split-K
    (3, 16, 48, 16, False, False, {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 3}),  # empty splits
    # prefill-sized M, no split-K: the kernel stores x's dtype directly (no fp32 buffer)
    (130, 24, 64, 32, True, True, {"BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 1}),
])
def test_int4_weight_only_mm(dtype, M, N, K, group, signed, with_zp, config):
    x = torch.randn(M, K).to(dtype)
    lo, hi, qdt = (-8, 8, torch.int8) if signed else (0, 16, torch.uint8)
    packed = ref.OPS["pack_int4"](torch.randint(lo, hi, (N, K), dtype=qdt))
    scale = torch.rand(N, K // group) * 0.1 + 0.01
    zp = torch.randint(-8, 17, (N, K // group), dtype=torch.int32) if with_zp else None
    out = qtriton.get("int4_weight_only_mm")(x, packed, scale, zp, group, signed, config=config)
    want = ref.OPS["int4_weight_only_mm"](x.double(), packed, scale, zp, group, signed)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 24, 64), (18, 40, 96)])
def test_int8_weight_only_mm(dtype, M, N, K):
    x = torch.randn(M, K).to(dtype)
    q_w = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    scale = torch.rand(N) * 0.01 + 1e-3
    out = qtriton.get("int8_weight_only_mm")(x, q_w, scale)
    want = ref.OPS["int8_weight_only_mm"](x.double(), q_w, scale)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, want) < TOL[dtype]


def test_gemm_public_api_forced_triton_noncontiguous():
    x = torch.randn(3, 2, 128)[:, 1, :]  # non-contiguous rows
    w = torch.randn(20, 128)
    q, s, z = qkernels.quantize_affine(w, 4, 64, False, signed=True)
    packed = qkernels.pack_int4(q)
    out = qkernels.int4_weight_only_mm(x, packed, s, z, 64, signed=True, backend="triton")
    want = ref.OPS["int4_weight_only_mm"](x.double(), packed, s, z, 64, True)
    assert rel_err(out, want) < TOL[torch.float32]
    assert qkernels.explain("int4_weight_only_mm", "cpu", backend="triton").backend == "triton"
