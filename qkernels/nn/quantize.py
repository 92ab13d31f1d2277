"""``quantize_(model, scheme)``: swap every eligible ``nn.Linear`` of a model for a :class:`QuantLinear`, in place."""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from .linear import QuantLinear
from .schemes import Scheme

logger = logging.getLogger("qkernels.nn")


def output_embedding_names(model: nn.Module) -> set[str]:
    """Names of the modules that produce logits (``lm_head``), which quantize_ leaves alone by default: they are
    often tied to the input embeddings and are the most accuracy-sensitive layer."""
    names = set()
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    for name, mod in model.named_modules():
        if (out is not None and mod is out) or name.split(".")[-1] == "lm_head":
            names.add(name)
    return names


def default_filter(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    skip = output_embedding_names(model)
    return lambda module, name: isinstance(module, nn.Linear) and name not in skip


def quantize_(model: nn.Module, scheme: Scheme, filter_fn: Callable[[nn.Module, str], bool] | None = None, *,
              include_lm_head: bool | Scheme = False, embedding_from_head: bool = False) -> nn.Module:
    """Replace the ``nn.Linear`` layers of ``model`` by :class:`QuantLinear` (round to nearest), in place.

    Args:
        model: any ``nn.Module`` (a transformers model, a Sequential, a single Linear's parent...).
        scheme: e.g. ``Int4WeightOnly(group_size=128)``, ``Int8WeightOnly()``, ``Int8Dynamic()``,
            ``Fp8Dynamic("row")``, ``Fp4("nvfp4")``.
        filter_fn: ``filter_fn(module, fully_qualified_name) -> bool`` picks the Linears to quantize. The default
            takes every ``nn.Linear`` except the output embedding (``lm_head``); embeddings are never Linears and stay.
        include_lm_head: also quantize the output head(s) (the modules :func:`output_embedding_names` finds, whatever
            ``filter_fn`` says): ``True`` with ``scheme``, or a scheme of its own (e.g. ``Int8WeightOnly()`` for the
            head with an int4 body). A head tied to the input embedding is untied: the head becomes a QuantLinear of
            the shared weight, the embedding keeps the float weight for its lookup (which reads one row per token,
            not the table), and ``model.config.tie_word_embeddings`` is set to False so transformers does not tie
            them again.
        embedding_from_head: with a tied head quantized to integer codes (int4 / int8 schemes): the input
            embedding drops its float copy and looks its rows up in the head's codes
            (:class:`~qkernels.nn.QuantEmbedding`), so the shared matrix is held once, quantized. The embeddings
            then carry the head's rounding. ValueError when no tied head is quantized or its scheme has no integer
            codes.
    Layers whose shape the scheme cannot take (e.g. in_features not divisible by the group size) are skipped with a
    logged reason (logger ``qkernels.nn``). All layers are quantized before any is swapped, so an error leaves the
    model untouched. Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(scheme, Scheme):
        raise TypeError(f"scheme must be a qkernels.nn scheme (e.g. Int4WeightOnly()), got {type(scheme).__name__}")
    if not isinstance(include_lm_head, (bool, Scheme)):
        raise TypeError(f"include_lm_head must be a bool or a qkernels.nn scheme, got {type(include_lm_head).__name__}")
    if filter_fn is None:
        filter_fn = default_filter(model)
    if isinstance(model, nn.Linear):
        raise TypeError("quantize_ swaps submodules in place; wrap a bare nn.Linear (nn.Sequential(linear)) or use "
                        "QuantLinear.from_linear(linear, scheme)")
    heads = output_embedding_names(model) if include_lm_head is not False else set()
    head_scheme = scheme if include_lm_head is True else include_lm_head
    swaps = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or isinstance(mod, QuantLinear):
            continue
        s = head_scheme if name in heads else scheme
        if name not in heads and not filter_fn(mod, name):
            logger.info("quantize_: %s left unquantized (filter_fn)", name)
            continue
        why = s.check_shape(mod.in_features, mod.out_features)
        if why:
            logger.warning("quantize_: skipping %s (Linear(%d, %d)): %s", name, mod.in_features, mod.out_features, why)
            continue
        swaps.append((name, QuantLinear.from_linear(mod, s)))
    untied = _tied_heads(model, {name for name, _ in swaps} & heads)
    embeddings = _embeddings_from_heads(model, dict(swaps), untied) if embedding_from_head else []
    for name, q in swaps + embeddings:
        set_submodule(model, name, q)
    if untied and getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        model.config.tie_word_embeddings = False  # the head is a QuantLinear now: transformers must not re-tie it
    logger.info("quantize_: %d Linear layers -> %r%s", len(swaps), scheme,
                f" (output head {', '.join(sorted(heads))} -> {head_scheme!r}, untied: {untied})" if heads else "")
    return model


def _embeddings_from_heads(model: nn.Module, swaps: dict, untied: list[str]) -> list[tuple[str, nn.Module]]:
    """(name, QuantEmbedding) for each nn.Embedding sharing its weight with a head in ``untied`` (quantized, in
    ``swaps``); built before any swap so that an error leaves the model untouched."""
    from .embedding import QuantEmbedding

    out = []
    for head in untied:
        w = model.get_submodule(head).weight
        for name, mod in model.named_modules(remove_duplicate=False):
            if isinstance(mod, nn.Embedding) and mod.weight is w:
                out.append((name, QuantEmbedding(swaps[head], mod.weight.dtype, mod.padding_idx)))
    if not out:
        raise ValueError("embedding_from_head=True needs an output head tied to an nn.Embedding and quantized "
                         "(include_lm_head=...); this model has none" + ("" if untied else " (no tied head quantized)"))
    return out


def _tied_heads(model: nn.Module, heads: set[str]) -> list[str]:
    """The heads among ``heads`` whose weight is shared with another module (the input embedding)."""
    if not heads:
        return []
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor):
            owners.setdefault(id(w), []).append(name)
    return sorted(h for h in heads if len(set(owners.get(id(model.get_submodule(h).weight), ()))) > 1)


def set_submodule(model: nn.Module, name: str, new: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def use_int8_activations(model: nn.Module) -> list[str]:
    """Run every int4 weight-only layer of ``model`` as W4A8, in place: each :class:`QuantLinear` with an
    ``Int4WeightOnly`` scheme becomes one with ``Int8DynamicInt4Weight`` (same group size and symmetry) holding the
    same codes, scales, zero points, bias and act-order permutation; only the activations change (rounded to int8
    per token and weight group inside :func:`qkernels.int8_dynamic_int4_mm`). For int4 models from any source: RTN,
    GPTQ, AWQ, or checkpoints loaded with :func:`qkernels.load_quantized`. 2- and 3-bit codes are int4 codes too.
    Before or after :func:`qkernels.fuse_projections` (a fused group's QuantLinear is switched like any other).
    Returns the names of the layers switched."""
    from .linear import QuantLinear
    from .schemes import Int4WeightOnly, Int8DynamicInt4Weight

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    from .embedding import QuantEmbedding

    done, switched = [], {}
    for name, mod in list(model.named_modules()):
        if not (isinstance(mod, QuantLinear) and isinstance(mod.scheme, Int4WeightOnly)):
            continue
        if not name:
            raise ValueError("model is itself a QuantLinear: it cannot be replaced in place; pass the module that "
                             "holds it (or build the layer with Int8DynamicInt4Weight)")
        scheme = Int8DynamicInt4Weight(group_size=mod.scheme.group_size, symmetric=mod.scheme.symmetric)
        new = QuantLinear.from_codes(mod.codes(), mod.scale, mod.zero_point, scheme, mod.bias, mod.input_perm)
        new.train(mod.training)
        set_submodule(model, name, new)
        switched[id(mod)] = new
        done.append(name)
    for mod in model.modules():  # an embedding reading a switched head's codes follows it (the old layer is dropped)
        if isinstance(mod, QuantEmbedding) and id(mod.head) in switched:
            object.__setattr__(mod, "_head", switched[id(mod.head)])
    return done
