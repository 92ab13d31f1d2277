"""Dispatch decisions for the fp8 / fp4 casts and GEMMs and the W8A8 GEMM on mocked devices, and the wiring of the
native block-wise fp8 path (torch.nn.functional.scaled_mm) checked against a stand-in that enforces torch's
documented scale layouts."""

from __future__ import annotations

import pytest
import torch

import qkernels
from qkernels import dispatch
from qkernels import reference as ref

from .conftest import rel_err

CASTS = ["quantize_fp8", "dequantize_fp8", "fp4_encode", "fp4_decode", "quantize_fp4", "dequantize_fp4"]


@pytest.mark.parametrize("device", ["sm80", "sm89", "sm90", "sm100"])
@pytest.mark.parametrize("op", CASTS + ["quantize_per_token_int8", "int8_dynamic_mm"])
def test_casts_and_w8a8_use_cuda_kernels_when_compiled(device, op):
    with dispatch.mock_device(device):
        d = qkernels.explain(op, assume_compiled=True)
    assert d.backend == "cuda", str(d)


@pytest.mark.parametrize("op", CASTS + ["quantize_per_token_int8", "int8_dynamic_mm"])
def test_casts_and_w8a8_on_rocm_use_triton(op):
    pytest.importorskip("triton")
    with dispatch.mock_device("gfx942"):
        d = qkernels.explain(op, assume_compiled=True)
    assert d.backend == "triton" and any(b == "cuda" for b, _ in d.rejected), str(d)


@pytest.mark.skipif(not qkernels._ext.compiled_cuda_archs(), reason="extension built without CUDA")
@pytest.mark.parametrize("op", CASTS + ["fp8_mm", "fp4_mm", "quantize_per_token_int8", "int8_dynamic_mm"])
def test_cuda_build_registers_kernels(op):
    # a CUDA build (compiled, even on a machine without a GPU) registers every kernel under the CUDA key
    assert qkernels._ext.has_kernel(op, "CUDA")


def _fp8_ctx(**kw):
    ctx = dict(a_dtype=torch.float8_e4m3fn, b_dtype=torch.float8_e4m3fn, granularity="tensor",
               out_dtype=torch.bfloat16, M=64, K=1024, N=256, assume_compiled=True)
    ctx.update(kw)
    return ctx


def test_fp8_mm_emulated_cuda_only_where_no_hardware_path():
    with dispatch.mock_device("sm80"):
        d = qkernels.explain("fp8_mm", **_fp8_ctx())
    assert d.backend == "cuda" and "emulated CUDA kernel" in d.reason and "sm89+" in d.reason
    with dispatch.mock_device("sm90"):
        d = qkernels.explain("fp8_mm", **_fp8_ctx())
        assert d.backend == "native"
        assert any(b == "cuda" and "only the emulation" in why for b, why in d.rejected)
        # e5m2 x e5m2 has no torch._scaled_mm: the CUDA emulation takes it
        assert qkernels.explain("fp8_mm", **_fp8_ctx(a_dtype=torch.float8_e5m2,
                                                     b_dtype=torch.float8_e5m2)).backend == "cuda"
        # forcing the emulation (GPU tests compare it with the reference on any card)
        assert qkernels.explain("fp8_mm", backend="cuda", **_fp8_ctx()).backend == "cuda"


@pytest.mark.parametrize("b_blocks,K,out_dtype,device,expected", [
    ((128, 128), 1024, torch.bfloat16, "sm90", "native"),
    ((1, 128), 384, torch.bfloat16, "sm90", "native"),
    ((128, 128), 640, torch.bfloat16, "sm90", "cuda"),  # K/128 = 5 would need padded weight scales
    ((128, 128), 1024, torch.float32, "sm90", "cuda"),  # block-wise scaled_mm writes bf16 only
    ((64, 64), 1024, torch.bfloat16, "sm90", "cuda"),  # not a cuBLAS recipe
    ((128, 128), 1024, torch.bfloat16, "sm89", "cuda"),
    ((128, 128), 1024, torch.bfloat16, "sm100", "cuda"),
])
def test_fp8_mm_blockwise_rule(b_blocks, K, out_dtype, device, expected):
    ctx = _fp8_ctx(granularity="block", a_blocks=(1, 128), b_blocks=b_blocks, K=K, out_dtype=out_dtype)
    with dispatch.mock_device(device):
        d = qkernels.explain("fp8_mm", **ctx)
    assert d.backend == expected, str(d)
    if expected == "native":
        assert "block-wise" in d.reason


