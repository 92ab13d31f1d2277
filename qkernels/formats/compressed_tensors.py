"""compressed-tensors checkpoints (llm-compressor / vLLM) -> QuantLinear.

``quantization_config = {"quant_method": "compressed-tensors", "format": ..., "config_groups": {name: {"targets":
[...], "weights": {"num_bits", "type", "symmetric", "strategy", "group_size", ...}, "format"?}}, "ignore": [...]}``.

``pack-quantized`` layout per layer (compressed_tensors/compressors/pack_quantized/{base,helpers}.py):

* ``weight_packed`` int32 ``[N, ceil(K * b / 32)]``: the int-b codes plus ``2^(b-1)`` (made unsigned) packed densely
  along K, value j at stream bit ``b * j`` (crossing word boundaries when b does not divide 32).
* ``weight_shape`` int ``[2]`` = (N, K); ``weight_scale`` float ``[N, K / group_size]`` ("group"), ``[N, 1]``
  ("channel") or one element ("tensor").
* ``weight_zero_point`` (asymmetric group/channel only) int32 ``[ceil(N * b / 32), G]``: the signed zero points,
  offset and packed the same way along N (dim 0).
* ``weight_g_idx`` int ``[K]`` (``actorder``): the group of each input feature, as in GPTQ.
* ``W = scale * (q - zero_point)``.

``nvfp4-pack-quantized`` layout per layer (compressed_tensors/compressors/nvfp4/{base,helpers}.py; weights
``num_bits=4, type="float", strategy="tensor_group", group_size=16, symmetric``):

* ``weight_packed`` uint8 ``[N, K/2]``: e2m1 codes (sign bit 3, magnitude index 0..7 for 0, 0.5, ..., 6), element 2i
  in the low nibble: exactly qkernels' fp4 packing.
* ``weight_scale`` float8_e4m3fn ``[N, K/16]``, ``weight_global_scale`` fp32 ``[1]``. The package's global scale
  is the *inverse* of ours: it multiplies the block scales up into the e4m3 range at quantization
  (``448 * 6 / amax``) and dequantizes as ``code * (weight_scale / weight_global_scale)``. qkernels stores
  ``global_scale = 1 / weight_global_scale`` (fp32) and computes ``code * (weight_scale * global_scale)``: the same
  value up to one fp32 rounding of the reciprocal (relative 2^-24), far below the bf16 the package decompresses to.
* ``input_activations`` nvfp4 (llm-compressor "NVFP4", W4A4) -> ``Fp4("nvfp4")``: activations are quantized to
  nvfp4 at run time with a per-call tensor scale; the checkpoint's calibrated ``input_global_scale`` is not used
  (it only changes the activation tensor scale). No ``input_activations`` ("NVFP4A16") ->
  ``Fp4("nvfp4", weight_only=True)``.
"""

from __future__ import annotations

import re

import torch

from ..nn.linear import QuantLinear
from ..nn.schemes import Fp4
from ._common import (
    CheckpointError,
    FLOATS,
    check_finite,
    check_shape,
    group_perm,
    need,
    prefixes,
    to_quant_linear,
    unpack_bits,
)

FORMATS = ("pack-quantized", "nvfp4-pack-quantized")
INTS = (torch.int32, torch.int64, torch.int16, torch.int8)


def _matches(target: str, name: str) -> bool:
    if target == "Linear":
        return True  # every packed layer is a Linear
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return target == name


def parse_config(qcfg: dict) -> list[tuple[list[str], dict, str]]:
    groups = qcfg.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError("quantization_config.config_groups must be a non-empty dict for compressed-tensors")
    top_fmt = qcfg.get("format")
    out = []
    for gname, g in groups.items():
        fmt = g.get("format") or top_fmt
        if fmt not in FORMATS:
            raise NotImplementedError(f"compressed-tensors format must be one of {FORMATS}, got {fmt!r} "
                                      f"(config group {gname!r})")
        w = g.get("weights")
        if not isinstance(w, dict):
            raise CheckpointError(f"config group {gname!r} must have a 'weights' dict, got {w!r}")
        if fmt == "pack-quantized":
            if w.get("type", "int") != "int":
                raise CheckpointError(f"config group {gname!r}: pack-quantized weights must be type 'int', "
                                      f"got {w.get('type')!r}")
            bits = w.get("num_bits")
            if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
                raise CheckpointError(f"config group {gname!r}: weights.num_bits must be in [1, 8], got {bits!r}")
            if w.get("strategy") not in ("group", "channel", "tensor"):
                raise CheckpointError(f"config group {gname!r}: weights.strategy must be group/channel/tensor, "
                                      f"got {w.get('strategy')!r}")
            if g.get("input_activations"):
                raise NotImplementedError(f"config group {gname!r}: activation quantization with pack-quantized "
                                          "weights is not supported")
        if fmt == "nvfp4-pack-quantized":
            want = {"num_bits": 4, "type": "float", "group_size": 16}
            for args, what in ((w, "weights"), (g.get("input_activations"), "input_activations")):
                if args is None and what == "input_activations":
                    continue
                got = {k: args.get(k) for k in want}
                if got != want or args.get("symmetric", True) is not True:
                    raise NotImplementedError(f"config group {gname!r}: nvfp4-pack-quantized {what} must be "
                                              f"{want} symmetric (NVFP4), got {got}, symmetric={args.get('symmetric')}")
        out.append((list(g.get("targets") or []), w, fmt, bool(g.get("input_activations"))))
    return out


def _group_for(name: str, groups):
    for targets, w, fmt, acts in groups:
        if any(_matches(t, name) for t in targets):
            return w, fmt, acts
    raise CheckpointError(f"{name}: no config group targets this layer")


