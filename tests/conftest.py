"""Shared test helpers: GPU markers by capability.

``requires_sm(major, minor)`` skips a test unless an NVIDIA GPU of at least that compute capability is present;
GPU tests also carry ``@pytest.mark.gpu`` so ``pytest -m gpu`` (scripts/gpu_check.sh) selects them.
"""

from __future__ import annotations

import pytest
import torch


def cuda_capability() -> tuple[int, int] | None:
    """The current NVIDIA GPU's compute capability, or None without one (CPU machine, ROCm)."""
    if not torch.cuda.is_available() or torch.version.hip is not None:
        return None
    return torch.cuda.get_device_capability()


def requires_sm(major: int, minor: int = 0):
    """Skip marker: needs an NVIDIA GPU with compute capability >= (major, minor)."""
    cap = cuda_capability()
    if cap is None:
        return pytest.mark.skipif(True, reason=f"needs an NVIDIA GPU (sm{major}{minor}+); none present")
    return pytest.mark.skipif(tuple(cap) < (major, minor),
                              reason=f"needs sm{major}{minor}+, this GPU is sm{cap[0]}{cap[1]}")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA/AMD GPU (run by scripts/gpu_check.sh)")
