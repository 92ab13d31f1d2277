"""Arithmetic helpers shared by the reference modules."""

from __future__ import annotations

import torch


def true_div(a: torch.Tensor, b: float) -> torch.Tensor:
    """a / b as a true (correctly rounded) fp32 division, on every device. With a Python-number divisor, PyTorch's
    CUDA kernel computes a * (1 / b) (div_true_kernel_cuda), which can be one ulp off; the C++ and CUDA kernels
    divide, so the specification must too."""
    return a / torch.full_like(a, b)
