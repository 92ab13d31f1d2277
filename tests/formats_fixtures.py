"""Independent writers of GPTQ / AWQ checkpoint tensors, transcribed from the quantizers' own packing code, and
helpers to write small transformers model directories in those formats. Used by tests/test_formats_*.py.

The packers below deliberately follow the published loops (not qkernels' unpacker) so that a layout mistake on
either side shows up as a mismatch.
"""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import torch
from torch import nn


# ---- GPTQ: AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda_old.py, QuantLinear.pack (v0.7.1) ---------------
def autogptq_pack_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """uint32 [K, N] codes -> [K // 32 * bits, N]: AutoGPTQ's loop over qweight rows, verbatim in structure."""
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = 0
    row = 0
    while row < qweight.shape[0]:
        if bits in [2, 4, 8]:
            for j in range(i, i + (32 // bits)):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        elif bits == 3:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
        else:
            raise NotImplementedError("Only 2,3,4,8 bits are supported.")
    return qweight.astype(np.int32)


def autogptq_pack_zeros(zeros: np.ndarray, bits: int) -> np.ndarray:
    """uint32 [G, N] -> [G, N // 32 * bits]: the same loop over qzeros columns."""
    return autogptq_pack_rows(np.ascontiguousarray(zeros.T), bits).T.copy()


def gptq_layer(K, N, bits, group_size, sym, act_order, v2, seed=0, bias=False):
    """Random GPTQ layer tensors and the float weight [N, K] they encode (fp32, exact):
    W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])."""
    rng = np.random.default_rng(seed)
    gs = K if group_size == -1 else group_size
    G = K // gs
    q = rng.integers(0, 2**bits, size=(K, N), dtype=np.uint32)
    if sym:
        zero = np.full((G, N), 2 ** (bits - 1), dtype=np.int64)
    elif v2:
        zero = rng.integers(0, 2**bits, size=(G, N))
    else:
        zero = rng.integers(1, 2**bits + 1, size=(G, N))  # v1 stores zero - 1, so zero = 2^b is representable
    scales = torch.from_numpy(rng.uniform(0.001, 0.02, size=(G, N))).half()
    if act_order:  # GPTQ desc_act: quantize in the order `perm`, so input feature perm[i] is in group i // gs
        perm = rng.permutation(K)
        g_idx = np.empty(K, dtype=np.int32)
        g_idx[perm] = np.arange(K) // gs
    else:
        g_idx = (np.arange(K) // gs).astype(np.int32)
    stored_zero = zero if v2 else zero - 1
    tensors = {
        "qweight": torch.from_numpy(autogptq_pack_rows(q, bits)),
        "qzeros": torch.from_numpy(autogptq_pack_zeros(stored_zero.astype(np.uint32), bits)),
        "scales": scales,
        "g_idx": torch.from_numpy(g_idx),
    }
    if bias:
        tensors["bias"] = torch.randn(N, generator=torch.Generator().manual_seed(seed)).half()
    gi = torch.from_numpy(g_idx).long()
    diff = torch.from_numpy(q.astype(np.int64)).T - torch.from_numpy(zero)[gi].T  # [N, K]
    w = scales.float()[gi].T * diff.float()
    return tensors, w


# ---- AWQ: AutoAWQ awq/modules/linear/gemm.py, WQLinear_GEMM.from_linear (v0.2.9) ------------------------------
def autoawq_pack(intweight: torch.Tensor, w_bit: int = 4) -> torch.Tensor:
    """int32 [K, N] -> [K, N // 32 * w_bit]: AutoAWQ's loop (packed along N, order_map interleave)."""
    pack_num = 32 // w_bit
    qweight = torch.zeros((intweight.shape[0], intweight.shape[1] // 32 * w_bit), dtype=torch.int32)
    for col in range(intweight.shape[1] // pack_num):
        if w_bit == 4:
            order_map = [0, 2, 4, 6, 1, 3, 5, 7]
        else:
            raise NotImplementedError("Only 4-bit are supported for now.")
        for i in range(pack_num):
            qweight_col = intweight[:, col * pack_num + order_map[i]]
            qweight[:, col] |= qweight_col << (i * w_bit)
    return qweight


def awq_layer(K, N, group_size, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    gs = K if group_size == -1 else group_size
    G = K // gs
    q = torch.randint(0, 16, (K, N), generator=g, dtype=torch.int32)
    zeros = torch.randint(0, 16, (G, N), generator=g, dtype=torch.int32)
    scales = (torch.rand(G, N, generator=g) * 0.02 + 0.001).half()
    tensors = {"qweight": autoawq_pack(q), "qzeros": autoawq_pack(zeros), "scales": scales}
    if bias:
        tensors["bias"] = torch.randn(N, generator=g).half()
    gi = torch.arange(K) // gs
    w = scales.float()[gi].T * (q.long().T - zeros.long()[gi].T).float()
    return tensors, w


# ---- model directories ----------------------------------------------------------------------------------------
def tiny_llama(seed=0, tie=False, hidden=64, intermediate=128):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=hidden, intermediate_size=intermediate,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(0))  # token ids for tiny_llama


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def quant_names(model):
    from qkernels.nn import QuantLinear

    return sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))


def write_model_dir(path, model, qcfg, layer_fn, skip=("lm_head",)):
    """Write ``model`` as a transformers directory where each Linear (except ``skip``) is replaced by the tensors
    ``layer_fn(name, linear) -> (tensors, float weight)``. Returns the float reference model (same architecture, the
    Linears holding the exact float weights the checkpoint encodes)."""
    from safetensors.torch import save_file

    ref = copy.deepcopy(model)
    sd = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name not in skip:
            tensors, w = layer_fn(name, mod)
            sd.update({f"{name}.{k}": v.contiguous() for k, v in tensors.items()})
            with torch.no_grad():
                ref.get_submodule(name).weight.copy_(w)
                if "bias" in tensors and ref.get_submodule(name).bias is not None:
                    ref.get_submodule(name).bias.copy_(tensors["bias"].float())
    quantized = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in skip}
    for k, v in model.state_dict().items():
        owner = k.rpartition(".")[0]
        if owner not in quantized and k not in sd:
            sd[k] = v.detach().clone().contiguous()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    os.makedirs(path, exist_ok=True)
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["quantization_config"] = qcfg
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    return ref


def random_codes(N, K, g, bits, sym, act_order, seed):
    gen = torch.Generator().manual_seed(seed)
    G = math.ceil(K / g)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    q = torch.randint(lo, hi, (N, K), generator=gen, dtype=torch.int8)
    scale = (torch.rand(N, G, generator=gen) * 0.02 + 0.001).half().float()  # fp16-exact: lossless export
    zp = None if sym else torch.randint(lo + 1, hi, (N, G), generator=gen, dtype=torch.int32)  # v1: zero >= 1
    perm = torch.randperm(K, generator=gen) if act_order else None
    return q, scale, zp, perm
