"""GGUF files: llama.cpp quantization mixes, loading a GGUF llama into a transformers model with GGUFLinear layers,
and exporting a llama model to GGUF.

* Mixes follow llama.cpp's per-tensor rules (src/llama-quant.cpp, ``llama_tensor_get_type_impl`` and
  ``tensor_type_fallback``) for the llama architecture without experts.
* Files are read with ``gguf.GGUFReader`` and written with ``gguf.GGUFWriter`` (gguf-py).
* llama.cpp stores attn_q / attn_k rows permuted for its rotary embedding (convert_hf_to_gguf.py ``permute``):
  the two halves of each head's rotary dims are interleaved. :func:`load_gguf` undoes it, :func:`export_gguf` applies
  it, on the block rows directly (blocks never straddle rows, so no re-quantization is needed).
"""

from __future__ import annotations

import os
import re

import numpy as np
import torch
from torch import nn

from ..nn.gguf_linear import GGUFLinear
from ..ops.gguf import gguf_dequantize, gguf_quantize, type_id
from ..reference.gguf import BLOCK, TYPE_NAMES, TYPES

# ---- mixes ---------------------------------------------------------------------------------------------------

# mix name -> (default ggml type, llama_ftype id written to general.file_type)
MIXES = {
    "Q4_K_M": ("Q4_K", 15),
    "Q5_K_M": ("Q5_K", 17),
    "Q6_K": ("Q6_K", 18),
    "Q8_0": ("Q8_0", 7),
    "F16": ("F16", 1),
    "F32": ("F32", 0),
}
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    # llama.cpp: the first and last eighth of the layers, and every third one in between
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape, n_layers: int, mix: str = "Q4_K_M", *, tied_embeddings: bool = False) -> str:
    """The ggml type llama.cpp's ``mix`` gives GGUF tensor ``name`` of torch shape ``shape`` ([rows, cols]; cols is
    ggml's ne[0]) in a llama model with ``n_layers`` blocks. ``tied_embeddings``: no output.weight, so token_embd is
    also the output matrix (llama.cpp then quantizes it like output.weight)."""
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {sorted(MIXES)}, got {mix!r}")
    default = MIXES[mix][0]
    shape = tuple(shape)
    if len(shape) < 2:
        return "F32"  # norms and biases stay F32 (llama.cpp quantizes only 2-D+ tensors)
    if default in ("F32", "F16"):
        return default
    cols = shape[-1]
    t = default
    m = re.match(r"blk\.(\d+)\.", name)
    layer = int(m.group(1)) if m else -1
    if name == "output.weight" or (tied_embeddings and name == "token_embd.weight"):
        if cols % BLOCK[TYPES[default]][0]:
            t = "Q8_0"
        elif default != "Q8_0":
            t = "Q6_K"
    elif name.endswith("attn_v.weight"):
        if mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, n_layers):
            t = "Q6_K"
    elif name.endswith("ffn_down.weight"):
        if mix in ("Q4_K_M", "Q5_K_M") and _use_more_bits(layer, n_layers):
            t = "Q6_K"
    elif name.endswith("attn_qkv.weight"):
        t = {"Q4_K_M": "Q5_K", "Q5_K_M": "Q6_K"}.get(mix, t)
    # shape fallback (tensor_type_fallback): a 256-block type on a row that 256 does not divide
    if cols % BLOCK[TYPES[t]][0]:
        t = _FALLBACK.get(t, t)
        if cols % BLOCK[TYPES[t]][0]:
            t = "F16"
    return t


def bits_per_weight(shapes: dict, n_layers: int, mix: str, *, tied_embeddings: bool = False) -> tuple[float, dict]:
    """Bits per weight of ``mix`` over the tensors ``{gguf name: torch shape}`` and a count of params per type."""
    total_bits = 0
    total = 0
    per_type: dict = {}
    for name, shape in shapes.items():
        t = tensor_type(name, shape, n_layers, mix, tied_embeddings=tied_embeddings)
        bs, ts = BLOCK[TYPES[t]]
        n = int(np.prod(shape))
        total += n
        total_bits += n // bs * ts * 8
        per_type[t] = per_type.get(t, 0) + n
    return total_bits / max(total, 1), per_type


