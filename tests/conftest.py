"""Shared test helpers: dtypes, GEMM tolerances, relative error, GPU skips by capability.

``requires_sm(major, minor)`` skips a test unless an NVIDIA GPU of at least that compute capability is present;
GPU tests also carry ``@pytest.mark.gpu`` so ``pytest -m gpu`` (scripts/gpu_check.sh) selects them.
"""

from __future__ import annotations

import pytest
import torch

from qkernels._ext import HAS_C

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# The one tolerance table: relative error ||out - ref|| / ||ref|| allowed for GEMMs against the fp64 reference, per
# GEMM family and activation/output dtype. The kernels accumulate in fp32; the bound is dominated by rounding the
# output (and x for bf16/fp16 inputs, which the reference sees exactly since it takes the same low-precision x).
# "int": integer-weight GEMMs (W4A16 / W8A16 / W8A8, GGUF), whose fp32 rows also carry the x * scale rounding.
# "float": fp8 / fp4 GEMMs, whose decoded operands are exact in fp32 (K <= 512 in the tests: bound ~ K * 2^-24).
GEMM_RTOL_TABLE = {
    "int": {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3},
    "float": {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3},
    # a whole QuantLinear against fp64 F.linear on its dequantized weight (bias add and x gather/padding included)
    "layer": {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3},
    # Triton integer GEMMs under the interpreter (tl.dot in fp16 rounds the products of fp16 inputs once more)
    "triton_int": {torch.float32: 1e-5, torch.float16: 3e-3},
    # the CUDA decode kernels on a GPU (tensor-core products of bf16/fp16 operands, split-K partial sums)
    "cuda_int": {torch.float32: 1e-5, torch.bfloat16: 1.5e-2, torch.float16: 3e-3},
}
GEMM_RTOL = GEMM_RTOL_TABLE["int"]
FLOAT_GEMM_RTOL = GEMM_RTOL_TABLE["float"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp64; a zero reference makes any nonzero difference count as huge."""
    out, ref = out.detach().double(), ref.detach().double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# The module-wide skip for tests that run compiled kernels; reference, dispatch and pure-Python tests carry none.
needs_extension = pytest.mark.skipif(not HAS_C, reason="qkernels._C not built")


def cuda_capability() -> tuple[int, int] | None:
    """The current NVIDIA GPU's compute capability, or None without one (CPU machine, ROCm)."""
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return None
    return torch.cuda.get_device_capability()


def requires_sm(major: int, minor: int = 0):
    """Skip marker: needs an NVIDIA GPU with compute capability >= (major, minor) (by capability, not by name)."""
    cap = cuda_capability()
    if cap is None:
        return pytest.mark.skipif(True, reason=f"needs an NVIDIA GPU (sm{major}{minor}+); none present")
    return pytest.mark.skipif(tuple(cap) < (major, minor),
                              reason=f"needs sm{major}{minor}+, this GPU is sm{cap[0]}{cap[1]}")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA/AMD GPU (run by scripts/gpu_check.sh)")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def isa_pair(monkeypatch):
    """``run(fn) -> (result with the AVX2 CPU kernels, result with the portable loops)`` (QKERNELS_CPU_ISA=scalar for
    the second), asserting through ``torch.ops.qkernels.cpu_isa()`` that each side really ran its kernels. Fails on a
    CPU without AVX2/FMA/F16C rather than comparing the portable loops with themselves (CI's machines have AVX2)."""
    monkeypatch.delenv("QKERNELS_CPU_ISA", raising=False)
    assert torch.ops.qkernels.cpu_isa() == "avx2", "these tests need an x86-64 CPU with AVX2/FMA/F16C"

    def run(fn):
        fast = fn()
        monkeypatch.setenv("QKERNELS_CPU_ISA", "scalar")
        assert torch.ops.qkernels.cpu_isa() == "scalar"
        slow = fn()
        monkeypatch.delenv("QKERNELS_CPU_ISA")
        return fast, slow

    return run
