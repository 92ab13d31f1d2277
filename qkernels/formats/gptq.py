"""GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers+optimum) <-> QuantLinear.

Layout per layer, for ``bits`` in {2, 3, 4, 8} (AutoGPTQ ``QuantLinear.pack``,
github.com/AutoGPTQ/AutoGPTQ/blob/main/auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py):

* ``qweight`` int32 ``[K * bits / 32, N]``: packed along K; unsigned code of input feature j of a 32-value block at
  stream bit ``bits * j`` (3-bit values cross int32 word boundaries: 32 values fill 3 words).
* ``qzeros`` int32 ``[G, N * bits / 32]``: zero points packed the same way along N.
* ``scales`` float16 ``[G, N]``; ``g_idx`` int32 ``[K]``: the group of each input feature (permuted under act-order,
  ``desc_act``); ``bias`` ``[N]`` optional.
* ``W[n, k] = scales[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])`` where ``z`` is the stored zero plus one in the
  original "gptq" (v1) checkpoint format (AutoGPTQ subtracts 1 before packing) and the stored zero itself in
  ``checkpoint_format: "gptq_v2"`` (GPTQModel).

Conversion (once, at load): codes are unpacked, shifted to signed (minus 2^(bits-1), the zero points alike, so
``q - z`` is unchanged) and act-order columns are sorted by group (``input_perm``). 2/3/4-bit
layers become ``Int4WeightOnly`` (2- and 3-bit codes are a subset of int4: exact), 8-bit layers ``Int8WeightOnly``
(per channel when symmetric without groups, else int8 codes with groups). K need not be a multiple of group_size:
``g_idx = k // group_size`` then ends with a ragged group, which QuantLinear stores padded.

Export (:func:`pack_layer`, :func:`export_layer`, :func:`save_gptq`): the inverse, for 2/3/4/8-bit layers, in the v1
("gptq", AutoGPTQ) or "gptq_v2" (GPTQModel) zero-point convention. Negative scales (the full-range symmetric grid,
``QuantConfig(full_range=True)``, as llama.cpp's Q4_0) are written as their magnitude with the group's unsigned codes
and zero point mirrored (``u -> 2^b - 1 - u``, ``z -> 2^b - 1 - z``: ``s (u - z) = |s| (u' - z')`` exactly), the
form every GPTQ reader expects; the mirrored zero of a symmetric group is ``2^(b-1) - 1``, not ``2^(b-1)``, so such
a model is saved with ``sym: false`` and loads back as an asymmetric layer with the same weights.
"""

from __future__ import annotations

import math

import torch

from ..nn.linear import QuantLinear
from ..nn.schemes import Int4WeightOnly, Int8WeightOnly
from ._common import (CheckpointError, FLOATS, check_shape, group_perm, need, pack_bits, prefixes, to_quant_linear,
                      unpack_bits)
from .model_dir import write_model_dir

BITS = (2, 3, 4, 8)


def parse_config(qcfg: dict) -> dict:
    bits = qcfg.get("bits", qcfg.get("w_bit"))
    if bits not in BITS:
        raise CheckpointError(f"quantization_config.bits must be one of {BITS} for GPTQ, got {bits!r}")
    gs = qcfg.get("group_size", 128)
    if isinstance(gs, bool) or not isinstance(gs, int) or not (gs > 0 or gs == -1):
        raise CheckpointError(f"quantization_config.group_size must be a positive int or -1, got {gs!r}")
    fmt = qcfg.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"quantization_config.checkpoint_format must be 'gptq' or 'gptq_v2', got {fmt!r}")
    return {"bits": bits, "group_size": gs, "v2": fmt == "gptq_v2"}