def convert_layer(name: str, tensors: dict, w: dict):
    bits = w["num_bits"]
    packed = need(tensors, f"{name}.weight_packed", (torch.int32,), 2)
    shape = need(tensors, f"{name}.weight_shape", INTS, 1)
    if shape.numel() != 2:
        raise CheckpointError(f"{name}.weight_shape must hold (N, K), got {shape.tolist()}")
    N, K = (int(v) for v in shape.tolist())
    if N <= 0 or K <= 0:
        raise CheckpointError(f"{name}.weight_shape must be positive, got {(N, K)}")
    check_shape(f"{name}.weight_packed", packed, (N, (K * bits + 31) // 32))
    scale = need(tensors, f"{name}.weight_scale", FLOATS, tensors[f"{name}.weight_scale"].dim()
                 if f"{name}.weight_scale" in tensors else 2)
    strategy = w["strategy"]
    if strategy == "tensor":
        if scale.numel() != 1:
            raise CheckpointError(f"{name}.weight_scale must have one element (tensor strategy), "
                                  f"got {tuple(scale.shape)}")
        scale = scale.reshape(1, 1).expand(N, 1)
        G = 1
    elif strategy == "channel":
        check_shape(f"{name}.weight_scale", scale, (N, 1))
        G = 1
    else:
        gs = w.get("group_size")
        if isinstance(gs, bool) or not isinstance(gs, int) or gs <= 0:
            raise CheckpointError(f"{name}: weights.group_size must be a positive int for strategy 'group', got {gs!r}")
        if K % gs:
            raise CheckpointError(f"{name}: in_features={K} is not divisible by group_size={gs}")
        G = K // gs
        check_shape(f"{name}.weight_scale", scale, (N, G))
    offset = 1 << (bits - 1)
    q = unpack_bits(packed, bits, K) - offset  # [N, K] signed
    zp = None
    if not w.get("symmetric", True):
        zkey = f"{name}.weight_zero_point"
        z = need(tensors, zkey, INTS, tensors[zkey].dim() if zkey in tensors else 2)
        if strategy == "tensor":
            if z.numel() != 1:
                raise CheckpointError(f"{zkey} must have one element (tensor strategy), got {tuple(z.shape)}")
            zp = z.reshape(1, 1).to(torch.int32).expand(N, 1)
        else:
            if z.dtype != torch.int32 or z.dim() != 2:
                raise CheckpointError(f"{zkey} must be packed int32 [ceil(N*b/32), G], got {z.dtype} {tuple(z.shape)}")
            check_shape(zkey, z, ((N * bits + 31) // 32, G))
            zp = unpack_bits(z.t().contiguous(), bits, N).t() - offset  # [N, G]
    perm = None
    gkey = f"{name}.weight_g_idx"
    if gkey in tensors:
        perm, _ = group_perm(need(tensors, gkey, INTS, 1), K, G, gkey)
        if perm is not None:
            q = q[:, perm]
    return to_quant_linear(name, q, scale.contiguous(), zp, bits, perm, tensors.get(f"{name}.bias"))


def convert_nvfp4_layer(name: str, tensors: dict, quantized_acts: bool):
    """One ``nvfp4-pack-quantized`` layer -> ``QuantLinear`` with ``Fp4("nvfp4")`` (see the module docstring)."""
    packed = need(tensors, f"{name}.weight_packed", (torch.uint8,), 2)
    N, K = packed.shape[0], packed.shape[1] * 2
    scale = need(tensors, f"{name}.weight_scale", (torch.float8_e4m3fn,), 2)
    check_shape(f"{name}.weight_scale", scale, (N, K // 16))
    gkey = f"{name}.weight_global_scale"
    g = need(tensors, gkey, FLOATS, tensors[gkey].dim() if gkey in tensors else 1)
    if g.numel() != 1:
        raise CheckpointError(f"{gkey} must have one element, got shape {tuple(g.shape)}")
    if f"{name}.weight_shape" in tensors and tensors[f"{name}.weight_shape"].tolist() != [N, K]:
        raise CheckpointError(f"{name}.weight_shape must be [{N}, {K}] (from weight_packed), got "
                              f"{tensors[f'{name}.weight_shape'].tolist()}")
    check_finite(f"{name}.weight_scale", scale)
    check_finite(gkey, g)
    gf = g.float().reshape(())
    if not bool(gf > 0):
        raise CheckpointError(f"{gkey} must be positive, got {float(gf)}")
    scheme = Fp4("nvfp4", weight_only=not quantized_acts)
    why = scheme.check_shape(K, N)
    if why:
        raise CheckpointError(f"{name}: an nvfp4 layer [{N}, {K}] cannot be held as {scheme!r}: {why}")
    # compressed-tensors divides the block scales by its global scale; qkernels multiplies by its own: invert
    return QuantLinear.from_float_codes(packed, scale, scheme, tensors.get(f"{name}.bias"), 1.0 / gf)


def convert(tensors: dict, qcfg: dict):
    groups = parse_config(qcfg)
    layers, used = {}, set()
    for name in prefixes(tensors, "weight_packed"):
        w, fmt, acts = _group_for(name, groups)
        if fmt == "nvfp4-pack-quantized":
            layers[name] = convert_nvfp4_layer(name, tensors, acts)
            used |= {f"{name}.{s}" for s in ("weight_packed", "weight_scale", "weight_global_scale", "weight_shape",
                                             "input_global_scale", "bias")}
            continue
        layers[name] = convert_layer(name, tensors, w)
        used |= {f"{name}.{s}" for s in ("weight_packed", "weight_shape", "weight_scale", "weight_zero_point",
                                         "weight_g_idx", "bias")}
    return layers, {k: v for k, v in tensors.items() if k not in used}
