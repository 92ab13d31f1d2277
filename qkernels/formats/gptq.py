"""GPTQ checkpoints (AutoGPTQ / GPTQModel / transformers+optimum) -> QuantLinear.

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
(per channel when symmetric without groups, else int8 codes with groups).
"""

from __future__ import annotations

import torch

from ._common import CheckpointError, FLOATS, check_shape, group_perm, need, prefixes, to_quant_linear, unpack_bits

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
        g_idx = torch.arange(K) // (K // G if K % G == 0 else gs)
    perm, _ = group_perm(g_idx, K, G, g_key)

    q = unpack_bits(qweight.t(), bits, K)  # [N, K] unsigned
    z = unpack_bits(qzeros, bits, N).t()  # [N, G] unsigned
    if not cfg["v2"]:
        z = z + 1  # v1 stores zero - 1 (no wrap on read: a stored 2^b - 1 means zero 2^b)
    shift = 1 << (bits - 1)  # signed codes; symmetric zero points (2^(b-1)) become 0
    if perm is not None:
        q = q[:, perm]
    bias = tensors.get(f"{name}.bias")
    return to_quant_linear(name, q - shift, scales.t().contiguous(), z - shift, bits, perm, bias)


def convert(tensors: dict, qcfg: dict):
    """All GPTQ layers of a checkpoint -> ({layer name: QuantLinear}, remaining tensors)."""
    cfg = parse_config(qcfg)
    layers, used = {}, set()
    for name in prefixes(tensors, "qweight"):
        layers[name] = convert_layer(name, tensors, cfg)
        used |= {f"{name}.{s}" for s in ("qweight", "qzeros", "scales", "g_idx", "bias")}
    rest = {k: v for k, v in tensors.items() if k not in used}
    return layers, rest
