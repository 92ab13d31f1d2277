"""Layer-by-layer execution of decoder-only transformers (HF Llama/Mistral/Qwen2 layout) for GPTQ and AWQ.

Only one decoder layer's activations are alive at a time: the calibration batches' hidden states enter layer i,
its outputs (computed by the already-quantized layer) become layer i+1's inputs.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn


@contextlib.contextmanager
def one_thread():
    """For loops of many small ops on CPU (GPTQ's columns, per-layer RTN): one thread avoids an OpenMP barrier per
    op, which costs milliseconds whenever the cores are shared with other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def pad_cols(w: torch.Tensor, g: int) -> torch.Tensor:
    """``w`` ``[..., K]`` zero-padded on the right to a multiple of ``g`` columns (the ragged last group)."""
    K = w.shape[-1]
    Kp = -(-K // g) * g
    return w if Kp == K else F.pad(w, (0, Kp - K))


class UnsupportedModel(ValueError):
    """The model does not have the decoder layout the layer-wise algorithms need."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers of an HF causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedModel(f"{type(model).__name__} has no `model.layers` list of decoder layers "
                               "(HF Llama-style causal LMs are supported)")
    return layers


class _Stop(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, batches: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict]]:
    """Runs the embedding part of ``model`` on each ``[B, L]`` token batch and returns layer 0's hidden-state inputs
    ``[B, L, H]`` and keyword arguments (attention mask, rotary embeddings, positions), one per batch."""
    layers = decoder_layers(model)
    hidden, kwargs = [], []

    def hook(_mod, args, kw):
        hidden.append((args[0] if args else kw.pop("hidden_states")).detach())
        kw = {k: v for k, v in kw.items() if k not in ("cache", "past_key_values", "past_key_value", "use_cache")}
        kwargs.append(kw)
        raise _Stop

    h = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            try:
                model(input_ids=ids, use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    return hidden, kwargs


def layer_forward(layer: nn.Module, x: torch.Tensor, kw: dict) -> torch.Tensor:
    out = layer(x, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


def check_finite(t: torch.Tensor, where: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"NaN or inf in the activations at {where}; the model or the calibration data is broken "
                         "(check the weights and the dtype)")
