"""CPU-side checks for the GPU kernels: the per-element decode they share with the CPU build (qkernels/int_gemm.h,
int_quant.h), the build-arch report and the dispatch rules that pick them. Runs everywhere (no GPU needed)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkernels
from qkernels import dispatch
from qkernels import reference as ref

needs_ext = pytest.mark.skipif(not qkernels.HAS_EXTENSION, reason="qkernels._C not built")


def _w4(N, K, group, signed, with_zp, gen):
    lo, hi, dt = (-8, 8, torch.int8) if signed else (0, 16, torch.uint8)
    q = torch.randint(lo, hi, (N, K), dtype=dt, generator=gen)
    scale = torch.rand(N, K // group, generator=gen) * 0.5 + 1e-3
    zp = torch.randint(-8, 17, (N, K // group), dtype=torch.int32, generator=gen) if with_zp else None
    return q, ref.OPS["pack_int4"](q), scale, zp


@needs_ext
@settings(max_examples=25, deadline=None)
@given(signed=st.booleans(), with_zp=st.booleans(), groups=st.integers(1, 4), group=st.sampled_from([2, 6, 32, 48]),
       n=st.integers(1, 9), seed=st.integers(0, 2**31 - 1))
def test_int4_decode_bit_exact(signed, with_zp, groups, group, n, seed):
    """x = identity makes the GEMM return the decoded weight itself (products with 1 and sums with 0 are exact), so
    the CPU fallback - which decodes with the GPU kernels' int4_word_to_fields / dequant_int4_field - must equal
    the reference dequantization bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    K = groups * group
    q, packed, scale, zp = _w4(n, K, group, signed, with_zp, gen)
    eye = torch.eye(K)
    out = torch.ops.qkernels.int4_weight_only_mm(eye, packed, scale, zp, group, signed)
    want = ref.OPS["dequantize_affine"](q, scale, zp, group, False, torch.float32)
    assert torch.equal(out, want.t())


@needs_ext
def test_int8_decode_bit_exact():
    gen = torch.Generator().manual_seed(0)
    K = 40  # > 8 rows of x and K % 32 != 0: the dequantize-tile path
    q_w = torch.randint(-128, 128, (24, K), dtype=torch.int8, generator=gen)
    q_w[0, :4] = torch.tensor([-128, 127, 0, -1], dtype=torch.int8)
    scale = torch.rand(24, generator=gen)
    out = torch.ops.qkernels.int8_weight_only_mm(torch.eye(K), q_w, scale)
    want = (q_w.float() * scale[:, None]).t()
    assert torch.equal(out, want)


@needs_ext
def test_float_zero_point_dequant_rounds_twice():
    """scale * q + min is rounded after the product and after the add (no FMA), like the reference."""
    q = torch.tensor([[3, 15, 7, 1]], dtype=torch.uint8)
    scale = torch.tensor([[0.1]])
    mn = torch.tensor([[-0.7]])
    out = torch.ops.qkernels.dequantize_affine(q, scale, mn, 4, True, torch.float32)
    assert torch.equal(out, ref.OPS["dequantize_affine"](q, scale, mn, 4, True, torch.float32))


@needs_ext
def test_cuda_build_archs_reports_the_build():
    archs = torch.ops.qkernels.cuda_build_archs()
    assert isinstance(archs, str)
    has_cuda_kernels = qkernels._ext.has_kernel("int4_weight_only_mm", "CUDA")
    assert bool(archs) == has_cuda_kernels, (archs, has_cuda_kernels)
    for a in qkernels._ext.compiled_cuda_archs():
        assert a[0].isdigit() and "." in a, a


@pytest.mark.parametrize("cap,built,runs", [
    ((8, 0), ["8.0", "9.0a", "10.0a"], True),
    ((8, 9), ["8.0"], True),  # sm80 SASS runs on sm86/sm89
    ((9, 0), ["8.0"], False),  # not across majors
    ((9, 0), ["9.0a"], True),
    ((10, 3), ["10.0a"], False),  # arch-specific code runs on exactly its own capability
    ((12, 0), ["8.0", "9.0a", "10.0a"], False),
    ((12, 0), ["8.0+PTX"], True),  # PTX JIT-compiles forward
    ((7, 5), ["8.0+PTX"], False),
])
def test_arch_runs(cap, built, runs):
    assert dispatch.arch_runs(cap, built) is runs


_ARCH_PROBE = r"""
#include <cstdio>
#include "arch_list.h"
int main() {
  char archs[256];
  int major, minor;
  while (std::scanf("%255s %d %d", archs, &major, &minor) == 3)
    std::printf("%d\n", qkernels::cuda::arch_list_runs(archs, major, minor) ? 1 : 0);
}
"""


def test_cuda_capability_switch_matches_arch_runs(tmp_path):
    """The CUDA entry points' capability switch (csrc/cuda/arch_list.h, fed setup.py's comma-separated
    QK_CUDA_ARCHS) against dispatch.arch_runs on every capability from 7.0 to 12.1 and several arch lists, so a
    direct torch.ops call on a GPU without code in the build raises 'not implemented for capability X.Y' exactly
    where the dispatch table would not pick the CUDA kernel."""
    import pathlib
    import shutil
    import subprocess

    cxx = shutil.which("c++") or shutil.which("g++")  # building qkernels needs one anyway
    assert cxx is not None, "no C++ compiler (c++ or g++) on PATH"
    src = tmp_path / "probe.cpp"
    src.write_text(_ARCH_PROBE)
    inc = pathlib.Path(__file__).resolve().parents[1] / "csrc" / "cuda"
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{inc}", str(src), "-o", str(tmp_path / "probe")], check=True)
    lists = [["8.0", "9.0a", "10.0a"], ["8.0"], ["9.0a"], ["10.0a"], ["8.0+PTX"], ["8.6", "12.0"],
             ["9.0a", "10.0a+PTX"], ["10.0f"], ["7.5", "8.9"], ["12.1a"]]
    caps = [(ma, mi) for ma in (7, 8, 9, 10, 11, 12) for mi in (0, 1, 3, 5, 6, 9)]
    cases = [(built, cap) for built in lists for cap in caps]
    stdin = "".join(f"{','.join(b)} {c[0]} {c[1]}\n" for b, c in cases)
    out = subprocess.run([str(tmp_path / "probe")], input=stdin, capture_output=True, text=True, check=True).stdout
    got = [line == "1" for line in out.split()]
    want = [dispatch.arch_runs(cap, built) for built, cap in cases]
    assert len(got) == len(cases)
    bad = [(b, c, g) for (b, c), g, w in zip(cases, got, want) if g != w]
    assert not bad, bad[:10]


def test_dispatch_prefers_cuda_then_triton():
    for op in ("int4_weight_only_mm", "int8_weight_only_mm", "quantize_affine", "pack_int4"):
        with dispatch.mock_device("sm90"):
            assert dispatch.choose(op, assume_compiled=True).backend == "cuda"
    with dispatch.mock_device("sm75"):  # no mma.sync: the tensor-core GEMMs are refused
        d = dispatch.choose("int4_weight_only_mm", assume_compiled=True)
        assert d.backend != "cuda" and any("sm80" in why for _, why in d.rejected)
