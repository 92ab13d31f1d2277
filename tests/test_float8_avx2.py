"""The AVX2 fp8 kernels (csrc/cpu/float_avx2.cpp) against the portable loops they replace (QKERNELS_CPU_ISA=scalar):
casts bit for bit over every code / every 16-bit input pattern and random fp32 bit patterns, the fused small-M
fp8_mm against the emulation and the fp64 reference (the isa_pair fixture of conftest.py runs both sides)."""

import numpy as np
import pytest
import torch

import qkernels
from qkernels import reference as ref

from .test_float8 import FP8, GEMM_RTOL, random_bits_f32


def _isa():
    return torch.ops.qkernels.cpu_isa()


def _bits(t):
    return t.view({4: torch.int32, 2: torch.int16, 1: torch.uint8}[t.element_size()])


def test_cpu_isa_env(monkeypatch):
    monkeypatch.setenv("QKERNELS_CPU_ISA", "scalar")
    assert _isa() == "scalar"
    monkeypatch.setenv("QKERNELS_CPU_ISA", "avx512")
    with pytest.raises(RuntimeError, match="QKERNELS_CPU_ISA must be 'auto' or 'scalar'"):
        _isa()


# scales: ordinary, a power of two, one whose product with 2^(15 - bias) leaves fp32's normal range (table path),
# subnormal, zero, huge (products overflow), inf and NaN
SCALES = [0.37, 2.0, 3e-39, 1e-41, 0.0, 3e37, float("inf"), float("nan")]


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_every_code_bit_exact(isa_pair, dtype, out_dtype):
    # every code, in a row whose length is no multiple of 16 (the tail path), once per scale
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    q = torch.cat([codes, codes[:37]]).repeat(len(SCALES), 1)
    scale = torch.tensor(SCALES, dtype=torch.float32).reshape(-1, 1)
    fast, slow = isa_pair(lambda: qkernels.dequantize_fp8(q.view(dtype), scale, out_dtype, "row"))
    assert torch.equal(_bits(fast), _bits(slow))


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("saturate", [True, False])
def test_quantize_every_16bit_input_bit_exact(isa_pair, dtype, in_dtype, saturate):
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(in_dtype).reshape(256, 256)
    for s in (1.0, 0.75, 2.0**-20):
        scale = torch.tensor([[s]])
        fast, slow = isa_pair(lambda: qkernels.quantize_fp8(x, dtype, "tensor", scale=scale, saturate=saturate)[0])
        assert torch.equal(_bits(fast), _bits(slow)), s


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("saturate", [True, False])
def test_quantize_random_fp32_bits_bit_exact(isa_pair, dtype, saturate):
    x = torch.from_numpy(random_bits_f32(13 * 4000, seed=5).copy()).reshape(13, 4000)
    scale = torch.tensor([[0.5 ** 7]])
    fast, slow = isa_pair(lambda: qkernels.quantize_fp8(x, dtype, "tensor", scale=scale, saturate=saturate)[0])
    assert torch.equal(_bits(fast), _bits(slow))
    # dynamic scales too (amax per row / per 1x128 block), values in a normal range
    y = torch.randn(16, 384) * torch.logspace(-3, 3, 16).reshape(-1, 1)
    for gran in ("tensor", "row", "block"):
        fast, slow = isa_pair(lambda: qkernels.quantize_fp8(y, dtype, gran, 128)[0])
        assert torch.equal(_bits(fast), _bits(slow)), gran


def _grid(s):
    """A scale as the ops' scale grid [G0, G1] (what the reference op takes)."""
    return s.reshape(1, 1) if s.dim() == 0 else s


def _fp8_operands(M, N, K, dtype, gran, gen):
    a = torch.randn(M, K, generator=gen)
    b = torch.randn(N, K, generator=gen) * 0.05
    aq, as_ = qkernels.quantize_fp8(a, dtype, gran, 128)
    bq, bs_ = qkernels.quantize_fp8(b, dtype, gran, (128, 128) if gran == "block" else 128)
    return aq, as_, bq, bs_


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("gran", ["tensor", "row", "block"])
@pytest.mark.parametrize("M", [1, 3, 4, 16, 17])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_mm_fused_matches_reference(isa_pair, dtype, gran, M, out_dtype):
    """M <= 16 runs the fused kernel (every tile shape: 4x1, 2x2, 2x4 and 1-row tails, N % 4 != 0), M = 17 the
    emulation; both against the fp64 reference, with the bias."""
    gen = torch.Generator().manual_seed(M)
    N, K = 258 if gran != "block" else 256, 384
    aq, as_, bq, bs_ = _fp8_operands(M, N, K, dtype, gran, gen)
    bias = torch.randn(N, generator=gen)
    want = ref.OPS["fp8_mm"](aq.view(torch.uint8), _grid(as_), dtype, bq.view(torch.uint8), _grid(bs_), dtype, bias,
                             torch.float64)
    fast, slow = isa_pair(lambda: qkernels.fp8_mm(aq, as_, bq, bs_, out_dtype, bias))
    for out in (fast, slow):
        assert out.dtype == out_dtype
        err = ((out.double() - want).norm() / want.norm()).item()
        assert err < GEMM_RTOL[out_dtype], err


def test_fp8_mm_fused_odd_block_grid(isa_pair):
    """Weight blocks 2 x 32 (block_rows not a multiple of the 4-row tile; 32-k scale blocks): every row picks its own
    scale row."""
    gen = torch.Generator().manual_seed(3)
    aq, as_ = qkernels.quantize_fp8(torch.randn(2, 96, generator=gen), torch.float8_e4m3fn, "row")
    b = torch.randn(10, 96, generator=gen)
    bq, bs_ = qkernels.quantize_fp8(b, torch.float8_e4m3fn, "block", (2, 32))
    want = ref.OPS["fp8_mm"](aq.view(torch.uint8), as_, torch.float8_e4m3fn, bq.view(torch.uint8), bs_,
                             torch.float8_e4m3fn, None, torch.float64)
    fast, slow = isa_pair(lambda: qkernels.fp8_mm(aq, as_, bq, bs_, torch.float32, b_block_size=(2, 32)))
    for out in (fast, slow):
        assert ((out.double() - want).norm() / want.norm()).item() < GEMM_RTOL[torch.float32]


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_mm_fused_special_codes(isa_pair, dtype):
    """NaN codes in the weight (and e5m2's infs) reach exactly the outputs the reference gives them; the rest stays
    finite and close."""
    gen = torch.Generator().manual_seed(1)
    aq, as_, bq, bs_ = _fp8_operands(2, 12, 64, dtype, "row", gen)
    raw = bq.view(torch.uint8).clone()
    nan_code = 0x80 if dtype in (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz) else 0x7F
    raw[3, 17] = nan_code
    if dtype == torch.float8_e5m2:
        raw[7, 40] = 0x7C  # +inf
    want = ref.OPS["fp8_mm"](aq.view(torch.uint8), _grid(as_), dtype, raw, _grid(bs_), dtype, None, torch.float64)
    fast, slow = isa_pair(lambda: qkernels.fp8_mm(aq, as_, raw.view(dtype), bs_, torch.float32))
    for out in (fast, slow):
        assert torch.equal(out.isnan(), want.isnan())
        assert torch.equal(out.isinf(), want.isinf())
        ok = want.isfinite()
        assert torch.allclose(out[ok].double(), want[ok], rtol=1e-5, atol=1e-5)
        assert out[:, 3].isnan().all()
