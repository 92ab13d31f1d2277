"""The int4 register kernels' zero-point correction over the last G % 8 groups: one masked vector step (default) or
the scalar loop (QKERNELS_CPU_ZP_TAIL=scalar, the kernel before 2026-12-04). Both must match the fp64 reference
within the GEMM tolerance and each other to fp32 rounding, for every G % 8, and a zero point out of range in a
masked (tail) group must still be refused."""

from __future__ import annotations

import pytest
import torch

from qkernels.reference import int_gemm as ref

from .conftest import GEMM_RTOL, needs_extension, rel_err

pytestmark = needs_extension


@pytest.mark.parametrize("G", [1, 3, 5, 8, 12, 15])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3])
@pytest.mark.parametrize("i16", ["1", "0"])
def test_vector_and_scalar_tail_agree(G, dtype, M, i16, monkeypatch):
    monkeypatch.setenv("QKERNELS_CPU_I16", i16)
    gen = torch.Generator().manual_seed(G * 10 + M)
    N, g = 23, 64
    K = G * g
    q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    s = torch.rand(N, G, generator=gen) + 0.01
    z = torch.randint(-8, 17, (N, G), dtype=torch.int32, generator=gen)
    x = torch.randn(M, K, generator=gen).to(dtype)
    want = ref.int4_weight_only_mm(x, q, s, z, g, False)
    outs = {}
    for tail in ("scalar", "vector"):
        monkeypatch.setenv("QKERNELS_CPU_ZP_TAIL", tail)
        outs[tail] = torch.ops.qkernels.int4_weight_only_mm(x, q, s, z, g, False)
        assert rel_err(outs[tail], want) < GEMM_RTOL[dtype], tail
    if dtype == torch.float32:
        assert rel_err(outs["vector"], outs["scalar"]) < 1e-6


@pytest.mark.parametrize("tail", ["scalar", "vector"])
def test_out_of_range_zero_point_in_the_tail_is_refused(tail, monkeypatch):
    monkeypatch.setenv("QKERNELS_CPU_ZP_TAIL", tail)
    q = torch.randint(0, 256, (8, 5 * 64), dtype=torch.uint8)
    s = torch.rand(8, 5)
    z = torch.zeros(8, 5, dtype=torch.int32)
    z[3, 4] = 17  # group 4 of 5: inside the masked step
    for dtype in (torch.bfloat16, torch.float32):
        with pytest.raises(RuntimeError, match=r"zero_point values must be in \[-8, 16\]"):
            torch.ops.qkernels.int4_weight_only_mm(torch.randn(1, 640).to(dtype), q, s, z, 128, True)