# ---- name mapping and rope permutation ---------------------------------------------------------------------------

_LAYER_MAP = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_HF_TO_GGUF_LAYER = {v: k for k, v in _LAYER_MAP.items()}


def gguf_to_hf_name(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (None for names we do not map)."""
    fixed = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    return None


def hf_to_gguf_name(name: str) -> str | None:
    fixed = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    if name in fixed:
        return fixed[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m and m.group(2) in _HF_TO_GGUF_LAYER:
        return f"blk.{m.group(1)}.{_HF_TO_GGUF_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def rope_permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF -> llama.cpp row order of a q/k projection (convert_hf_to_gguf.py ``permute``); works on any row tensor
    (float weights or uint8 block rows): per head, rows [first half | second half] become interleaved pairs."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`rope_permute_rows` (llama.cpp -> HF)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


# ---- reading -------------------------------------------------------------------------------------------------


class GGUFError(ValueError):
    """A GGUF file that is truncated, corrupt or not loadable as a llama model."""


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:  # noqa: BLE001 - gguf raises assorted errors on bad fields
        raise GGUFError(f"GGUF metadata field {key!r} is corrupt: {e}") from e


def open_gguf(path):
    """``gguf.GGUFReader`` for ``path`` with every tensor's type and byte range checked (GGUFError otherwise)."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = os.path.getsize(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except Exception as e:  # noqa: BLE001 - GGUFReader raises ValueError/IndexError/KeyError/... on bad bytes
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    for t in reader.tensors:
        tt = int(t.tensor_type)
        if tt not in BLOCK:
            raise GGUFError(f"{path}: tensor {t.name!r} has ggml type {getattr(t.tensor_type, 'name', tt)} ({tt}); "
                            f"qkernels reads {sorted(TYPES)}")
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise GGUFError(f"{path}: tensor {t.name!r} ends at byte {int(t.data_offset) + int(t.n_bytes)} but the "
                            f"file has {size} bytes (truncated?)")
        bs, ts = BLOCK[tt]
        ne = [int(v) for v in t.shape]
        if ne[0] % bs or int(t.n_bytes) != int(np.prod(ne)) // bs * ts:
            raise GGUFError(f"{path}: tensor {t.name!r} of type {TYPE_NAMES[tt]} has shape {ne[::-1]} and "
                            f"{int(t.n_bytes)} bytes, inconsistent with {bs}-value blocks of {ts} bytes")
    return reader


def read_tensors(path) -> dict:
    """{name: (ggml type id, torch shape, uint8 block data [rows, bytes per row] copied out of the file)}."""
    reader = open_gguf(path)
    out = {}
    for t in reader.tensors:
        shape = tuple(int(v) for v in t.shape)[::-1]
        cols = shape[-1]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        raw = np.ascontiguousarray(t.data).view(np.uint8).reshape(rows, -1)
        out[t.name] = (int(t.tensor_type), shape, torch.from_numpy(raw.copy()))
    return out, reader


def _llama_config(reader):
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"load_gguf builds llama models; this file's general.architecture is {arch!r}")

    def need(key):
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise GGUFError(f"GGUF metadata lacks llama.{key}")
        return v

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    kv = int(_field(reader, "llama.attention.head_count_kv", heads))
    head_dim = int(_field(reader, "llama.rope.dimension_count", hidden // heads))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = _field(reader, "llama.vocab_size")
    if vocab is None:
        emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab = len(tokens) if tokens is not None else (int(emb.shape[1]) if emb is not None else None)
    if vocab is None:
        raise GGUFError("GGUF file has neither llama.vocab_size, a tokenizer nor token_embd.weight")
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    cfg = LlamaConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")), num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),  # transformers 5 maps it to rope_parameters
        tie_word_embeddings=tied,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )
    return cfg


def load_gguf(path, dtype: torch.dtype = torch.float32):
    """A transformers ``LlamaForCausalLM`` from a llama GGUF file. Linear layers (and lm_head) are
    :class:`GGUFLinear` holding the file's blocks; embeddings and norms are dequantized to ``dtype``.

    The file's metadata (``general.*``, ``tokenizer.*``) is kept in ``model.gguf_metadata`` so that
    :func:`export_gguf` can write the tokenizer back. Raises GGUFError / NotImplementedError before building anything
    if the file is truncated, corrupt, of an unsupported architecture or has tensors of unsupported types.
    """
    from transformers import LlamaForCausalLM

    tensors, reader = read_tensors(path)
    cfg = _llama_config(reader)
    L = cfg.num_hidden_layers
    expected = {"token_embd.weight", "output_norm.weight"}
    for i in range(L):
        expected |= {f"blk.{i}.{k}.weight" for k in _LAYER_MAP}
    missing = sorted(expected - set(tensors))
    if missing:
        raise GGUFError(f"{path}: GGUF llama file lacks tensors {missing[:6]}{' ...' if len(missing) > 6 else ''}")

    linears = {}
    dense = {}
    for name, (t, shape, data) in tensors.items():
        hf = gguf_to_hf_name(name)
        if hf is None:
            continue
        is_linear = len(shape) == 2 and (name.startswith("blk.") or name == "output.weight")
        if is_linear:
            if name.endswith("attn_q.weight"):
                data = rope_unpermute_rows(data, cfg.num_attention_heads)
            elif name.endswith("attn_k.weight"):
                data = rope_unpermute_rows(data, cfg.num_key_value_heads)
            linears[hf[: -len(".weight")]] = GGUFLinear(shape[1], shape[0], t, data.contiguous())
        else:
            dense[hf] = gguf_dequantize(data, t, shape, dtype)
    if cfg.tie_word_embeddings:
        t, shape, data = tensors["token_embd.weight"]
        linears["lm_head"] = GGUFLinear(shape[1], shape[0], t, data)

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    for qual, mod in linears.items():
        parent, _, child = qual.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, mod)
    model.load_state_dict(dense, strict=False, assign=True)
    # rotary inv_freq was built on the meta device: rebuild it on CPU
    rope_cls = type(model.model.rotary_emb)
    model.model.rotary_emb = rope_cls(config=cfg)
    model = model.to(dtype) if dtype != torch.float32 else model
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise GGUFError(f"{path}: no data for {left[:6]}")
    model.eval()
    model.gguf_metadata = {k: _field(reader, k) for k in reader.fields
                           if k.startswith(("tokenizer.", "general.")) and k != "general.file_type"}
    return model


