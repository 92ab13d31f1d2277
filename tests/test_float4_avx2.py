"""The AVX2 fp4 kernels (csrc/cpu/float_avx2.cpp) against the portable loops (QKERNELS_CPU_ISA=scalar, via the
isa_pair fixture): dequantize_fp4 bit for bit over every byte and every block-scale code, the fused small-M fp4_mm
against the emulation and the fp64 reference."""

import pytest
import torch

import qkernels

from .conftest import FLOAT_GEMM_RTOL as GEMM_RTOL


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("element", ["e2m1", "e1m2"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_every_byte_and_scale_bit_exact(isa_pair, fmt, element, out_dtype):
    # every byte (both nibbles: the -0 code included) under every block-scale code: MX e8m0 2^-127 (an fp32
    # subnormal) .. 2^127 and NaN; NV e4m3 codes times global scales that push block scales subnormal / to inf
    B = 32 if fmt == "mxfp4" else 16
    K = 512  # 256 bytes per row: every byte once
    packed = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(256, 1)
    scale = (torch.arange(256, dtype=torch.int32).reshape(-1, 1) + torch.arange(K // B).reshape(1, -1)) % 256
    scale = scale.to(torch.uint8)
    for g in ([None] if fmt == "mxfp4" else [1.0, 0.37, 1e-38, 3e36]):
        gs = None if g is None else torch.tensor(g)
        fast, slow = isa_pair(lambda: qkernels.dequantize_fp4(packed, scale, gs, fmt, element=element,
                                                               out_dtype=out_dtype))
        assert torch.equal(_bits(fast), _bits(slow)), g


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("element", ["e2m1", "e1m2"])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 7, 8, 16, 17])
def test_fp4_mm_fused_matches_reference(isa_pair, fmt, element, M):
    """M <= 16: the fused kernel (4x1, 2x2, 2x4 tiles and row tails: N = 50); M = 17: the emulation."""
    gen = torch.Generator().manual_seed(M)
    N, K = 50, 192
    a = torch.randn(M, K, generator=gen)
    w = torch.randn(N, K, generator=gen) * 0.1
    ap, as_, ag = qkernels.quantize_fp4(a, fmt, element=element)
    wp, ws, wg = qkernels.quantize_fp4(w, fmt, element=element)
    bias = torch.randn(N, generator=gen)
    kw = dict(format=fmt, element=element, a_global_scale=ag, b_global_scale=wg)
    ad = qkernels.dequantize_fp4(ap, as_, ag, fmt, element=element, out_dtype=torch.float64)
    wd = qkernels.dequantize_fp4(wp, ws, wg, fmt, element=element, out_dtype=torch.float64)
    want = ad @ wd.t() + bias.double()
    for out_dtype in (torch.float32, torch.bfloat16):
        fast, slow = isa_pair(lambda: qkernels.fp4_mm(ap, as_, wp, ws, out_dtype, bias, **kw))
        for out in (fast, slow):
            assert out.dtype == out_dtype and out.shape == (M, N)
            err = ((out.double() - want).norm() / want.norm()).item()
            assert err < GEMM_RTOL[out_dtype], err


def test_fp4_mm_fused_nan_block_scale(isa_pair):
    """A weight block with a NaN scale (what quantize_fp4 gives a block holding NaN / inf) makes exactly its row's
    outputs NaN, as in the emulation."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, 128, generator=gen)
    w = torch.randn(12, 128, generator=gen)
    w[5, 70] = float("inf")
    ap, as_, _ = qkernels.quantize_fp4(a, "mxfp4")
    wp, ws, _ = qkernels.quantize_fp4(w, "mxfp4")
    fast, slow = isa_pair(lambda: qkernels.fp4_mm(ap, as_, wp, ws, torch.float32))
    for out in (fast, slow):
        assert out[:, 5].isnan().all()
        assert out[:, [i for i in range(12) if i != 5]].isfinite().all()
    assert torch.allclose(fast[:, :5], slow[:, :5], rtol=1e-5, atol=1e-5)
