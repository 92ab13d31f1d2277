"""Runs an op on the backend the dispatch table picks. Every public function in qkernels.ops ends here."""

from __future__ import annotations

import os

import torch

from .. import _ext, dispatch
from .. import reference as _reference

# op name -> callable for the "native" backend (torch's own hardware ops, e.g. torch._scaled_mm). The families
# register theirs at import (ops/float8.py: fp8_mm, ops/float4.py: fp4_mm); the dict lives here because call() reads
# it and the families import call() from this module.
NATIVE: dict = {}


def _overload(op: str):
    return getattr(torch.ops.qkernels, op).default


# (op, device, shape class) -> the compiled kernel's OpOverload, or None where an unforced call runs something else
_COMPILED: dict = {}
# QKERNELS_BACKEND is read on every call: os.environ.get costs ~1 us (it encodes the key), a look-up in the mapping
# os.environ keeps in sync (its _data, what os.environ.get reads too) ~0.05 us; a call decodes the value only when
# the variable is set
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("QKERNELS_BACKEND") if _ENV_DATA is not None else None


def backend_forced_by_env() -> bool:
    if _ENV_DATA is None:
        return bool(os.environ.get("QKERNELS_BACKEND"))
    return bool(_ENV_DATA.get(_ENV_KEY))


def compiled_op(op: str, device: torch.device, **ctx):
    """The op's compiled kernel (``torch.ops.qkernels.<op>.default``) when an unforced call on ``device`` runs it
    (the dispatch table picks "cpu" or "cuda"), else None: then go through :func:`call`.

    The decode hot path: the answer is cached per (op, device, :func:`dispatch.shape_class` of ``ctx``), so a call
    costs a dict lookup instead of a walk of the table. Never cached and always None under torch.compile (the caller
    takes its traceable path), ``mock_device`` or QKERNELS_BACKEND (read on every call, so setting it takes effect at
    once): there ``call`` runs ``choose``. The compiled kernels check their arguments themselves (TORCH_CHECK), so a
    caller may skip its Python-side checks when it gets an op here and run them only if the kernel raises, to turn
    the kernel's message into the Python one."""
    if dispatch._MOCK is not None or backend_forced_by_env() or torch.compiler.is_compiling():
        return None
    key = (op, device) if device.type == "cpu" else (op, device, dispatch.shape_class(ctx))
    try:
        return _COMPILED[key]
    except KeyError:
        pass
    if device.type == "cpu":
        fn = _overload(op) if dispatch.cpu_fast_path(op) else None  # without choose: see dispatch.cpu_fast_path
    else:
        fn = _overload(op) if dispatch.choose(op, device, **ctx).backend == "cuda" else None
    _COMPILED[key] = fn
    return fn


def call(op: str, args: tuple, device: torch.device, backend: str | None = None, **ctx):
    """``args`` are the schema's positional arguments. Under torch.compile the registered op is called directly
    (its fake kernel makes it traceable; the dispatcher then picks the CPU/CUDA kernel)."""
    if torch.compiler.is_compiling() and _ext.HAS_C:
        return getattr(torch.ops.qkernels, op)(*args)
    if backend is None:
        fn = compiled_op(op, device, **ctx)
        if fn is not None:
            return fn(*args)
    decision = dispatch.choose(op, device, backend, **ctx)
    b = decision.backend
    if b in ("cpu", "cuda"):
        return getattr(torch.ops.qkernels, op)(*args)
    if b == "triton":
        from .. import triton as qtriton

        return qtriton.get(op)(*args)
    if b == "native":
        return NATIVE[op](*args)
    return _reference.OPS[op](*args)
