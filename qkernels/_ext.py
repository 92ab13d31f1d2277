"""Loads the compiled extension ``qkernels._C`` (it registers the C++/CUDA kernels of ``torch.ops.qkernels``).

Without it qkernels still imports: every public function then runs its plain-PyTorch reference (or Triton) path,
and a warning says so once.
"""

from __future__ import annotations

import functools
import warnings

import torch

LOAD_ERROR: str | None = None
try:
    from . import _C  # noqa: F401  (importing registers the ops)

    HAS_C = True
except ImportError as e:  # pragma: no cover - exercised only without a build
    HAS_C = False
    LOAD_ERROR = str(e)
    warnings.warn(
        f"qkernels: compiled extension not loaded ({e}); using the pure-PyTorch reference paths. "
        "Build it with `pip install --no-build-isolation -e .`",
        RuntimeWarning,
        stacklevel=2,
    )


@functools.lru_cache(maxsize=None)
def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``qkernels::op`` has a compiled kernel for ``dispatch_key`` ("CPU", "CUDA"). Cached: the kernels of
    ``qkernels._C`` are registered once at import, and the dispatcher query costs ~30 us on every op call otherwise."""
    if not HAS_C:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"qkernels::{op}", dispatch_key)
    except RuntimeError:
        return False


def compiled_cuda_archs() -> list[str]:
    """The CUDA archs the extension was built for (empty when built without CUDA)."""
    if not HAS_C:
        return []
    fn = getattr(torch.ops.qkernels, "cuda_build_archs", None)
    if fn is None:
        return []
    try:
        return [a for a in fn().split(";") if a]
    except RuntimeError:
        return []