def test_fp8_mm_blockwise_needs_e4m3():
    ctx = _fp8_ctx(granularity="block", a_blocks=(1, 128), b_blocks=(128, 128), b_dtype=torch.float8_e5m2)
    with dispatch.mock_device("sm90"):
        d = qkernels.explain("fp8_mm", **ctx)
    assert d.backend == "cuda" and "e4m3fn" in d.reason


def test_fp4_mm_rules():
    ctx = dict(format="nvfp4", element="e2m1", K=256, N=64, assume_compiled=True)
    with dispatch.mock_device("sm100"):
        assert qkernels.explain("fp4_mm", **ctx).backend == "native"
        assert qkernels.explain("fp4_mm", **dict(ctx, element="e1m2")).backend == "cuda"
    with dispatch.mock_device("sm90"):
        d = qkernels.explain("fp4_mm", **ctx)
    assert d.backend == "cuda" and "sm100" in d.reason
    with dispatch.mock_device("gfx942"):
        assert qkernels.explain("fp4_mm", **ctx).backend == "reference"


def _fake_blockwise_scaled_mm(calls):
    """Stand-in for torch.nn.functional.scaled_mm that enforces the block-wise layouts of torch's own samples
    (1x128 scales [rows, K/128] with stride (1, rows); 128x128 scales [K/128, N/128] with stride (1, K/128)) and
    computes the product those scales mean."""
    from torch.nn.functional import ScalingType

    def fake(mat_a, mat_b, scale_a, recipe_a, scale_b, recipe_b, swizzle_a=None, swizzle_b=None, bias=None,
             output_dtype=torch.bfloat16):
        M, K = mat_a.shape
        N = mat_b.shape[1]
        kb = K // 128
        assert mat_b.stride() == (1, K), "b must be column-major"
        assert recipe_a == ScalingType.BlockWise1x128
        assert scale_a.shape == (M, kb) and scale_a.stride() == (1, M)
        a = mat_a.float() * scale_a.repeat_interleave(128, dim=1)
        if recipe_b == ScalingType.BlockWise1x128:
            assert scale_b.shape == (N, kb) and scale_b.stride() == (1, N)
            b = mat_b.t().float() * scale_b.repeat_interleave(128, dim=1)
        else:
            assert recipe_b == ScalingType.BlockWise128x128
            assert scale_b.shape == (kb, N // 128) and scale_b.stride() == (1, kb)
            b = mat_b.t().float() * scale_b.t().repeat_interleave(128, 0).repeat_interleave(128, 1)
        calls.append(recipe_b)
        return (a.double() @ b.double().t()).to(output_dtype)

    return fake


@pytest.mark.parametrize("weight_block", [(128, 128), 128])
def test_fp8_mm_blockwise_native_wiring(monkeypatch, weight_block):
    calls = []
    monkeypatch.setattr(torch.nn.functional, "scaled_mm", _fake_blockwise_scaled_mm(calls))
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    x, w, bias = torch.randn(5, 512), torch.randn(256, 512), torch.randn(256)
    a_q, a_s = qkernels.quantize_fp8(x, granularity="block", block_size=128)
    b_q, b_s = qkernels.quantize_fp8(w, granularity="block", block_size=weight_block)
    with dispatch.mock_device("sm90"):
        assert qkernels.explain("fp8_mm", **_fp8_ctx(granularity="block", a_blocks=(1, 128), K=512,
                                                     b_blocks=(1, 128) if weight_block == 128 else weight_block)
                                ).backend == "native"
        out = qkernels.fp8_mm(a_q, a_s, b_q, b_s, out_dtype=torch.bfloat16, bias=bias)
    assert len(calls) == 1 and out.dtype == torch.bfloat16
    want = ref.OPS["fp8_mm"](a_q.view(torch.uint8), a_s, a_q.dtype, b_q.view(torch.uint8),
                             b_s.reshape(b_s.shape[0], -1) if weight_block == 128 else b_s, b_q.dtype, bias,
                             torch.float64)
    assert rel_err(out, want) < 8e-3
