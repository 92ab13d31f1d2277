"""Integrations with other libraries; each submodule imports its library, so import only the one you use.

* :mod:`.transformers_quantizer`: ``quant_method="qkernels"`` for ``from_pretrained`` / ``save_pretrained``
  (``QKernelsConfig``). Registered automatically: ``import qkernels`` installs an import hook
  (:func:`install_transformers_hook`) that registers it the moment transformers loads its quantizer table, so
  ``import qkernels`` itself never imports transformers (which takes seconds).
* :mod:`.peft_lora`: LoRA adapters (peft) on QuantLinear layers.
* :mod:`.torchao_interop`: torchao-quantized Linears -> QuantLinear.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings

_TRIGGER = "transformers.quantizers.auto"  # holds the quant_method -> quantizer tables; modeling_utils imports it


def _register_transformers():
    mod = sys.modules.get(f"{__name__}.transformers_quantizer")
    if mod is not None and not hasattr(mod, "register"):
        return  # that module is being imported (it imported transformers' table): it registers at its end
    try:
        from .transformers_quantizer import register
    except ImportError as e:  # e.g. transformers 4.x: from_pretrained must keep working for everything else
        warnings.warn(f"quant_method='qkernels' is not registered with transformers: {e}", stacklevel=2)
        return
    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``transformers.quantizers.auto`` is imported it wraps that module's loader so the
    registration runs right after the module body."""

    _busy = False

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _TRIGGER or self._busy:
            return None
        self._busy = True
        try:
            spec = importlib.util.find_spec(fullname)  # the real finders (this one answers None meanwhile)
        finally:
            self._busy = False
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _register_transformers()

    def __getattr__(self, name):  # get_source, get_filename... as the wrapped loader
        return getattr(self._inner, name)


def install_transformers_hook() -> None:
    """Make ``quant_method="qkernels"`` known to transformers: now if its quantizer table is loaded, else when it is.
    Cheap when transformers is not used (no import of it)."""
    if _TRIGGER in sys.modules:
        _register_transformers()
        return
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


def __getattr__(name):
    # `from qkernels.integrations import QKernelsConfig` imports transformers only when asked for
    if name in ("QKernelsConfig", "QKernelsHfQuantizer"):
        from . import transformers_quantizer

        return getattr(transformers_quantizer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