def load_gguf_tokenizer(path):
    """The file's tokenizer as a transformers tokenizer (transformers' GGUF tokenizer conversion)."""
    from transformers import AutoTokenizer

    path = os.path.abspath(os.fspath(path))
    return AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))


# ---- writing -------------------------------------------------------------------------------------------------


def _tokenizer_fields(tokenizer) -> dict:
    """gguf tokenizer.* fields for a transformers BPE tokenizer (GPT-2 style, like convert_hf_to_gguf's gpt2 vocab)."""
    import json

    vocab = tokenizer.get_vocab()
    n = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(n)]
    for tok, i in vocab.items():
        tokens[i] = tok
    special = set(getattr(tokenizer, "all_special_ids", []))
    added = {i for i in getattr(tokenizer, "added_tokens_decoder", {})}
    types = [3 if i in special else (4 if i in added else 1) for i in range(n)]  # CONTROL / USER_DEFINED / NORMAL
    fields = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        model = json.loads(backend.to_str()).get("model", {})
        merges = model.get("merges") or []
        fields["tokenizer.ggml.merges"] = [m if isinstance(m, str) else " ".join(m) for m in merges]
    for key, attr in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("unknown_token_id", "unk_token_id"), ("padding_token_id", "pad_token_id")):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            fields[f"tokenizer.ggml.{key}"] = int(v)
    return fields


def _add_field(writer, key, value):
    import gguf

    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value) if value >= 0 else writer.add_int32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        if value and isinstance(value[0], int) and not isinstance(value[0], bool):
            writer.add_array(key, [int(v) for v in value])
        else:
            writer.add_array(key, list(value))
    elif value is not None:
        raise TypeError(f"cannot write metadata {key!r} of type {type(value).__name__}")
    del gguf


