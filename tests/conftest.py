"""Shared test helpers: dtypes, GEMM tolerances, relative error, GPU skips by capability.

``requires_sm(major, minor)`` skips a test unless an NVIDIA GPU of at least that compute capability is present;
GPU tests also carry ``@pytest.mark.gpu`` so ``pytest -m gpu`` (scripts/gpu_check.sh) selects them.
"""

from __future__ import annotations

import pytest
import torch

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Relative error ||out - ref|| / ||ref|| allowed for CPU GEMMs against the fp64 reference, per activation dtype. The
# kernels accumulate in fp32; the bound is dominated by rounding the output (and x for bf16/fp16 inputs, which the
# reference sees exactly since it takes the same low-precision x).
GEMM_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


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
