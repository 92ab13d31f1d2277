"""QKERNELS_CPU_PF_BLOCKS (how many 4-row blocks ahead the register kernels prefetch weights) moves prefetches
only: every value must give the same bits, on the int4 (int16 and fp32) and int8 kernels, at 1 and 2 threads."""

from __future__ import annotations

import pytest
import torch

from .conftest import needs_extension

pytestmark = needs_extension


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefetch_distance_changes_no_bit(threads, dtype, monkeypatch):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(threads)
        N, K, g = 4 * 40 + 3, 512, 128  # 40 full blocks and a ragged tail: prefetches near the range ends
        q = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
        s = torch.rand(N, K // g, generator=gen) + 0.01
        z = torch.randint(-8, 17, (N, K // g), dtype=torch.int32, generator=gen)
        q8 = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=gen)
        s8 = torch.rand(N, generator=gen) + 0.01
        outs = {}
        for d in ("1", "2", "16", "0", "junk"):  # out of range / unparsable: clamped to 1..16
            monkeypatch.setenv("QKERNELS_CPU_PF_BLOCKS", d)
            for M in (1, 3):
                x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype)
                outs.setdefault(M, []).append((torch.ops.qkernels.int4_weight_only_mm(x, q, s, z, g, False),
                                               torch.ops.qkernels.int8_weight_only_mm(x, q8, s8)))
        for results in outs.values():
            for a4, a8 in results[1:]:
                assert torch.equal(a4, results[0][0]) and torch.equal(a8, results[0][1])
    finally:
        torch.set_num_threads(before)
