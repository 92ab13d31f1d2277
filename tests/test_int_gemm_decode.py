"""The CPU int GEMM wrappers' decode-path plumbing (csrc/cpu/int_gemm.cpp): outputs written in x's dtype from a
per-thread fp32 scratch (no fp32 ``out`` + ``.to()``), int16 activations read straight from bf16/fp16 x into
per-thread scratch, and the single-thread path that skips ``at::parallel_for``. What must hold: the 16-bit output
has exactly the bits ``out_fp32.to(dtype)`` gives, the scratch never leaks into a returned tensor or between calls
of different sizes, the thread count does not change a bit, and SmolLM2's decode shapes match the fp64 reference."""

from __future__ import annotations

import pytest
import torch

from qkernels.reference import int_gemm as ref

from .conftest import GEMM_RTOL, needs_extension, rel_err

pytestmark = needs_extension


def i4(*args):
    return torch.ops.qkernels.int4_weight_only_mm.default(*args)


def i8(*args):
    return torch.ops.qkernels.int8_weight_only_mm.default(*args)


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _int4(N, K, g, gen):
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    s = torch.rand(N, K // g, generator=gen) + 0.01
    z = torch.randint(-8, 17, (N, K // g), dtype=torch.int32, generator=gen)
    return q, s, z


def _int8(N, K, gen):
    return torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen), torch.rand(N, generator=gen) + 0.01


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


# M = 30 (> the register kernels' M <= 24) runs the dequantize + sgemm path, which computes the same fp32 product for
# a 16-bit x as for x.float(), in one thread deterministically; the 16-bit call then converts its fp32 scratch in
# C++ (AVX2: f32_to_half_avx2), the fp32 call returns fp32 that ATen's .to() converts: the bits must agree, NaN rows
# (the row guard's NaN), inf rows, huge rows (guard-rescaled) and an N * M that is not a multiple of 8 included.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("isa", ["auto", "scalar"])
@pytest.mark.parametrize("N", [37, 64])
def test_16bit_output_has_the_bits_of_to(dtype, isa, N, monkeypatch, one_thread):
    monkeypatch.setenv("QKERNELS_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(N)
    M, K, g = 30, 256, 64
    x = (torch.randn(M, K, generator=gen) * 40).to(dtype)
    x[3, 5] = float("nan")
    x[7, 9] = float("inf")
    x[11] *= 2 ** 20 if dtype == torch.bfloat16 else 1
    q, s, z = _int4(N, K, g, gen)
    got = i4(x, q, s, z, g, True)
    want = i4(x.float(), q, s, z, g, True).to(dtype)
    assert got.dtype == dtype and got.is_contiguous() and got.shape == (M, N)
    assert torch.equal(_bits(got), _bits(want))
    assert got[3].isnan().all()
    q8, s8 = _int8(N, K, gen)
    got8, want8 = i8(x, q8, s8), i8(x.float(), q8, s8).to(dtype)
    assert torch.equal(_bits(got8), _bits(want8))


def test_scratch_is_not_shared_with_outputs():
    """Calls of growing and shrinking sizes through the same thread's scratch: every result equals its own fresh
    computation afterwards (an output aliasing the scratch would be overwritten by the next call)."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for M, N, K in [(1, 192, 640), (3, 49, 1536), (1, 8, 128), (24, 300, 256), (1, 192, 640), (2, 5, 64)]:
        x = torch.randn(M, K, generator=gen).bfloat16()
        q, s, z = _int4(N, K, 64, gen)
        q8, s8 = _int8(N, K, gen)
        cases.append((x, q, s, z, q8, s8, i4(x, q, s, z, 64, True), i8(x, q8, s8)))
    for x, q, s, z, q8, s8, o4, o8 in cases:
        assert torch.equal(o4, i4(x, q, s, z, 64, True))
        assert torch.equal(o8, i8(x, q8, s8))
        want = ref.int4_weight_only_mm(x.double(), q, s, z, 64, True)
        assert rel_err(o4, want) < GEMM_RTOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_thread_count_does_not_change_bits(dtype):
    gen = torch.Generator().manual_seed(1)
    before = torch.get_num_threads()
    try:
        for M, N, K in [(1, 1536, 640), (4, 576, 1536), (1, 3072, 640)]:
            x = torch.randn(M, K, generator=gen).to(dtype)
            q, s, z = _int4(N, K, 128, gen)
            q8, s8 = _int8(N, K, gen)
            outs = []
            for t in (1, 2):
                torch.set_num_threads(t)
                outs.append((i4(x, q, s, z, 128, True), i8(x, q8, s8)))
            assert torch.equal(_bits(outs[0][0]), _bits(outs[1][0]))
            assert torch.equal(_bits(outs[0][1]), _bits(outs[1][1]))
    finally:
        torch.set_num_threads(before)


# SmolLM2-135M's decode GEMMs as the compiled model calls them (K = 576 stored padded to 640 for g128), M = 1 and
# 2, bf16 / fp16 x, asymmetric (zero points) and symmetric signed codes; the int8 head shape, shortened in N.
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("N,K", [(576, 640), (192, 640), (1536, 640), (576, 1536), (960, 640), (3072, 640)])
@pytest.mark.parametrize("zp", [True, False])
def test_smollm2_decode_shapes(dtype, M, N, K, zp):
    gen = torch.Generator().manual_seed(N + K + M)
    x = torch.randn(M, K, generator=gen).to(dtype)
    x[:, 576:] = 0 if K == 640 else x[:, 576:]  # QuantLinear's zero padding of x
    q, s, z = _int4(N, K, 128, gen)
    z = z if zp else None
    out = i4(x, q, s, z, 128, True)
    assert rel_err(out, ref.int4_weight_only_mm(x.double(), q, s, z, 128, True)) < GEMM_RTOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_head_shape_int8(dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(1, 576, generator=gen).to(dtype)
    q8, s8 = _int8(4099, 576, gen)
    out = i8(x, q8, s8)
    assert rel_err(out, ref.int8_weight_only_mm(x.double(), q8, s8)) < GEMM_RTOL[dtype]
