"""``fuse_projections(model)``: one quantized GEMM for the projections of a decoder layer that read the same input.

A Llama-style layer runs q/k/v on the same normed hidden state and gate/up on the same MLP input: five GEMMs where
two would do. Per-call overhead dominates decode on small models (issue 18), and one larger GEMM also streams its
weights better. The fused layer is a :class:`QuantLinear` whose rows are the parts' rows concatenated along N (codes,
scales, zero points, bias): every output row is computed from its own weight row exactly as before, so outputs are
bit-identical to the unfused layers wherever the kernel's result for a row does not depend on N (the CPU kernels:
the decode kernels walk rows independently; tests/test_nn_fuse.py checks logits and generate on tiny models).

The model's own forward stays untouched: ``q_proj``, ``k_proj``, ``v_proj`` become :class:`ProjectionSlice` modules
that call the shared :class:`FusedLinear` (registered on the parent as ``qkv_proj`` / ``gate_up_proj``). The first
slice called with an input runs the fused GEMM and keeps the output; the others, called with the same tensor object
(unchanged since: same version counter; under ``torch.inference_mode`` tensors have none, so there the same object
counts as the same input, and so it does under torch.compile, which traces one fused GEMM per group with
``fullgraph=True``), return their column slice of it; the output is dropped once each slice
has taken its part. A slice called with another input (or twice with the same one) runs the fused GEMM again, so any
call order stays correct, only slower. The state dict then holds ``qkv_proj.*`` instead of ``q_proj.*``...: fuse
after loading, save unfused models.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .linear import QuantLinear

logger = logging.getLogger("qkernels.nn")

# (names of the parts, name of the fused module): HF Llama / Qwen2 / Mistral / Phi-3-style decoder layers
DEFAULT_GROUPS = ((("q_proj", "k_proj", "v_proj"), "qkv_proj"), (("gate_proj", "up_proj"), "gate_up_proj"))
_ROW_BUFFERS = ("qweight", "scale", "zero_point", "bias")


def _why_not(parts: list[QuantLinear]) -> str | None:
    """None if the parts can be concatenated along N into one layer with the same outputs, else the reason."""
    p0 = parts[0]
    for p in parts[1:]:
        if p.scheme != p0.scheme:
            return f"schemes differ ({p0.scheme!r} vs {p.scheme!r})"
        if p.in_features != p0.in_features:
            return f"in_features differ ({p0.in_features} vs {p.in_features})"
        if (p.bias is None) != (p0.bias is None) or (p.bias is not None and p.bias.dtype != p0.bias.dtype):
            return "bias presence or dtype differs"
        if p.qweight.device != p0.qweight.device:
            return "devices differ"
        for name in ("input_perm", "global_scale"):  # shared per layer, not per row: must be equal
            a, b = getattr(p0, name), getattr(p, name)
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                return f"{name} differs"
    for p in parts:
        for name in _ROW_BUFFERS:
            t = getattr(p, name)
            if t is not None and (t.dim() == 0 or t.shape[0] != p.out_features):
                # e.g. fp8 per-tensor or 128x128-block scales: not one row per output feature
                return f"{name} {tuple(t.shape)} is not per output row"
    return None


def concat_rows(parts: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear whose output is ``torch.cat([p(x) for p in parts], -1)`` (the parts must pass _why_not)."""
    p0 = parts[0]
    N = sum(p.out_features for p in parts)
    fused = QuantLinear(p0.in_features, N, p0.scheme, p0.bias is not None, act_order=p0.input_perm is not None,
                        bias_dtype=p0.bias.dtype if p0.bias is not None else torch.float32, device=p0.qweight.device)
    with torch.no_grad():
        for name in _ROW_BUFFERS:
            if getattr(fused, name) is not None:
                getattr(fused, name).copy_(torch.cat([getattr(p, name) for p in parts], 0))
        for name in ("input_perm", "global_scale"):
            if getattr(fused, name) is not None:
                getattr(fused, name).copy_(getattr(p0, name))
    return fused


class FusedLinear(nn.Module):
    """The fused layer of one group: ``linear`` (a QuantLinear) and the output widths of its parts, in order."""

    def __init__(self, linear: QuantLinear, names: tuple[str, ...], sizes: tuple[int, ...]):
        super().__init__()
        self.linear, self.names, self.sizes = linear, tuple(names), tuple(sizes)
        self._key = None  # (input tensor, its version) of the kept output
        self._outs = None
        self._taken = [False] * len(sizes)

    def part(self, i: int, x: torch.Tensor) -> torch.Tensor:
        key = self._key
        # inference-mode tensors have no version counter: there the same object is taken as the same input
        version = None if torch.compiler.is_compiling() or x.is_inference() else x._version
        if self._outs is None or self._taken[i] or key[0] is not x or key[1] != version:
            self._outs = self.linear(x).split(self.sizes, dim=-1)
            self._key, self._taken = (x, version), [False] * len(self.sizes)
        self._taken[i] = True
        out = self._outs[i]
        if all(self._taken):  # every part served: do not keep the input and output alive
            self._key = self._outs = None
        return out

    def extra_repr(self) -> str:
        return f"parts={dict(zip(self.names, self.sizes))}"


class ProjectionSlice(nn.Module):
    """Stands in for one fused projection (``q_proj``...): returns its columns of the fused layer's output."""

    def __init__(self, fused: FusedLinear, index: int):
        super().__init__()
        object.__setattr__(self, "_fused", fused)  # not a submodule: the parent registers it once
        self.index = index
        self.in_features = fused.linear.in_features
        self.out_features = fused.sizes[index]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fused.part(self.index, x)

    def extra_repr(self) -> str:
        f = self._fused
        return f"{f.names[self.index]} of the fused {f.names}, out_features={self.out_features}"


def fuse_projections(model: nn.Module, groups=DEFAULT_GROUPS) -> list[str]:
    """Fuse, in place, the QuantLinear projections of each module that read the same input (opt-in).

    Args:
        model: a quantized model (after :func:`qkernels.quantize_` or :func:`qkernels.load_quantized`).
        groups: ``((part names, fused name), ...)``; default q/k/v -> ``qkv_proj`` and gate/up -> ``gate_up_proj``
            (HF Llama, Qwen2, Mistral). A module is fused when it has every part as a :class:`QuantLinear` with the
            same scheme, in_features, bias presence, act-order permutation and per-row scales, and no attribute of
            the fused name yet; others are skipped with a logged reason (logger ``qkernels.nn``).
    The parts must be called with the same input tensor (as the attention and MLP forwards do). Returns the names of
    the fused modules created. Outputs are bit-identical to the unfused model on the CPU kernels.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    done = []
    for mod_name, mod in list(model.named_modules()):
        for names, fused_name in groups:
            parts = [getattr(mod, n, None) for n in names]
            if not all(isinstance(p, QuantLinear) for p in parts):
                continue
            where = f"{mod_name}.{fused_name}" if mod_name else fused_name
            why = _why_not(parts) or (f"{type(mod).__name__} already has an attribute {fused_name!r}"
                                      if hasattr(mod, fused_name) else None)
            if why:
                logger.warning("fuse_projections: not fusing %s: %s", where, why)
                continue
            fused = FusedLinear(concat_rows(parts), names, tuple(p.out_features for p in parts))
            setattr(mod, fused_name, fused)
            for i, n in enumerate(names):
                setattr(mod, n, ProjectionSlice(fused, i))
            done.append(where)
    logger.info("fuse_projections: %d fused projections", len(done))
    return done
