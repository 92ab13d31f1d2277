"""A tiny random llama GGUF file (written by qkernels.export_gguf, K-quant mix, with a small tokenizer so that the
header holds string and integer arrays) and byte-level patchers, for tests/test_formats_corruption.py and
tests/test_gguf_mutation.py."""

from __future__ import annotations

import shutil

import torch

TOKENS = torch.tensor([[1, 17, 50, 3, 9, 42, 7, 63]])


def write_tiny_gguf(path) -> torch.Tensor:
    """Write the file; returns the logits of the model loaded back from it (the reference for "loads the same")."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    import qkernels

    torch.manual_seed(0)
    # hidden 256: the K-quants (256-value blocks) apply; eps and rope base not the defaults, so a value silently
    # replaced by a default would show in the logits
    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=64,
                      rms_norm_eps=1e-6, rope_theta=5000.0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    tok = Tokenizer(models.BPE(vocab={"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}, merges=[("a", "b")]))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    qkernels.export_gguf(model, path, "Q4_K_M", tokenizer=hf_tok)
    return logits(qkernels.load_gguf(path))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def patch_field(src, dst, key: str, value):
    """Copy ``src`` to ``dst`` with metadata ``key``'s (scalar) value, or an array's item count (``value`` =
    ("count", n)), overwritten in place (same type, same bytes)."""
    import gguf

    shutil.copy(src, dst)
    r = gguf.GGUFReader(dst, "r+")
    f = r.fields[key]
    if isinstance(value, tuple) and value[0] == "count":
        f.parts[4][0] = value[1]  # parts: key len, key, type, item type, item count, items...
    else:
        f.parts[f.data[0]][0] = value
    r.data.flush()
    del r


def patch_tensor_info(src, dst, name: str, *, type_id=None, offset_delta=None, ne0=None):
    """Copy ``src`` to ``dst`` with tensor ``name``'s info changed: ggml type id, data offset (+ delta), ne[0]."""
    import gguf

    shutil.copy(src, dst)
    r = gguf.GGUFReader(dst, "r+")
    t = next(t for t in r.tensors if t.name == name)
    if type_id is not None:
        t.field.parts[4][0] = type_id
    if offset_delta is not None:
        t.field.parts[5][0] += offset_delta
    if ne0 is not None:
        t.field.parts[3][0] = ne0
    r.data.flush()
    del r


def patch_tensor_bytes(src, dst, name: str, at: int, data: bytes):
    """Overwrite bytes ``at`` .. of tensor ``name``'s data."""
    import gguf

    r = gguf.GGUFReader(src)
    t = next(t for t in r.tensors if t.name == name)
    start = int(t.data_offset) + at
    del r
    raw = bytearray(open(src, "rb").read())
    raw[start:start + len(data)] = data
    open(dst, "wb").write(bytes(raw))


def header_end(path) -> int:
    """First byte of the tensor data (the header, metadata and tensor infos lie before it)."""
    import gguf

    return int(gguf.GGUFReader(path).data_offset)


def field_value_ranges(path) -> dict[str, tuple[int, int]]:
    """{key: (first byte, end byte) of its value} for the scalar metadata fields."""
    import gguf

    r = gguf.GGUFReader(path)
    out = {}
    for key, f in r.fields.items():
        if len(f.data) == 1 and f.types and f.types[0] != gguf.GGUFValueType.ARRAY:
            part = f.parts[f.data[0]]
            start = f.offset + sum(int(p.nbytes) for p in f.parts[:f.data[0]])
            out[key] = (start, start + int(part.nbytes))
    return out
