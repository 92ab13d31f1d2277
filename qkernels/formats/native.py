"""qkernels' own checkpoints (``qkernels.save_quantized``): QuantLinear buffers as they are, plus one JSON entry per
quantized layer: ``{"scheme": Scheme.to_dict(), "in_features", "out_features", "bias", "act_order"}``."""

from __future__ import annotations

import torch

from ..nn.linear import QuantLinear
from ..nn.schemes import Scheme
from ._common import CheckpointError

FORMAT_VERSION = 1


def layer_config(mod: QuantLinear) -> dict:
    return {"scheme": mod.scheme.to_dict(), "in_features": mod.in_features, "out_features": mod.out_features,
            "bias": mod.bias is not None, "act_order": mod.act_order}


def convert(tensors: dict, qcfg: dict):
    version = qcfg.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"quantization_config.format_version must be {FORMAT_VERSION}, got {version!r}")
    cfg_layers = qcfg.get("layers")
    if not isinstance(cfg_layers, dict):
        raise CheckpointError(f"quantization_config.layers must be a dict, got {type(cfg_layers).__name__}")
    layers, used = {}, set()
    for name, lc in cfg_layers.items():
        try:
            scheme = Scheme.from_dict(lc["scheme"])
            bias_key = f"{name}.bias"
            bias_dtype = tensors[bias_key].dtype if lc.get("bias") and bias_key in tensors else torch.float32
            mod = QuantLinear(lc["in_features"], lc["out_features"], scheme, bool(lc.get("bias")),
                              act_order=bool(lc.get("act_order")), bias_dtype=bias_dtype)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"quantization_config.layers[{name!r}] is invalid: {e}") from e
        sd = {}
        for key, buf in mod.state_dict().items():
            full = f"{name}.{key}"
            if full not in tensors:
                raise CheckpointError(f"{full} is missing from the checkpoint")
            t = tensors[full]
            if t.dtype != buf.dtype or t.shape != buf.shape:
                raise CheckpointError(f"{full} must be {buf.dtype} {tuple(buf.shape)}, got {t.dtype} {tuple(t.shape)}")
            sd[key] = t
            used.add(full)
        if mod.input_perm is not None:
            perm = sd["input_perm"]
            K = mod.in_features
            if not torch.equal(torch.sort(perm).values, torch.arange(K)):
                raise CheckpointError(f"{name}.input_perm must be a permutation of range({K})")
        mod.load_state_dict(sd, assign=True)
        layers[name] = mod
    return layers, {k: v for k, v in tensors.items() if k not in used}
