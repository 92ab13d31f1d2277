"""AWQ "gemm" checkpoints (AutoAWQ ``WQLinear_GEMM``) <-> QuantLinear.

Layout per layer (github.com/casper-hansen/AutoAWQ/blob/main/awq/modules/linear/gemm.py, ``from_linear``;
unpacked the same way by vLLM's awq_triton.py and transformers' AWQ integration):

* ``qweight`` int32 ``[K, N / 8]``: 4-bit codes packed along N; nibble ``i`` (bits ``4i..4i+3``) of word ``c`` holds
  output column ``8c + ORDER[i]`` with ``ORDER = [0, 2, 4, 6, 1, 3, 5, 7]`` (the interleave the GEMM kernel's
  dequantization wants).
* ``qzeros`` int32 ``[K / group_size, N / 8]``: unsigned 4-bit zero points, same packing; ``scales`` float16
  ``[K / group_size, N]``; ``bias`` optional.
* ``W[n, k] = scales[k // g, n] * (q[k, n] - z[k // g, n])`` (no "+1" as in GPTQ v1).

Only ``version: "gemm"`` (the common one, also what "gemv_fast"-free exports use) and 4 bits are supported.

Export (:func:`pack_layer`, :func:`export_layer`, :func:`save_awq`): the inverse, for 2..4-bit layers without
act-order whose K is a multiple of the group size (AutoAWQ has no ragged groups); symmetric layers are written with
the zero point 8 (AWQ checkpoints always carry zeros). A negative scale (the full-range symmetric grid,
``QuantConfig(full_range=True)``) is written as its magnitude with the group's codes and zero point mirrored
(``u -> 15 - u``, ``z -> 15 - z``), which gives the same weights bit for bit
(:func:`qkernels.formats.gptq.mirror_negative_groups`).
"""

from __future__ import annotations

import torch

from ..nn.linear import QuantLinear
from ..nn.schemes import Int4WeightOnly
from ._common import CheckpointError, FLOATS, check_shape, need, pack_bits, prefixes, to_quant_linear, unpack_bits
from .gptq import mirror_negative_groups
from .model_dir import write_model_dir

ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, N/8]`` in AWQ's interleaved nibble order -> unsigned int32 ``[R, N]`` in column order."""
    R, W = packed.shape
    nibbles = unpack_bits(packed.reshape(R * W, 1), 4, 8).reshape(R, W, 8)  # nibble i of each word
    inv = torch.tensor([ORDER.index(c) for c in range(8)])  # column c sits in nibble inv[c]
    return nibbles[:, :, inv].reshape(R, W * 8)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`unpack_awq`: unsigned 4-bit values ``[R, N]`` (column order) -> int32 ``[R, N/8]``."""
    R, N = values.shape
    return pack_bits(values.reshape(R, N // 8, 8)[:, :, list(ORDER)].reshape(R, N), 4)


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


# ---- export ------------------------------------------------------------------------------------------------------
def pack_layer(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, group_size: int,
               bias: torch.Tensor | None = None, name: str = "layer") -> dict[str, torch.Tensor]:
    """One layer in the AutoAWQ GEMM layout (module docstring): ``qweight`` int32 ``[K, N/8]``, ``qzeros`` int32
    ``[G, N/8]``, ``scales`` fp16 ``[G, N]`` (and ``bias`` fp16).

    Args:
        q: integer ``[N, K]`` signed codes in [-8, 7], input order; scale: float ``[N, G]``, ``G = K / group_size``;
        zero_point: integer ``[N, G]`` in [-8, 7] or None (symmetric: written as the unsigned zero 8).
    """
    N, K = q.shape
    if K % group_size:
        raise ValueError(f"{name}: AWQ needs in_features divisible by group_size (no ragged groups in AutoAWQ), got "
                         f"in_features={K}, group_size={group_size}")
    if N % 8:
        raise ValueError(f"{name}: AWQ packs 8 output features per int32, got out_features={N}")
    G = K // group_size
    if tuple(scale.shape) != (N, G):
        raise ValueError(f"{name}: scale must have shape {(N, G)}, got {tuple(scale.shape)}")
    u = q.to(torch.int64) + 8
    z = torch.full((N, G), 8, dtype=torch.int64) if zero_point is None else zero_point.to(torch.int64) + 8
    for what, t in (("codes", u), ("zero points", z)):
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > 15):
            raise ValueError(f"{name}: {what} must lie in [-8, 7] for a 4-bit AWQ export, got "
                             f"[{int(t.min()) - 8}, {int(t.max()) - 8}]")
    u, z, scale = mirror_negative_groups(u, z, scale, 4, group_size)
    scales = scale.t().contiguous().half()
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"{name}: scales overflow float16 (|scale| > 65504)")
    out = {"qweight": pack_awq(u.t().contiguous().cpu()), "qzeros": pack_awq(z.t().contiguous().cpu()),
           "scales": scales.cpu()}
    if bias is not None:
        out["bias"] = bias.detach().half().cpu()
    return out


def export_layer(layer, name: str = "layer") -> dict[str, torch.Tensor]:
    """The AWQ tensors of a :class:`qkernels.nn.QuantLinear` with an ``Int4WeightOnly`` scheme (no act-order)."""
    if not isinstance(layer.scheme, Int4WeightOnly):
        raise ValueError(f"{name}: only Int4WeightOnly layers have an AWQ layout, got {layer.scheme!r}")
    if layer.input_perm is not None:
        raise ValueError(f"{name}: AWQ has no act-order (input_perm) layout")
    return pack_layer(layer.codes(), layer.scale, layer.zero_point, layer.group_size, layer.bias, name)


def save_awq(model, save_dir: str) -> str:
    """Write ``model``'s :class:`QuantLinear` layers as an AutoAWQ GEMM model directory (``config.json`` with
    ``quantization_config = {"quant_method": "awq", "bits": 4, "group_size", "zero_point": true, "version": "gemm"}``).
    Every quantized layer must be ``Int4WeightOnly`` with the same group size. Returns ``save_dir``."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not layers:
        raise ValueError("save_awq: the model has no QuantLinear layers")
    sizes = {getattr(m.scheme, "group_size", None) for m in layers.values()}
    if len(sizes) != 1:
        raise ValueError(f"save_awq: all layers must share one group_size, got {sorted(map(str, sizes))}")
    qcfg = {"quant_method": "awq", "bits": 4, "group_size": sizes.pop(), "zero_point": True, "version": "gemm"}
    return write_model_dir(model, save_dir, qcfg, lambda n, m: export_layer(m, n))
