"""The decoder-layer layout of each supported model family, as the layer-wise algorithms need it.

* AWQ (arXiv:2306.00978) divides the output channels of the op in front of a group of linears by a per-channel
  scale ``s`` and multiplies the linears' input columns by ``s``. Which op that is, and how ``s`` folds into it,
  depends on the family: a plain RMSNorm or a LayerNorm (weight and bias divided by ``s``), Gemma's RMSNorm whose
  output is ``x_hat * (1 + w)`` (``w`` becomes ``(1 + w) / s - 1``), a linear's rows (v -> o, up -> down), or part
  of a fused linear's rows (Phi-3's ``qkv_proj``: the value rows; ``gate_up_proj``: the up half). Gemma2/Gemma3 have
  four norms per layer: ``post_attention_layernorm`` normalises the attention OUTPUT, and the MLP's input norm is
  ``pre_feedforward_layernorm``.
* GPTQ's ``true_sequential`` order: the groups of linears that read the same input, in execution order.

A mapping is a claim about a model's code: :func:`check_invariance` verifies it on each layer (random scales folded
into a float copy must leave the layer's output unchanged) before AWQ touches the layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ._layers import UnsupportedModel, layer_forward

# how a scale folds into the op in front of the scaled linears
NORM = "norm"  # RMSNorm / LayerNorm: y = x_hat * w (+ b): w, b divided by s
NORM_PLUS_ONE = "norm_plus_one"  # Gemma RMSNorm: y = x_hat * (1 + w): (1 + w) divided by s
LINEAR = "linear"  # a linear's output rows (all of them, or the last rows of a fused projection)


@dataclass(frozen=True)
class ScaleGroup:
    """``linears`` (names relative to the decoder layer) read the output of ``prev``; ``block`` is the module whose
    output AWQ's scale search compares (it reads the same input as ``linears``). ``tail``: ``linears`` read only the
    last ``in_features`` output rows of ``prev`` (a fused projection). ``when``: the fold is valid only if this holds
    for the layer (v -> o needs as many value rows as o has inputs: no grouped-query attention)."""

    prev: str
    fold: str
    linears: tuple[str, ...]
    block: str
    tail: bool = False
    when: Callable[[nn.Module], bool] | None = None

    def applies(self, layer: nn.Module) -> bool:
        return self.when is None or bool(self.when(layer))


@dataclass(frozen=True)
class Family:
    name: str
    groups: tuple[ScaleGroup, ...]
    sequential: tuple[tuple[str, ...], ...]
    no_clip: tuple[str, ...]  # q/k: their errors pass through the softmax, AWQ's clip search ignores that

    def required(self) -> set[str]:
        return {n for g in self.groups for n in (g.prev, g.block, *g.linears)} | {n for s in self.sequential for n in s}


def _same(a: str, b: str, fused: int = 1):
    return lambda layer: layer.get_submodule(a).out_features == fused * layer.get_submodule(b).in_features


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj")
_LLAMA_SEQ = (_ATTN, ("self_attn.o_proj",), _MLP, ("mlp.down_proj",))


def _llama_like(name: str, norm_fold: str, mlp_norm: str) -> Family:
    return Family(name, (
        ScaleGroup("input_layernorm", norm_fold, _ATTN, "self_attn"),
        ScaleGroup("self_attn.v_proj", LINEAR, ("self_attn.o_proj",), "self_attn.o_proj",
                   when=_same("self_attn.v_proj", "self_attn.o_proj")),
        ScaleGroup(mlp_norm, norm_fold, _MLP, "mlp"),
        ScaleGroup("mlp.up_proj", LINEAR, ("mlp.down_proj",), "mlp.down_proj"),
    ), _LLAMA_SEQ, ("self_attn.q_proj", "self_attn.k_proj"))


LLAMA = _llama_like("llama", NORM, "post_attention_layernorm")  # also Mistral, Qwen2, Qwen3 (q/k norms act after)
GEMMA = _llama_like("gemma", NORM_PLUS_ONE, "post_attention_layernorm")
GEMMA2 = _llama_like("gemma2", NORM_PLUS_ONE, "pre_feedforward_layernorm")  # also Gemma3
STABLELM = _llama_like("stablelm", NORM, "post_attention_layernorm")  # LayerNorm with bias
PHI3 = Family("phi3", (
    ScaleGroup("input_layernorm", NORM, ("self_attn.qkv_proj",), "self_attn"),
    # without GQA the value rows are the last third of qkv_proj, as many as o_proj's inputs
    ScaleGroup("self_attn.qkv_proj", LINEAR, ("self_attn.o_proj",), "self_attn.o_proj", tail=True,
               when=_same("self_attn.qkv_proj", "self_attn.o_proj", 3)),
    ScaleGroup("post_attention_layernorm", NORM, ("mlp.gate_up_proj",), "mlp"),
    ScaleGroup("mlp.gate_up_proj", LINEAR, ("mlp.down_proj",), "mlp.down_proj", tail=True),  # [gate; up] rows
), (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    ("self_attn.qkv_proj",))

# HF ``config.model_type`` -> family. StableLM is supported only without its parallel-residual variant (checked by
# the invariance test: the MLP then reads input_layernorm's output, not post_attention_layernorm's).
FAMILIES = {"llama": LLAMA, "mistral": LLAMA, "qwen2": LLAMA, "qwen3": LLAMA, "gemma": GEMMA, "gemma2": GEMMA2,
            "gemma3_text": GEMMA2, "phi3": PHI3, "stablelm": STABLELM}


def family_of(model: nn.Module) -> Family:
    """The :class:`Family` of an HF causal LM by ``config.model_type``; raises :class:`UnsupportedModel`."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    fam = FAMILIES.get(mt)
    if fam is None:
        raise UnsupportedModel(f"AWQ has no layer mapping for model_type {mt!r} ({type(model).__name__}); supported: "
                               f"{sorted(FAMILIES)}")
    return fam


