"""Runs an op on the backend the dispatch table picks. Every public function in qkernels.ops ends here."""

from __future__ import annotations

import functools
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


# (op, device) -> the compiled kernel's OpOverload for a CPU device (None where an unforced call runs something
# else), or _BY_SHAPE for a GPU, whose answer is cached under (op, device, shape class) instead
_COMPILED: dict = {}
_BY_SHAPE = object()
_UNSEEN = object()
# QKERNELS_BACKEND is read on every call: os.environ.get costs ~1 us (it encodes the key), a look-up in the mapping
# os.environ keeps in sync (its _data, what os.environ.get reads too) ~0.05 us; a call decodes the value only when
# the variable is set
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("QKERNELS_BACKEND") if _ENV_DATA is not None else None


def backend_forced_by_env() -> bool:
    if _ENV_DATA is None:
        return bool(os.environ.get("QKERNELS_BACKEND"))
    return bool(_ENV_DATA.get(_ENV_KEY))


# the three checks every fast path makes per call, as bound C calls (a Python-level call frame each would cost more
# than the look-ups): QKERNELS_BACKEND's raw value (None or b"" when unset or empty), torch.compile tracing
_env_value = functools.partial(_ENV_DATA.get, _ENV_KEY) if _ENV_DATA is not None else backend_forced_by_env
is_compiling = torch.compiler.is_compiling


def _first_lookup(op: str, device: torch.device):
    # a CPU device's answer never depends on the call (see dispatch.cpu_fast_path), so it needs no choose()
    fn = (_overload(op) if dispatch.cpu_fast_path(op) else None) if device.type == "cpu" else _BY_SHAPE
    _COMPILED[(op, device)] = fn
    return fn


def compiled_op(op: str, device: torch.device, **ctx):
    """The op's compiled kernel (``torch.ops.qkernels.<op>.default``) when an unforced call on ``device`` runs it
    (the dispatch table picks "cpu" or "cuda"), else None: then go through :func:`call`.

    The decode hot path: the answer is cached per (op, device) on a CPU, per (op, device,
    :func:`dispatch.shape_class` of ``ctx``) on a GPU, so a call costs a dict lookup instead of a walk of the table.
    Never cached and always None under torch.compile (the caller takes its traceable path), ``mock_device`` or
    QKERNELS_BACKEND (read on every call, so setting it takes effect at once): there ``call`` runs ``choose``. The
    compiled kernels check their arguments themselves (TORCH_CHECK), so a caller may skip its Python-side checks when
    it gets an op here and run them only if the kernel raises, to turn the kernel's message into the Python one."""
    if dispatch._MOCK is not None or _env_value() or is_compiling():
        return None
    fn = _COMPILED.get((op, device), _UNSEEN)
    if fn is _UNSEEN:
        fn = _first_lookup(op, device)
    if fn is not _BY_SHAPE:
        return fn
    key = (op, device, dispatch.shape_class(ctx))
    fn = _COMPILED.get(key, _UNSEEN)
    if fn is _UNSEEN:
        fn = _COMPILED[key] = _overload(op) if dispatch.choose(op, device, **ctx).backend == "cuda" else None
    return fn


def cpu_op(op: str, device: torch.device):
    """:func:`compiled_op` for a CPU device, None on any other: for the fast paths of ops whose GPU decision reads
    the call's full context (the fp8 / fp4 GEMMs: torch._scaled_mm or the CUDA kernel by dtypes, granularity and
    shapes), which they would have to build on every call; on a GPU those go through :func:`call`."""
    if dispatch._MOCK is not None or _env_value() or is_compiling():
        return None
    fn = _COMPILED.get((op, device), _UNSEEN)
    if fn is _UNSEEN:
        fn = _first_lookup(op, device)
    return None if fn is _BY_SHAPE else fn


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