def convert_layer(name: str, tensors: dict, cfg: dict):
    """The QuantLinear for GPTQ layer ``name`` (tensors ``name.qweight``, ``.qzeros``, ``.scales``, ``.g_idx``)."""
    bits = cfg["bits"]
    qweight = need(tensors, f"{name}.qweight", (torch.int32,), 2)
    qzeros = need(tensors, f"{name}.qzeros", (torch.int32,), 2)
    scales = need(tensors, f"{name}.scales", FLOATS, 2)
    G, N = scales.shape
    if (qweight.shape[0] * 32) % bits:
        raise CheckpointError(f"{name}.qweight has {qweight.shape[0]} rows, not a whole number of {bits}-bit values")
    K = qweight.shape[0] * 32 // bits
    check_shape(f"{name}.qweight", qweight, (K * bits // 32, N))
    if (N * bits) % 32:
        raise CheckpointError(f"{name}: out_features={N} does not fill whole int32 words of {bits}-bit zeros")
    gs = cfg["group_size"]
    if gs != -1 and G != (K + gs - 1) // gs:
        raise CheckpointError(f"{name}.scales must have {(K + gs - 1) // gs} groups (K={K}, group_size={gs}), got {G}")
    if gs == -1 and G != 1:
        raise CheckpointError(f"{name}.scales must have 1 group (group_size=-1), got {G}")
    check_shape(f"{name}.qzeros", qzeros, (G, N * bits // 32))
    g_key = f"{name}.g_idx"
    if g_key in tensors:
        g_idx = need(tensors, g_key, (torch.int32, torch.int64), 1)
    else:
        g_idx = torch.arange(K) // (K if gs == -1 else gs)
    perm, _ = group_perm(g_idx, K, G, g_key, None if gs == -1 else gs)

    q = unpack_bits(qweight.t(), bits, K)  # [N, K] unsigned
    z = unpack_bits(qzeros, bits, N).t()  # [N, G] unsigned
    if not cfg["v2"]:
        z = z + 1  # v1 stores zero - 1 (no wrap on read: a stored 2^b - 1 means zero 2^b)
    shift = 1 << (bits - 1)  # signed codes; symmetric zero points (2^(b-1)) become 0
    if perm is not None:
        q = q[:, perm]
    bias = tensors.get(f"{name}.bias")
    return to_quant_linear(name, q - shift, scales.t().contiguous(), z - shift, bits, perm, bias,
                           None if gs == -1 else gs)


def convert(tensors: dict, qcfg: dict):
    """All GPTQ layers of a checkpoint -> ({layer name: QuantLinear}, remaining tensors)."""
    cfg = parse_config(qcfg)
    layers, used = {}, set()
    for name in prefixes(tensors, "qweight"):
        layers[name] = convert_layer(name, tensors, cfg)
        used |= {f"{name}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    rest = {k: v for k, v in tensors.items() if k not in used}
    return layers, rest


# ---- export ------------------------------------------------------------------------------------------------------
def pack_layer(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int, group_size: int,
               perm: torch.Tensor | None = None, bias: torch.Tensor | None = None, v2: bool = False,
               name: str = "layer") -> dict[str, torch.Tensor]:
    """One layer in the GPTQ checkpoint layout (module docstring): ``qweight``, ``qzeros``, ``scales``, ``g_idx``
    (and ``bias``, fp16 like the scales).

    Args:
        q: integer ``[N, K]`` signed codes in ``[-2^(bits-1), 2^(bits-1))``, columns in stored order (input feature
            ``perm[j]`` in column j; group ``j // group_size``, the last group may be ragged).
        scale: float ``[N, G]``, ``G = ceil(K / group_size)``; zero_point: integer ``[N, G]`` in the codes' domain,
            or None (symmetric: the unsigned zero is ``2^(bits-1)``).
        bits: 2, 3, 4 or 8; group_size: columns per group (K for one group per row).
        v2: write GPTQModel's "gptq_v2" zeros (the zero itself) instead of v1's ``zero - 1``.
    K * bits and N * bits must fill whole int32 words (K, N multiples of 32 for 3 bits, of 8 for 4 bits).
    """
    if bits not in BITS:
        raise ValueError(f"{name}: bits must be one of {BITS} for a GPTQ export, got {bits}")
    N, K = q.shape
    G = -(-K // group_size)
    if tuple(scale.shape) != (N, G):
        raise ValueError(f"{name}: scale must have shape {(N, G)} (K={K}, group_size={group_size}), got "
                         f"{tuple(scale.shape)}")
    if (K * bits) % 32 or (N * bits) % 32:
        raise ValueError(f"{name}: in_features={K} and out_features={N} must fill whole int32 words of {bits}-bit "
                         f"values (multiples of {32 // math.gcd(32, bits)})")
    off = 1 << (bits - 1)
    u = q.to(torch.int64) + off
    if q.numel() and (int(u.min()) < 0 or int(u.max()) >= 1 << bits):
        raise ValueError(f"{name}: codes must lie in [{-off}, {off - 1}] for {bits} bits, got "
                         f"[{int(q.min())}, {int(q.max())}]")
    zero = torch.full((N, G), off, dtype=torch.int64) if zero_point is None else zero_point.to(torch.int64) + off
    u, zero, scale = mirror_negative_groups(u, zero, scale, bits, group_size)
    stored = zero if v2 else zero - 1  # v1 (AutoGPTQ) stores zero - 1
    if int(stored.min()) < 0 or int(stored.max()) >= 1 << bits:
        hint = " (v1 cannot store a zero point of 0: write checkpoint_format='gptq_v2')" if not v2 else ""
        raise ValueError(f"{name}: zero points out of the {bits}-bit range of the GPTQ "
                         f"{'v2' if v2 else 'v1'} layout{hint}")
    j = torch.arange(K)
    if perm is None:
        g_idx = j // group_size
    else:  # stored column j holds input feature perm[j]; the checkpoint keeps the original input order
        perm = perm.to(torch.int64).cpu()
        g_idx = torch.empty_like(j)
        g_idx[perm] = j // group_size
        u = u[:, torch.argsort(perm)]
    scales = scale.t().contiguous().half()
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"{name}: scales overflow float16 (|scale| > 65504)")
    out = {"qweight": pack_bits(u.cpu(), bits).t().contiguous(),  # [K * bits / 32, N], packed along K
           "qzeros": pack_bits(stored.t().contiguous().cpu(), bits),  # [G, N * bits / 32], packed along N
           "scales": scales.cpu(), "g_idx": g_idx.to(torch.int32)}
    if bias is not None:
        out["bias"] = bias.detach().half().cpu()
    return out


def mirror_negative_groups(u: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int):
    """``(u, zero, |scale|)`` with the unsigned codes ``u`` ``[N, K]`` (stored column order, group ``j // group_size``)
    and zero points ``zero`` ``[N, G]`` of every group whose scale ``[N, G]`` is negative mirrored in the ``bits``-bit
    range: ``s (u - z) = |s| ((M - u) - (M - z))`` with ``M = 2^bits - 1``, bit for bit (a sign flip is exact)."""
    neg = scale < 0
    if not bool(neg.any()):
        return u, zero, scale
    M = (1 << bits) - 1
    cols = neg.repeat_interleave(group_size, dim=1)[:, :u.shape[1]]
    return torch.where(cols, M - u, u), torch.where(neg, M - zero, zero), scale.abs()


def export_layer(layer, v2: bool = False, name: str = "layer") -> dict[str, torch.Tensor]:
    """The GPTQ tensors of a :class:`qkernels.nn.QuantLinear` with an integer weight-only scheme
    (``Int4WeightOnly``: its ``bits``; ``Int8WeightOnly``: 8 bits)."""
    if not isinstance(layer.scheme, (Int4WeightOnly, Int8WeightOnly)):
        raise ValueError(f"{name}: only integer weight-only layers (Int4WeightOnly, Int8WeightOnly) have a GPTQ "
                         f"layout, got {layer.scheme!r}")
    scale = layer.scale if layer.scale.dim() == 2 else layer.scale.reshape(-1, 1)
    return pack_layer(layer.codes(), scale, layer.zero_point, layer.bits, layer.group_size, layer.input_perm,
                      layer.bias, v2, name)


def save_gptq(model, save_dir: str, checkpoint_format: str = "gptq") -> str:
    """Write ``model``'s :class:`QuantLinear` layers as a GPTQ (transformers / AutoGPTQ / GPTQModel) model directory:
    ``model.safetensors`` + ``config.json`` with ``quantization_config = {"quant_method": "gptq", "bits",
    "group_size", "desc_act", "sym", "checkpoint_format"}`` (and ``quantization_config.json``). Every quantized
    layer must have the same ``bits`` and ``group_size`` (one config per checkpoint). Returns ``save_dir``."""
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("save_gptq: the model has no QuantLinear layers")
    kinds = {(m.bits, getattr(m.scheme, "group_size", -1)) for m in layers.values()}
    if len(kinds) != 1:
        raise ValueError(f"save_gptq: all layers must share bits and group_size, got (bits, group_size) {sorted(kinds)}")
    (bits, gs), = kinds
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": gs,
            "desc_act": any(m.input_perm is not None for m in layers.values()),
            # negative scales are written mirrored, with zero points that are not 2^(b-1) (pack_layer)
            "sym": all(m.zero_point is None and not bool((m.scale < 0).any()) for m in layers.values()),
            "checkpoint_format": checkpoint_format}
    v2 = checkpoint_format == "gptq_v2"
    return write_model_dir(model, save_dir, qcfg, lambda n, m: export_layer(m, v2, n))
