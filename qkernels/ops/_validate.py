"""Argument checks for the public functions: every message names the argument, what was expected and what came."""

from __future__ import annotations

import operator

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


def check_bool(v, name: str) -> bool:
    """A flag: bool only (a str such as "no" is truthy, an int is likely a misplaced positional argument)."""
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__} {v!r}")
    return v


def check_dtype(v, name: str, allowed: tuple):
    if not isinstance(v, torch.dtype):
        raise TypeError(f"{name} must be a torch.dtype, got {type(v).__name__} {v!r}")
    if v not in allowed:
        names = "/".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{name} must be one of {names}, got {v}")
    return v


def has_values(t: torch.Tensor) -> bool:
    """Whether data-dependent checks (NaN, ranges) can run: not under torch.compile (the kernels' own checks apply
    there) and not on the meta device (shapes only, like every op's fake kernel)."""
    return t.device.type != "meta" and not torch.compiler.is_compiling()


def check_int(v, name: str, minimum: int = 0) -> int:
    """An int (or an int-like such as numpy.int64 / an IntEnum), not a bool or a float, >= minimum."""
    if isinstance(v, bool):
        raise TypeError(f"{name} must be an int, got {v!r}")
    try:
        v = operator.index(v)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(v).__name__} {v!r}") from None
    if v < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {v}")
    return v


def check_shape_arg(shape, name: str) -> tuple:
    """A shape: a sequence (torch.Size, tuple, list) of non-negative ints."""
    if isinstance(shape, (int, str, bytes)) or not hasattr(shape, "__iter__"):
        raise TypeError(f"{name} must be a sequence of ints (torch.Size, tuple, list), got {type(shape).__name__} "
                        f"{shape!r}")
    return tuple(check_int(s, f"{name}[{i}]") for i, s in enumerate(shape))
