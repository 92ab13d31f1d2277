"""AWQ "gemm" checkpoints (AutoAWQ ``WQLinear_GEMM``) -> QuantLinear.

Layout per layer (github.com/casper-hansen/AutoAWQ/blob/main/awq/modules/linear/gemm.py, ``from_linear``;
unpacked the same way by vLLM's awq_triton.py and transformers' AWQ integration):

* ``qweight`` int32 ``[K, N / 8]``: 4-bit codes packed along N; nibble ``i`` (bits ``4i..4i+3``) of word ``c`` holds
  output column ``8c + ORDER[i]`` with ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`` (the interleave the GEMM kernel's
  dequantization wants).
* ``qzeros`` int32 ``[K / group_size, N / 8]``: unsigned 4-bit zero points, same packing; ``scales`` float16
  ``[K / group_size, N]``; ``bias`` optional.
* ``W[n, k] = scales[k // g, n] * (q[k, n] - z[k // g, n])`` (no "+1" as in GPTQ v1).

Only ``version: "gemm"`` (the common one, also what "gemv_fast"-free exports use) and 4 bits are supported.
"""

from __future__ import annotations

import torch

from ._common import CheckpointError, FLOATS, check_shape, need, prefixes, to_quant_linear, unpack_bits

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, N/8]`` in AWQ's interleaved nibble order -> unsigned int32 ``[R, N]`` in column order."""
    R, W = packed.shape
    nibbles = unpack_bits(packed.reshape(R * W, 1), 4, 8).reshape(R, W, 8)  # nibble i of each word
    inv = torch.tensor([ORDER.index(c) for c in range(8)])  # column c sits in nibble inv[c]
    return nibbles[:, :, inv].reshape(R, W * 8)


def parse_config(qcfg: dict) -> dict:
    bits = qcfg.get("bits", qcfg.get("w_bit"))
    if bits != 4:
        raise CheckpointError(f"quantization_config.bits must be 4 for AWQ, got {bits!r}")
    version = str(qcfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise NotImplementedError(f"AWQ version {version!r} is not supported (only 'gemm')")
    gs = qcfg.get("group_size", qcfg.get("q_group_size", 128))
    if isinstance(gs, bool) or not isinstance(gs, int) or not (gs > 0 or gs == -1):
        raise CheckpointError(f"quantization_config.group_size must be a positive int or -1, got {gs!r}")
    if qcfg.get("zero_point", True) is not True:
        raise NotImplementedError("AWQ checkpoints without zero points (zero_point: false) are not supported")
    return {"bits": 4, "group_size": gs}


def convert_layer(name: str, tensors: dict, cfg: dict):
    qweight = need(tensors, f"{name}.qweight", (torch.int32,), 2)
    qzeros = need(tensors, f"{name}.qzeros", (torch.int32,), 2)
    scales = need(tensors, f"{name}.scales", FLOATS, 2)
    K, N = qweight.shape[0], qweight.shape[1] * 8
    gs = cfg["group_size"]
    G = 1 if gs == -1 else K // gs
    if gs != -1 and K % gs:
        raise CheckpointError(f"{name}.qweight: in_features={K} is not divisible by group_size={gs}")
    check_shape(f"{name}.scales", scales, (G, N))
    check_shape(f"{name}.qzeros", qzeros, (G, N // 8))
    q = unpack_awq(qweight).t()  # [N, K]
    z = unpack_awq(qzeros).t()  # [N, G]
    return to_quant_linear(name, q - 8, scales.t().contiguous(), z - 8, 4, None, tensors.get(f"{name}.bias"))


def convert(tensors: dict, qcfg: dict):
    cfg = parse_config(qcfg)
    layers, used = {}, set()
    for name in prefixes(tensors, "qweight"):
        layers[name] = convert_layer(name, tensors, cfg)
        used |= {f"{name}.{s}" for s in ("qweight", "qzeros", "scales", "bias")}
    return layers, {k: v for k, v in tensors.items() if k not in used}
