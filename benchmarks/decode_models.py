"""The models bench_decode compares, built by name (one per benchmark row), and the GGUF files it feeds llama.cpp.

Every torch model starts from the same float weights (SmolLM2-135M-Instruct as :func:`qkernels.eval.models.load_model`
gives it: the shipped Q4_1 file dequantized). Rows that hold *the same weights* as a llama.cpp row:

* ``gguf-q4_1``: the shipped Q4_1 file through :func:`qkernels.load_gguf` (GGUFLinear), as ``llama-q4_1`` runs it.
* ``gguf-q4_k_m``: the Q4_K_M file qkernels exports, as ``llama-q4_k_m`` runs it.
* ``int4-q4_0``: the linears of the Q4_0 file qkernels exports, as int4 ``QuantLinear`` layers (symmetric, groups
  of 32): a Q4_0 block is ``d * (q - 8)`` with an fp16 ``d``, exactly an int4 code ``q - 8`` with the scale ``d``;
  the tied output head stays the file's Q6_K ``GGUFLinear``. Same weights as ``llama-q4_0``.
"""

from __future__ import annotations

import os

import torch

# row name -> what it is (printed with --list)
TORCH_ROWS = {
    "hf-fp32": "transformers model, fp32",
    "hf-bf16": "transformers model, bf16",
    "int8-bf16": "qkernels Int8WeightOnly, bf16 activations",
    "int4-fp32": "qkernels Int4WeightOnly(group_size=128), fp32 activations",
    "int4-bf16": "qkernels Int4WeightOnly(group_size=128), bf16 activations",
    "int4-bf16-h8": "int4-bf16 plus an Int8WeightOnly output head (quantize_(..., include_lm_head=...))",
    "int4-bf16-fused-h8": "int4-bf16 plus an Int8WeightOnly output head and fuse_projections (q/k/v, gate/up)",
    "w4a8-bf16-fused-h8": "int4-bf16-fused-h8 with W4A8 linears: Int8DynamicInt4Weight(group_size=128) (x rounded "
                          "to int8 per group in the op), Int8WeightOnly head",
    "w4a8-bf16-fused-h4": "w4a8-bf16-fused-h8 with a W4A8 head too (Int8DynamicInt4Weight(128) on the tied lm_head)",
    "w4a8-bf16-fused-h4e": "w4a8-bf16-fused-h4 whose input embedding reads the int4 head's codes "
                           "(quantize_(..., embedding_from_head=True)): no float table",
    "w4a8-bf16-fused-h8e": "w4a8-bf16-fused-h8 whose input embedding reads the int8 head's codes: no float table",
    "int4-q4_0": "qkernels int4 g32 symmetric holding the Q4_0 file's weights (head: its Q6_K GGUFLinear), fp32",
    "fp8-bf16": "qkernels Fp8WeightOnly, bf16 activations",
    "fp4-bf16": "qkernels Fp4('nvfp4', weight_only=True), bf16 activations",
    "gguf-q4_k_m": "qkernels GGUFLinear, Q4_K_M file exported by qkernels, fp32 activations",
    "gguf-q4_1": "qkernels GGUFLinear, the shipped Q4_1 file, fp32 activations",
    "torchao-int4": "torchao Int4WeightOnlyConfig(64), bf16 (torchao 0.18: no CPU int4 format, fails)",
    "torchao-int8": "torchao Int8WeightOnlyConfig, bf16",
    "torchao-intx4": "torchao IntxWeightOnlyConfig(torch.int4, PerGroup(64)), bf16 (torchao 0.18's CPU int4; "
                     "groups of 64: its groups must divide K = 576)",
}
# torchao's PerGroup(g) asserts K % g == 0, and SmolLM2's K = 576 (hidden) is not a multiple of 128 (qkernels' int4 rows
# keep a ragged fifth group there); 64 is the largest power of two dividing both K = 576 and K = 1536 (down_proj)
TORCHAO_INT4_GROUP = 64
LLAMA_ROWS = {
    "llama-q4_0": "Q4_0",
    "llama-q8_0": "Q8_0",
    "llama-q4_k_m": "Q4_K_M",
    "llama-q4_1": "shipped",
}
# rows holding the same weights (greedy outputs compared)
SAME_WEIGHTS = {"gguf-q4_1": "llama-q4_1", "gguf-q4_k_m": "llama-q4_k_m", "int4-q4_0": "llama-q4_0"}