def check_layout(layer: nn.Module, fam: Family) -> None:
    names = {n for n, _ in layer.named_modules()}
    missing = sorted(n for n in fam.required() if n not in names)
    if missing:
        raise UnsupportedModel(f"decoder layer {type(layer).__name__} lacks {missing}, which the {fam.name} AWQ "
                               "mapping expects")


@torch.no_grad()
def fold(layer: nn.Module, grp: ScaleGroup, s: torch.Tensor) -> None:
    """Folds the per-channel scale ``s`` ``[K]`` of ``grp`` into ``layer`` in place: ``prev``'s output channels
    divided by ``s``, the linears' input columns multiplied by ``s`` (the float function is unchanged)."""
    prev = layer.get_submodule(grp.prev)
    s = s.float()
    K = s.numel()
    if grp.fold == LINEAR:
        rows = slice(prev.out_features - K, prev.out_features) if grp.tail else slice(None)
        w = prev.weight.data
        w[rows] = (w[rows].float() / s.view(-1, 1)).to(w.dtype)
        if prev.bias is not None:
            prev.bias.data[rows] = (prev.bias.data[rows].float() / s).to(prev.bias.dtype)
    elif grp.fold == NORM_PLUS_ONE:
        w = prev.weight.data
        prev.weight.data = ((1.0 + w.float()) / s - 1.0).to(w.dtype)
    elif grp.fold == NORM:
        prev.weight.data = (prev.weight.data.float() / s).to(prev.weight.dtype)
        if getattr(prev, "bias", None) is not None:
            prev.bias.data = (prev.bias.data.float() / s).to(prev.bias.dtype)
    else:
        raise ValueError(f"unknown fold {grp.fold!r}")
    for n in grp.linears:
        lin = layer.get_submodule(n)
        lin.weight.data = (lin.weight.data.float() * s.view(1, -1)).to(lin.weight.dtype)


def _to_float(v):
    if isinstance(v, torch.Tensor):
        return v.float() if v.is_floating_point() else v
    if isinstance(v, (tuple, list)):
        return type(v)(_to_float(x) for x in v)
    if isinstance(v, dict):
        return {k: _to_float(x) for k, x in v.items()}
    return v


@torch.no_grad()
def invariance_error(layer: nn.Module, fam: Family, x: torch.Tensor, kw: dict, seed: int = 0) -> float:
    """Relative difference ``|y' - y| / |y|`` between a float32 copy of ``layer`` and the same copy with random
    scales in [e^-1, e] folded into every group of ``fam`` that applies, on the input ``x`` ``[B, L, H]``."""
    ref = copy.deepcopy(layer).float()
    folded = copy.deepcopy(ref)
    gen = torch.Generator().manual_seed(seed)
    for grp in fam.groups:
        if grp.applies(folded):
            K = folded.get_submodule(grp.linears[0]).in_features
            fold(folded, grp, torch.exp(torch.rand(K, generator=gen) * 2 - 1))
    xf, kwf = x.float(), _to_float(kw)
    y = layer_forward(ref, xf, kwf)
    y2 = layer_forward(folded, xf, kwf)
    return float((y2 - y).norm() / y.norm().clamp(min=1e-30))


def check_invariance(layer: nn.Module, fam: Family, x: torch.Tensor, kw: dict, where: str, tol: float = 1e-4):
    """Raises :class:`UnsupportedModel` when folding random scales changes the layer's float output by more than
    ``tol`` (relative): the mapping does not describe this model's code, and AWQ would break it."""
    check_layout(layer, fam)
    err = invariance_error(layer, fam, x, kw)
    if not err <= tol:
        raise UnsupportedModel(f"AWQ: folding scales into {where} ({type(layer).__name__}, {fam.name} mapping) changes "
                               f"its float output by {err:.3g} (relative, tolerance {tol:g}); the mapping does not "
                               "match this model's code, refusing to quantize it with AWQ")
