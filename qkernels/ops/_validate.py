"""Argument checks for the public functions: every message names the argument, what was expected and what came."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_tensor(t, name: str, dtypes: tuple | None = None, dim: int | None = None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = "/".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")


def check_float_tensor(t, name: str, dim: int | None = None):
    check_tensor(t, name, FLOAT_DTYPES, dim)


def check_same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor | None):
    if b is not None and a.device != b.device:
        raise ValueError(f"{name_b} must be on the same device as {name_a} ({a.device}), got {b.device}")


def check_bias(bias, N: int):
    """An optional GEMM bias: None or a float ``[N]`` tensor."""
    if bias is not None:
        check_float_tensor(bias, "bias", dim=1)
        if bias.shape[0] != N:
            raise ValueError(f"bias must have shape [N] = [{N}], got {tuple(bias.shape)}")
