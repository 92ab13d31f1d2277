"""LoRA (peft) on frozen quantized weights: QLoRA-style fine-tuning with :class:`qkernels.nn.QuantLinear` bases.

``y = QuantLinear(x) + scaling * B(A(dropout(x)))`` (Hu et al., LoRA, arXiv:2106.09685; Dettmers et al., QLoRA,
arXiv:2305.14314). The base layer's codes and scales are buffers, never parameters, so no optimizer can touch them;
gradients reach the adapters of earlier layers through the QuantLinear ops' backward with respect to their input
(``grad_x = grad_y @ dequant(W)``, :mod:`qkernels.ops.autograd`).

Use :func:`get_peft_model` (peft's, with the QuantLinear adapter registered through peft's custom-module API,
``LoraConfig._register_custom_module``) or register it yourself with :func:`register_lora`.

Merging (``merge`` / ``merge_and_unload``) re-quantizes: the merged float weight ``dequant(W) + scaling * B @ A`` is
rounded to nearest in the base layer's scheme (:meth:`QuantLinear.from_linear`), so the merged model is again a
quantized model of the same size, and it differs from base + adapter by one more rounding (with 4-bit codes an
adapter update smaller than half a quantization step can vanish; keep the adapter unmerged when that matters).
``unmerge`` restores the original base layer exactly.
"""

from __future__ import annotations

import peft
import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from ..nn.linear import QuantLinear
from ..nn.quantize import output_embedding_names


class QuantLinearLora(nn.Module, LoraLayer):
    """A peft LoRA layer around a :class:`QuantLinear` (plain LoRA: no DoRA / lora_bias / other variants)."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: peft.LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs):
        for field in ("use_dora", "lora_bias"):
            if getattr(config, field, False):
                raise ValueError(f"LoraConfig.{field}=True is not supported on qkernels QuantLinear layers; "
                                 f"set it to False")
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if not isinstance(self.get_base_layer(), QuantLinear):
            raise TypeError(f"base_layer must be a qkernels QuantLinear, got {type(self.get_base_layer()).__name__}")
        self._active_adapter = adapter_name
        self._premerge_base: tuple[QuantLinear, ...] = ()  # a tuple: not registered as a submodule
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features  # peft's lookup knows only its own layer types

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x)
        result = self.base_layer(x)
        if self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_A, lora_B = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(x, lora_A.weight.dtype)
            out = lora_B(lora_A(self.lora_dropout[name](h))) * self.scaling[name]
            result = result + out.to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """``scaling * B @ A``, fp32 ``[out_features, in_features]``."""
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return (b.detach().float() @ a.detach().float()) * self.scaling[adapter]

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Re-quantize ``dequant(W) + sum of the adapters' deltas`` (round to nearest, the base layer's scheme)."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        base = self.get_base_layer()
        w = base.dequantize(torch.float32)
        for name in adapter_names:
            if name in self.lora_A:
                w = w + self.get_delta_weight(name).to(w.device)
        if safe_merge and not bool(torch.isfinite(w).all()):
            raise ValueError(f"merging adapters {adapter_names} gives NaN/inf weights; not merged")
        lin = nn.Linear(base.in_features, base.out_features, bias=False, device="meta")
        lin.weight = nn.Parameter(w, requires_grad=False)
        if base.bias is not None:
            lin.bias = nn.Parameter(base.bias.clone(), requires_grad=False)
        merged = QuantLinear.from_linear(lin, base.scheme)
        if not self._premerge_base:
            self._premerge_base = (base,)
        self.base_layer = merged
        self.merged_adapters.extend(adapter_names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base layer as it was before the first merge (its codes are kept, so this is exact)."""
        if not self.merged:
            return
        self.base_layer = self._premerge_base[0]
        self._premerge_base = ()
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def register_lora(config: peft.LoraConfig) -> peft.LoraConfig:
    """Make ``config`` put :class:`QuantLinearLora` on QuantLinear targets (peft's custom-module API). Returns it."""
    if not isinstance(config, peft.LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    config._register_custom_module({QuantLinear: QuantLinearLora})
    return config


def linear_target_names(model: nn.Module) -> list[str]:
    """Leaf names (``q_proj``, ``down_proj``...) of the model's QuantLinear and nn.Linear layers, output embedding
    excluded: what peft's ``target_modules="all-linear"`` means, with QuantLinear counted as a Linear."""
    skip = output_embedding_names(model)
    return sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                   if isinstance(m, (nn.Linear, QuantLinear)) and n not in skip})


def get_peft_model(model: nn.Module, config: peft.LoraConfig, **kwargs):
    """``peft.get_peft_model`` with LoRA layers on QuantLinear targets. ``target_modules="all-linear"`` takes the
    QuantLinear layers too (peft alone would pick only ``nn.Linear``)."""
    register_lora(config)
    if config.target_modules == "all-linear":
        config.target_modules = set(linear_target_names(model))
    return peft.get_peft_model(model, config, **kwargs)
