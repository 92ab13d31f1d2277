"""torchao-quantized Linears -> :class:`qkernels.nn.QuantLinear` (same codes, same scales, our kernels).

torchao (0.14+, "version 2" tensor subclasses) keeps a quantized Linear as an ``nn.Linear`` whose ``weight`` is a
tensor subclass. The CPU weight-only ones map onto QuantLinear without re-rounding anything:

=====================================================  ======================================  ====================
torchao config                                         weight tensor                           QuantLinear scheme
=====================================================  ======================================  ====================
``Int8WeightOnlyConfig()`` (per row, or                ``Int8Tensor``: ``qdata`` int8 [N, K],  ``Int8WeightOnly``
``granularity=PerGroup(g)``)                           ``scale`` [N, K/g], W = qdata * scale   (per channel or g)
``IntxWeightOnlyConfig(weight_dtype=torch.intB,        ``IntxUnpackedToInt8Tensor``: ``qdata``  B <= 4:
granularity=PerGroup(g) / PerAxis(0), mapping_type)``  int8 [N, K], ``scale``, ``zero_point``  ``Int4WeightOnly``,
(torchao's CPU int4 weight-only path)                  int8 [N, K/g], W = (q - zp) * scale     else ``Int8WeightOnly``
=====================================================  ======================================  ====================

torchao 0.18's ``Int4WeightOnlyConfig`` has no CPU layout here (its "plain" format needs the mslk kernels,
"plain_int32" / "tile_packed_to_4d" need CUDA), so ``IntxWeightOnlyConfig(torch.int4, ...)`` is its CPU int4
weight-only config. Activation-quantizing configs (``act_quant_kwargs`` / ``activation_quantization`` set) are
refused: the converted layer would silently drop the activation rounding.

The dequantized weights are bit-identical (the scale is stored as fp32 here; bf16 -> fp32 is exact and the products
``(q - zp) * scale`` are exact in fp32), so outputs agree up to the GEMMs' float summation order.
"""

from __future__ import annotations

import torch
from torch import nn

from ..nn.linear import QuantLinear
from ..nn.quantize import set_submodule
from ..nn.schemes import Int4WeightOnly, Int8WeightOnly


def _group_size(block_size, in_features: int) -> int:
    block = [int(b) for b in block_size]
    if len(block) != 2 or block[0] != 1 or in_features % block[1]:
        raise ValueError(f"torchao weight block_size must be [1, g] with g dividing in_features={in_features}, got "
                         f"{block}")
    return -1 if block[1] == in_features else block[1]


def from_torchao_linear(linear: nn.Linear) -> QuantLinear:
    """The QuantLinear holding the codes and scales of a torchao weight-only Linear (see the module docstring)."""
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be a torch.nn.Linear quantized by torchao, got {type(linear).__name__}")
    w = linear.weight
    kind = type(w).__name__
    N, K = linear.out_features, linear.in_features
    bias = None if linear.bias is None else linear.bias.detach()
    if not type(w).__module__.startswith("torchao"):
        raise TypeError(f"linear.weight must be a torchao quantized tensor (run torchao.quantization.quantize_ "
                        f"first), got a plain {kind}")
    if kind == "Int8Tensor":
        if getattr(w, "act_quant_kwargs", None) is not None:
            raise NotImplementedError("torchao Int8Tensor with activation quantization (Int8DynamicActivation...) is "
                                      "not converted: only weight-only torchao configs are")
        g = _group_size(w.block_size, K)
        q, scale = w.qdata, w.scale.float()
        scheme = Int8WeightOnly() if g == -1 else Int8WeightOnly(group_size=g, symmetric=True)
        return QuantLinear.from_codes(q, scale.reshape(N, -1), None, scheme, bias)
    if kind == "IntxUnpackedToInt8Tensor":
        if getattr(w, "activation_quantization", None) is not None:
            raise NotImplementedError(f"torchao IntxUnpackedToInt8Tensor with activation_quantization="
                                      f"{w.activation_quantization!r} is not converted: only weight-only configs are")
        bits = {getattr(torch, f"int{b}"): b for b in range(1, 9) if hasattr(torch, f"int{b}")}.get(w.target_dtype)
        if bits is None or bits < 2:
            raise NotImplementedError(f"torchao target_dtype {w.target_dtype} has no QuantLinear scheme (int2..int8)")
        g = _group_size(w.block_size, K)
        zp = w.zero_point.to(torch.int32).reshape(N, -1)
        symmetric = not bool(zp.any())
        if bits <= 4:
            scheme = Int4WeightOnly(group_size=g, symmetric=symmetric, bits=bits)
        else:  # 5..8-bit codes: int8 storage, dequantize + F.linear (or the fused kernel for per-channel symmetric)
            scheme = Int8WeightOnly(group_size=g, symmetric=symmetric)
        return QuantLinear.from_codes(w.qdata, w.scale.float().reshape(N, -1), None if symmetric else zp, scheme,
                                      bias)
    raise NotImplementedError(f"torchao weight type {kind} is not converted (supported: Int8Tensor from "
                              f"Int8WeightOnlyConfig, IntxUnpackedToInt8Tensor from IntxWeightOnlyConfig)")


def is_torchao_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an nn.Linear whose weight is a torchao tensor subclass."""
    return isinstance(module, nn.Linear) and type(module.weight).__module__.startswith("torchao")


@torch.no_grad()
def convert_torchao_model(model: nn.Module) -> nn.Module:
    """Replace every torchao-quantized ``nn.Linear`` of ``model`` by its :func:`from_torchao_linear`, in place (all
    layers are converted before any is swapped, so an error leaves the model untouched). Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    swaps = [(name, from_torchao_linear(m)) for name, m in model.named_modules() if is_torchao_linear(m)]
    if isinstance(model, nn.Linear) and swaps:
        raise TypeError("convert_torchao_model swaps submodules in place; use from_torchao_linear(linear) for a bare "
                        "nn.Linear")
    for name, q in swaps:
        set_submodule(model, name, q)
    return model