def _float_weight(mod_or_tensor) -> torch.Tensor:
    if isinstance(mod_or_tensor, GGUFLinear):
        return mod_or_tensor.dequantize_weight(torch.float32)
    return mod_or_tensor.detach().to(torch.float32)


def export_gguf(model, path, mix: str = "Q4_K_M", *, tokenizer=None, imatrix: dict | None = None,
                name: str | None = None) -> dict:
    """Write a transformers llama model (``LlamaForCausalLM``, float or with :class:`GGUFLinear` layers) to a GGUF
    file quantized with llama.cpp's ``mix`` rules ("Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16", "F32").

    ``tokenizer``: a transformers BPE tokenizer to embed; otherwise the tokenizer metadata of a model loaded with
    :func:`load_gguf` is copied. ``imatrix``: {gguf tensor name: float [cols]} importance weights.
    A GGUFLinear whose type already equals the target type is written byte for byte (no re-quantization).
    Returns {gguf tensor name: ggml type name}.
    """
    import gguf

    if mix not in MIXES:
        raise ValueError(f"mix must be one of {sorted(MIXES)}, got {mix!r}")
    cfg = model.config
    L = cfg.num_hidden_layers
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") not in ("default", None):
        raise NotImplementedError(f"rope_type {rope.get('rope_type')!r} is not exported (default rope only)")
    tied = bool(getattr(cfg, "tie_word_embeddings", False))

    # collect (gguf name -> module or tensor) in llama.cpp's order
    items = [("token_embd.weight", model.model.embed_tokens.weight)]
    for i, layer in enumerate(model.model.layers):
        for g, hf in _LAYER_MAP.items():
            mod = layer.get_submodule(hf)
            items.append((f"blk.{i}.{g}.weight", mod if isinstance(mod, GGUFLinear) else mod.weight))
    items.append(("output_norm.weight", model.model.norm.weight))
    if not tied:
        lm = model.lm_head
        items.append(("output.weight", lm if isinstance(lm, GGUFLinear) else lm.weight))

    plan = {}
    encoded = []
    for gname, obj in items:
        shape = (obj.out_features, obj.in_features) if isinstance(obj, GGUFLinear) else tuple(obj.shape)
        t = tensor_type(gname, shape, L, mix, tied_embeddings=tied)
        plan[gname] = t
        tid = TYPES[t]
        n_head = heads if gname.endswith("attn_q.weight") else (kv if gname.endswith("attn_k.weight") else None)
        if isinstance(obj, GGUFLinear) and obj.type == tid:
            data = obj.data  # already the target blocks: keep the bytes
        else:
            w = _float_weight(obj)
            if tid == TYPES["F32"]:
                data = w.contiguous()
            else:
                im = None if imatrix is None else imatrix.get(gname)
                data = gguf_quantize(w if w.dim() > 1 else w[None], tid, im if tid in (10, 11, 12, 13, 14) else None)
        if n_head is not None:
            data = rope_permute_rows(data, n_head)
        encoded.append((gname, tid, shape, data))

    writer = gguf.GGUFWriter(os.fspath(path), "llama")
    writer.add_name(name or getattr(model, "gguf_metadata", {}).get("general.name") or "qkernels-export")
    writer.add_block_count(L)
    writer.add_context_length(int(cfg.max_position_embeddings))
    writer.add_embedding_length(int(cfg.hidden_size))
    writer.add_feed_forward_length(int(cfg.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(kv))
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    writer.add_rope_dimension_count(int(head_dim))
    writer.add_vocab_size(int(cfg.vocab_size))
    writer.add_file_type(MIXES[mix][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if tokenizer is not None:
        tok_fields = _tokenizer_fields(tokenizer)
    else:
        tok_fields = {k: v for k, v in getattr(model, "gguf_metadata", {}).items() if k.startswith("tokenizer.")}
    for k, v in tok_fields.items():
        _add_field(writer, k, v)

    for gname, tid, shape, data in encoded:
        if tid == TYPES["F32"]:
            writer.add_tensor(gname, data.reshape(shape).numpy())
        else:
            writer.add_tensor(gname, data.reshape(*shape[:-1], -1).numpy(),
                              raw_dtype=gguf.GGMLQuantizationType(tid))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return plan