def gguf_path(workdir: str, mix: str) -> str:
    from qkernels.eval.models import default_model_path

    if mix == "shipped":
        return default_model_path()
    return os.path.join(workdir, f"SmolLM2-135M-Instruct.{mix}.gguf")


def export_files(workdir: str, mixes) -> None:
    """Write the GGUF files (``mixes``: "Q4_0", "Q8_0", "Q4_K_M") from the float model unless already there."""
    from qkernels.eval.models import load_model
    from qkernels.formats import gguf as gguf_format

    todo = [m for m in mixes if m != "shipped" and not os.path.exists(gguf_path(workdir, m))]
    if not todo:
        return
    os.makedirs(workdir, exist_ok=True)
    model, tok = load_model(dtype=torch.float32)
    for mix in todo:
        if mix not in gguf_format.MIXES:
            raise RuntimeError(f"qkernels.export_gguf has no {mix} mix (it offers {sorted(gguf_format.MIXES)})")
        tmp = gguf_path(workdir, mix) + ".tmp"
        gguf_format.export_gguf(model, tmp, mix, tokenizer=tok)
        os.replace(tmp, gguf_path(workdir, mix))


def _q4_0_to_quantlinear(layer):
    """A Q4_0 GGUFLinear as an int4 QuantLinear with exactly its weights (see the module docstring)."""
    from qkernels.nn import Int4WeightOnly, QuantLinear

    N, K = layer.out_features, layer.in_features
    blocks = layer.data.view(N, K // 32, 18)
    d = blocks[..., :2].contiguous().view(torch.float16).float()  # [N, K/32, 1]
    w = layer.dequantize_weight(torch.float32).view(N, K // 32, 32)
    q = torch.where(d != 0, w / d, torch.zeros_like(w)).round()
    if not torch.equal(q * d, w):
        raise AssertionError("Q4_0 blocks did not decode to d * integer codes")
    ql = QuantLinear(K, N, Int4WeightOnly(group_size=32, symmetric=True), bias=False)
    ql.set_quantized(q.view(N, K).to(torch.int8), d.view(N, K // 32), None)
    return ql


def _cast_non_quantized(model, dtype):
    """Cast what is not a quantized layer (embeddings, norms, a float head) to ``dtype``: ``model.to(dtype)`` would
    also cast QuantLinear's fp32 scales."""
    from qkernels.nn import GGUFLinear, QuantEmbedding, QuantLinear

    for mod in model.modules():
        if isinstance(mod, QuantEmbedding):
            mod.dtype = dtype  # rows looked up in the head's codes, dequantized to dtype
        if isinstance(mod, (QuantLinear, GGUFLinear, QuantEmbedding)):
            continue
        for p in mod.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(dtype)
        for name, b in mod.named_buffers(recurse=False):
            if b is not None and b.is_floating_point() and name != "inv_freq":
                setattr(mod, name, b.to(dtype))
    return model


def build_torch_model(row: str, workdir: str):
    """The model of a torch row, in eval mode."""
    from qkernels.eval.models import load_model
    from qkernels.formats.gguf import load_gguf
    from qkernels.nn import (Fp4, Fp8WeightOnly, GGUFLinear, Int4WeightOnly, Int8DynamicInt4Weight, Int8WeightOnly,
                             quantize_)

    if row not in TORCH_ROWS:
        raise ValueError(f"row must be one of {sorted(TORCH_ROWS)}, got {row!r}")
    if row == "gguf-q4_k_m":
        return load_gguf(gguf_path(workdir, "Q4_K_M"))
    if row == "gguf-q4_1":
        return load_gguf(gguf_path(workdir, "shipped"))
    if row == "int4-q4_0":
        model = load_gguf(gguf_path(workdir, "Q4_0"))
        for name, mod in list(model.named_modules()):
            if isinstance(mod, GGUFLinear) and mod.type_name == "Q4_0":
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, _q4_0_to_quantlinear(mod))
        return model
    dtype = torch.float32 if row.endswith("fp32") else torch.bfloat16
    model, _ = load_model(dtype=torch.float32)
    if row.startswith("hf-"):
        return model.to(dtype)
    if row.startswith("torchao-"):
        return torchao_quantize(model.to(torch.bfloat16), row)
    if row in ("int4-bf16-h8", "int4-bf16-fused-h8", "w4a8-bf16-fused-h8", "w4a8-bf16-fused-h4",
               "w4a8-bf16-fused-h4e", "w4a8-bf16-fused-h8e"):
        body = Int8DynamicInt4Weight(group_size=128) if row.startswith("w4a8") else Int4WeightOnly(group_size=128)
        head = Int8DynamicInt4Weight(group_size=128) if "-h4" in row else Int8WeightOnly()
        quantize_(model, body, include_lm_head=head, embedding_from_head=row.endswith("e"))
        if "fused" in row:
            from qkernels.nn import fuse_projections

            fuse_projections(model)
        return _cast_non_quantized(model, dtype)
    scheme = {"int8": Int8WeightOnly(), "int4": Int4WeightOnly(group_size=128), "fp8": Fp8WeightOnly(),
              "fp4": Fp4("nvfp4", weight_only=True)}[row.split("-")[0]]
    quantize_(model, scheme)  # from the fp32 weights: the bf16 rows differ from the fp32 ones only in activations
    return _cast_non_quantized(model, dtype)


def torchao_quantize(model, row: str, group_size: int = TORCHAO_INT4_GROUP):
    """``model`` (bf16) with its linears (output head included) quantized in place by torchao's config for ``row``
    (a ``torchao-*`` row); ``group_size``: the int4 rows' group along K.

    torchao 0.18's CPU int4 is ``IntxWeightOnlyConfig(torch.int4, PerGroup(g))``: int4 codes kept one per int8
    (``IntxUnpackedToInt8Tensor``), dequantized to bf16 before ``F.linear``. ``Int4WeightOnlyConfig`` has no CPU
    format any more ("plain" / "preshuffled" need the mslk package, "plain_int32" is XPU/NPU only,
    "tile_packed_to_4d" CUDA only; the CPU "opaque" format of earlier versions is gone): its row raises on CPU,
    and bench_decode reports torchao's error.
    """
    from torchao.quantization import (Int4WeightOnlyConfig, Int8WeightOnlyConfig, IntxWeightOnlyConfig, PerGroup,
                                      quantize_ as ao_quantize_)

    configs = {"torchao-int4": lambda: Int4WeightOnlyConfig(group_size=group_size),
               "torchao-int8": Int8WeightOnlyConfig,
               "torchao-intx4": lambda: IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(group_size))}
    if row not in configs:
        raise ValueError(f"row must be one of {sorted(configs)}, got {row!r}")
    ao_quantize_(model, configs[row]())
    return model


def weight_bytes(model) -> int:
    """Bytes of the parameters and buffers (tied tensors once; tensor subclasses by their inner tensors)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        flatten = getattr(type(t), "__tensor_flatten__", None)
        if flatten is not None and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            names, _ = t.__tensor_flatten__()
            for n in names:
                add(getattr(t, n))
            return
        if isinstance(t, torch.nn.Parameter) and type(t.data) is not torch.Tensor:
            return add(t.data)
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for _, t in model.named_parameters(remove_duplicate=True):
        add(t)
    for name, t in model.named_buffers(remove_duplicate=True):
        if not name.endswith("inv_freq"):
            add(t)
    return total
