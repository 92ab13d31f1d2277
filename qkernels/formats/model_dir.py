"""Writing a model directory (``model.safetensors`` + quantization config), shared by every format's writer
(:func:`qkernels.formats.hf.save_quantized`, :func:`qkernels.formats.gptq.save_gptq`,
:func:`qkernels.formats.awq.save_awq`). It lives apart from :mod:`qkernels.formats.hf` (the loader, which imports the
format converters) so that the converters can use it without importing the loader back."""

from __future__ import annotations

import json
import os

from torch import nn

from ..nn.linear import QuantLinear

WEIGHTS_NAME = "model.safetensors"


def write_model_dir(model: nn.Module, save_dir: str, qcfg: dict, layer_tensors=None,
                    metadata: dict | None = None) -> str:
    """Write ``model``'s state dict (tied tensors once) to ``save_dir/model.safetensors``, ``qcfg`` to
    ``quantization_config.json`` and, for transformers models, ``config.json`` (with ``quantization_config``).

    ``layer_tensors(name, layer) -> {suffix: tensor}``, when given, replaces the buffers of every QuantLinear
    ``name`` by the tensors ``name.suffix`` (a checkpoint format's packed layout)."""
    from safetensors.torch import save_file  # optional dependency (extras [hf] / [formats])

    packed = {}
    if layer_tensors is not None:
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                packed.update({f"{name}.{k}": v for k, v in layer_tensors(name, m).items()})
    owners = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)} if packed else set()
    sd, seen = {}, {}
    for k, v in model.state_dict(keep_vars=False).items():
        if k.rpartition(".")[0] in owners:
            continue
        if v.device.type == "meta":
            raise ValueError(f"{k} is on the meta device; materialize the model before saving")
        key = (v.data_ptr(), v.dtype, tuple(v.shape), v.stride()) if v.numel() else None
        if key is not None and key in seen:
            continue  # tied with seen[key]: load_quantized re-ties from the model's own aliasing
        if key is not None:
            seen[key] = k
        sd[k] = v.detach().contiguous().cpu()
    sd.update({k: v.detach().contiguous().cpu() for k, v in packed.items()})
    os.makedirs(save_dir, exist_ok=True)
    save_file(sd, os.path.join(save_dir, WEIGHTS_NAME), metadata={"format": "pt", **(metadata or {})})
    with open(os.path.join(save_dir, "quantization_config.json"), "w") as f:
        json.dump(qcfg, f, indent=1)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        d = config.to_dict()
        d["quantization_config"] = qcfg
        with open(os.path.join(save_dir, "config.json"), "w") as f:
            json.dump(d, f, indent=1)
    return save_dir
