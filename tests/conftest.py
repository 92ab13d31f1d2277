"""Shared test fixtures: backends x dtypes x shapes, device capability skips, relative error."""

from __future__ import annotations

import pytest
import torch

import qkernels

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Relative error ||out - ref|| / ||ref|| allowed for GEMMs against the fp64 reference, per activation dtype. The
# kernels accumulate in fp32; the bound is dominated by rounding the output (and x for bf16/fp16 inputs, which the
# reference sees exactly since it takes the same low-precision x).
GEMM_RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 1e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    return (out - ref).norm().item() / (denom if denom > 0 else 1.0)


def cuda_capability() -> tuple[int, int] | None:
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return None
    return torch.cuda.get_device_capability()


def requires_sm(major: int, minor: int = 0):
    """Skip unless an NVIDIA GPU of at least this compute capability is present (skips by capability, not name)."""
    cap = cuda_capability()
    return pytest.mark.skipif(cap is None or cap < (major, minor),
                              reason=f"needs an NVIDIA GPU with sm{major}{minor}+ (have {cap})")




@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
