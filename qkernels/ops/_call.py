"""Runs an op on the backend the dispatch table picks. Every public function in qkernels.ops ends here."""

from __future__ import annotations

import torch

from .. import _ext, dispatch
from .. import reference as _reference

# op name -> callable for the "native" backend (torch's own hardware ops); families fill it in.
NATIVE: dict = {}


def call(op: str, args: tuple, device: torch.device, backend: str | None = None, **ctx):
    """``args`` are the schema's positional arguments. Under torch.compile the registered op is called directly
    (its fake kernel makes it traceable; the dispatcher then picks the CPU/CUDA kernel)."""
    if torch.compiler.is_compiling() and _ext.HAS_C:
        return getattr(torch.ops.qkernels, op)(*args)
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
