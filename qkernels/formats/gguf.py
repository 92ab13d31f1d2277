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

import json
import os
import re

import numpy as np
import torch

from ..nn.gguf_linear import GGUFLinear
from ..ops.gguf import gguf_dequantize, gguf_quantize
from ..reference.gguf import BLOCK, FP16_FIELDS, IMATRIX_TYPES, TYPE_NAMES, TYPES

# ---- mixes ---------------------------------------------------------------------------------------------------

# mix name -> (default ggml type, llama_ftype id written to general.file_type)
MIXES = {
    "Q4_0": ("Q4_0", 2),
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

# written once, GGUF -> HF; the HF -> GGUF maps are their inverses (derived, so the two cannot drift apart)
_FIXED_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                "output.weight": "lm_head.weight"}
_LAYER_MAP = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_HF_TO_GGUF_FIXED = {v: k for k, v in _FIXED_NAMES.items()}
_HF_TO_GGUF_LAYER = {v: k for k, v in _LAYER_MAP.items()}


def gguf_to_hf_name(name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (None for names we do not map)."""
    if name in _FIXED_NAMES:
        return _FIXED_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m.group(2) in _LAYER_MAP:
        return f"model.layers.{m.group(1)}.{_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    return None


def hf_to_gguf_name(name: str) -> str | None:
    """Inverse of :func:`gguf_to_hf_name`."""
    if name in _HF_TO_GGUF_FIXED:
        return _HF_TO_GGUF_FIXED[name]
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
#
# Everything in a GGUF file is trusted by nobody: counts, sizes, offsets and metadata values are checked against the
# file size and against each other before anything of a size taken from the file is allocated, and before a single
# module is built (docs/validation.md, "Checkpoints and GGUF files"). GGUF carries no checksum, so flipped bits inside
# the quant codes cannot be detected; everything else that would change the model is cross-checked.


class GGUFError(ValueError):
    """A GGUF file that is truncated, corrupt or not loadable as a llama model."""


class GGUFUnsupportedError(GGUFError, NotImplementedError):
    """A well-formed GGUF file of something load_gguf does not build (another architecture, rope scaling...).
    Both a ValueError (the file cannot be loaded) and a NotImplementedError (it is not corrupt)."""


GGML_MAX_DIMS = 4


def _bounded_reader_class():
    """``gguf.GGUFReader`` that checks every count against the bytes left in the file before using it.

    gguf-py trusts the file: a read past the end yields an empty array rather than an error, so one flipped bit in an
    array length makes its parser loop (and grow its lists) for as many iterations as the length says. Reading past
    the end is an error here, and array / key-value / tensor counts are bounded by the smallest encoding of their
    items (gguf-py's private ``_get`` / ``_get_field_parts`` / ``_build_*`` are wrapped, not rewritten)."""
    import gguf
    from gguf.constants import GGUFValueType

    scalar_size = {t: np.dtype(d).itemsize for t, d in gguf.GGUFReader.gguf_scalar_to_np.items()}

    def min_size(raw_type) -> int:
        try:
            t = GGUFValueType(int(raw_type))
        except ValueError as e:
            raise ValueError(f"unknown GGUF value type {int(raw_type)}") from e
        # a string is its uint64 length at least; an array its uint32 type + uint64 count
        return scalar_size.get(t, 8 if t == GGUFValueType.STRING else 12)

    class BoundedReader(gguf.GGUFReader):
        def _left(self, offs: int) -> int:
            return int(self.data.size) - int(offs)

        def _get(self, offset, dtype, count=1, override_order=None):
            arr = super()._get(offset, dtype, count, override_order)
            if len(arr) != int(count):
                raise ValueError(f"reading {int(count)} x {np.dtype(dtype).name} at byte {int(offset)} runs past the "
                                 f"end of the file ({int(self.data.size)} bytes): truncated or corrupt")
            return arr

        def _get_field_parts(self, orig_offs, raw_type):
            if int(raw_type) == int(GGUFValueType.ARRAY):
                raw_itype = self._get(orig_offs, np.uint32)
                alen = self._get(orig_offs + 4, np.uint64)
                n = int(alen[0])
                if n * min_size(raw_itype[0]) > self._left(orig_offs + 12):
                    raise ValueError(f"a metadata array at byte {int(orig_offs)} claims {n} items, more than the "
                                     f"{self._left(orig_offs + 12)} bytes left in the file can hold")
                itype = GGUFValueType(int(raw_itype[0]))
                nptype = self.gguf_scalar_to_np.get(itype)
                if nptype is not None:
                    # one read for the whole array instead of gguf-py's Python loop per item (which a corrupt but
                    # in-bounds count turns into seconds per megabyte); contents() reads it the same way
                    items = self._get(orig_offs + 12, nptype, n)
                    return 12 + int(items.nbytes), [raw_itype, alen, items], [2], [GGUFValueType.ARRAY, itype]
            return super()._get_field_parts(orig_offs, raw_type)

        def _build_fields(self, offs, count):
            # a key-value pair: key (uint64 length + >= 1 byte) + uint32 type + >= 1 byte of value
            if int(count) * 14 > self._left(offs):
                raise ValueError(f"the header claims {int(count)} metadata key-value pairs, more than the "
                                 f"{self._left(offs)} bytes left in the file can hold")
            return super()._build_fields(offs, count)

        def _build_tensor_info(self, offs, count):
            # a tensor info: name (uint64 length + >= 1 byte) + uint32 n_dims + >= 1 uint64 dim + uint32 type + offset
            if int(count) * 33 > self._left(offs):
                raise ValueError(f"the header claims {int(count)} tensors, more than the {self._left(offs)} bytes left "
                                 "in the file can describe")
            return super()._build_tensor_info(offs, count)

    return BoundedReader


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    try:
        return f.contents()
    except Exception as e:  # noqa: BLE001 - gguf raises assorted errors on bad fields
        raise GGUFError(f"GGUF metadata field {key!r} is corrupt: {e}") from e


def _int_field(reader, key, default=None, *, lo=1, hi=2**31 - 1):
    """An integer metadata value in [lo, hi] (GGUFError naming the field otherwise); ``default`` when absent,
    GGUFError when absent without a default."""
    v = _field(reader, key, default)
    if v is None:
        raise GGUFError(f"GGUF metadata lacks {key}")
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise GGUFError(f"GGUF metadata {key} must be an integer, got {type(v).__name__} {v!r:.60}")
    if not lo <= int(v) <= hi:
        raise GGUFError(f"GGUF metadata {key} must be in [{lo}, {hi}], got {int(v)}")
    return int(v)


def _positive_float_field(reader, key, default):
    v = _field(reader, key, default)
    if v is None:
        raise GGUFError(f"GGUF metadata lacks {key}")
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise GGUFError(f"GGUF metadata {key} must be a number, got {type(v).__name__} {v!r:.60}")
    if not (np.isfinite(float(v)) and float(v) > 0):
        raise GGUFError(f"GGUF metadata {key} must be finite and positive, got {float(v)}")
    return float(v)


def open_gguf(path):
    """``gguf.GGUFReader`` for ``path`` with the header bounded by the file size and every tensor's type, shape, size
    and byte range checked (GGUFError otherwise): tensors known to qkernels, 1..4 dims, rows of whole blocks, data
    laid out as llama.cpp requires (each tensor at the aligned end of the previous one, the last one ending the file).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    size = os.path.getsize(path)
    try:
        reader = _bounded_reader_class()(path, "r")
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - GGUFReader raises ValueError/IndexError/KeyError/... on bad bytes
        raise GGUFError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    align = int(reader.alignment)
    expected_offset = 0
    end = int(reader.data_offset)
    for t in reader.tensors:
        tt = int(t.tensor_type)
        if tt not in BLOCK:
            raise GGUFError(f"{path}: tensor {t.name!r} has ggml type {getattr(t.tensor_type, 'name', tt)} ({tt}); "
                            f"qkernels reads {sorted(TYPES)}")
        ne = [int(v) for v in t.shape]
        if not 1 <= len(ne) <= GGML_MAX_DIMS or min(ne) < 1:
            raise GGUFError(f"{path}: tensor {t.name!r} has dims {ne} (ggml order); 1 to {GGML_MAX_DIMS} positive "
                            "dims expected")
        bs, ts = BLOCK[tt]
        n = 1
        for v in ne:  # Python ints: gguf-py's numpy product of uint64 dims wraps around silently
            n *= v
        if ne[0] % bs or int(t.n_bytes) != n // bs * ts:
            raise GGUFError(f"{path}: tensor {t.name!r} of type {TYPE_NAMES[tt]} has shape {ne[::-1]} and "
                            f"{int(t.n_bytes)} bytes, inconsistent with {bs}-value blocks of {ts} bytes")
        rel = int(t.data_offset) - int(reader.data_offset)
        if int(t.data_offset) + int(t.n_bytes) > size:
            raise GGUFError(f"{path}: tensor {t.name!r} ends at byte {int(t.data_offset) + int(t.n_bytes)} but the "
                            f"file has {size} bytes (truncated?)")
        if rel != expected_offset:
            # llama.cpp (ggml/src/gguf.cpp) rejects the same: tensor data follow each other, each padded to alignment
            raise GGUFError(f"{path}: tensor {t.name!r} has data offset {rel}, expected {expected_offset} (the aligned "
                            "end of the previous tensor): corrupt tensor info (offset, type or shape)")
        expected_offset = rel + -(-int(t.n_bytes) // align) * align
        end = int(t.data_offset) + int(t.n_bytes)
    if size > int(reader.data_offset) + expected_offset or size < end:
        raise GGUFError(f"{path}: the tensors' data end at byte {end} (padded: "
                        f"{int(reader.data_offset) + expected_offset}) but the file has {size} bytes: corrupt tensor "
                        "info (type or shape) or trailing data")
    return reader


def _check_finite_blocks(name: str, tt: int, raw: np.ndarray):
    """GGUFError if a float tensor holds NaN/inf or a block's fp16 scale (d, dmin) is NaN/inf. ``raw``: uint8
    ``[rows, row bytes]``. Only the block headers are read for the block types (a strided view, no copy of codes)."""
    if tt in (0, 1, 30):  # F32, F16, BF16: the values themselves
        if tt == 30:
            bad = (raw.view(np.uint16) & 0x7F80) == 0x7F80
        else:
            bad = ~np.isfinite(raw.view(np.float32 if tt == 0 else np.float16))
        if bad.any():
            raise GGUFError(f"tensor {name!r} ({TYPE_NAMES[tt]}) contains {int(bad.sum())} NaN/inf values")
        return
    offsets = FP16_FIELDS.get(tt)  # MXFP4's e8m0 scale has no NaN in ggml's decoding
    if not offsets:
        return
    ts = BLOCK[tt][1]
    blocks = raw.reshape(-1, ts)
    for o in offsets:
        h = blocks[:, o].astype(np.uint16) | (blocks[:, o + 1].astype(np.uint16) << 8)
        bad = (h & 0x7C00) == 0x7C00  # fp16 exponent all ones: inf or NaN
        if bad.any():
            i = int(np.argmax(bad))
            raise GGUFError(f"tensor {name!r} ({TYPE_NAMES[tt]}): {int(bad.sum())} blocks have a NaN/inf fp16 scale at "
                            f"byte {o} of the block (first: block {i})")


def read_tensors(path, validate: bool = True) -> dict:
    """{name: (ggml type id, torch shape, uint8 block data [rows, bytes per row] copied out of the file)} and the
    reader. ``validate``: also reject NaN/inf float values and block scales (one pass over the headers)."""
    reader = open_gguf(path)
    return _copy_tensors(reader, validate), reader


def _copy_tensors(reader, validate: bool) -> dict:
    out = {}
    for t in reader.tensors:
        shape = tuple(int(v) for v in t.shape)[::-1]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        raw = np.asarray(t.data).view(np.uint8).reshape(rows, -1)
        if validate:
            _check_finite_blocks(t.name, int(t.tensor_type), raw)
        out[t.name] = (int(t.tensor_type), shape, torch.from_numpy(raw.copy()))
    return out


def _shapes(reader) -> dict:
    """{tensor name: torch shape} (from the tensor infos, no data read)."""
    return {t.name: tuple(int(v) for v in t.shape)[::-1] for t in reader.tensors}


# llama.* keys load_gguf reads (above) or may ignore: each changes nothing in the model it builds. Any other llama.*
# key is refused: it is either a corrupt key name (whose value would otherwise be silently replaced by a default) or
# a feature the model built here does not have (rope scaling, experts, ...).
_LLAMA_KEYS = {"block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
               "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.dimension_count",
               "vocab_size", "attention.key_length", "attention.value_length"}
# keys accepted only with the value that means "feature off"
_LLAMA_OFF = {"rope.scaling.type": ("none",), "rope.scaling.factor": (0.0, 1.0), "expert_count": (0,),
              "expert_used_count": (0,)}


def _check_llama_keys(reader, path):
    unknown = []
    for key in reader.fields:
        if not key.startswith("llama."):
            continue
        k = key[len("llama."):]
        if k in _LLAMA_OFF:
            v = _field(reader, key)
            if v not in _LLAMA_OFF[k]:
                raise GGUFUnsupportedError(f"{path}: GGUF metadata {key} = {v!r:.40} is not supported by load_gguf "
                                           f"(only {_LLAMA_OFF[k]})")
        elif k not in _LLAMA_KEYS:
            unknown.append(key)
    if unknown:
        raise GGUFUnsupportedError(f"{path}: GGUF metadata keys {unknown[:6]} are not understood by load_gguf (corrupt "
                                   f"key names, or a llama variant it does not build); it reads llama."
                                   f"{{{', '.join(sorted(_LLAMA_KEYS | set(_LLAMA_OFF)))}}}")


def _llama_config(reader, path=""):
    """The LlamaConfig the metadata describe, every value checked against the tensors actually present (so that
    nothing is sized by an unchecked metadata value)."""
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise GGUFUnsupportedError(f"load_gguf builds llama models; this file's general.architecture is {arch!r}")
    shapes = _shapes(reader)
    _check_llama_keys(reader, path)

    def shape_of(name, want, why):
        got = shapes.get(name)
        if got is not None and tuple(got) != tuple(want):
            raise GGUFError(f"{path}: tensor {name!r} has shape {list(got)} but the metadata say {list(want)} ({why})")

    # which blocks exist comes from the tensor names (bounded by the file), never from a loop over block_count
    blocks, unknown = set(), []
    for name in shapes:
        m = re.fullmatch(r"blk\.(\d{1,9})\.(\w+)\.weight", name)
        if m and m.group(2) in _LAYER_MAP:
            blocks.add(int(m.group(1)))
        elif name not in _FIXED_NAMES:
            unknown.append(name)
    if unknown:
        hint = " (rope scaling via rope_freqs is not supported)" if "rope_freqs.weight" in unknown else ""
        raise GGUFUnsupportedError(f"{path}: tensors {sorted(unknown)[:6]} are not part of the llama model load_gguf "
                                   f"builds{hint}")
    L = _int_field(reader, "llama.block_count")
    # stops at the 7th missing name: with a corrupt block_count of 2^31 that is within len(shapes) + 7 steps
    missing = [n for n in ("token_embd.weight", "output_norm.weight") if n not in shapes]
    for i in range(L):
        missing += [f"blk.{i}.{k}.weight" for k in _LAYER_MAP if f"blk.{i}.{k}.weight" not in shapes]
        if len(missing) > 6:
            break
    if missing:
        raise GGUFError(f"{path}: GGUF llama file lacks tensors {missing[:6]}{' ...' if len(missing) > 6 else ''} "
                        f"(GGUF metadata llama.block_count is {L})")
    if max(blocks, default=-1) >= L:
        raise GGUFError(f"{path}: GGUF metadata llama.block_count is {L} but the file has tensors for blocks "
                        f"{min(blocks)}..{max(blocks)}")
    vocab, hidden = shapes["token_embd.weight"] if len(shapes["token_embd.weight"]) == 2 else (0, 0)
    if not vocab:
        raise GGUFError(f"{path}: token_embd.weight must be 2-D [vocab, hidden], got "
                        f"{list(shapes['token_embd.weight'])}")
    n = _int_field(reader, "llama.embedding_length")
    if n != hidden:
        raise GGUFError(f"{path}: GGUF metadata llama.embedding_length is {n} but token_embd.weight is "
                        f"[{vocab}, {hidden}]")
    v = _int_field(reader, "llama.vocab_size", vocab)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if v != vocab:
        raise GGUFError(f"{path}: token_embd.weight has {vocab} rows but GGUF metadata llama.vocab_size is {v}")
    # fewer tokens than embedding rows only leaves rows unused (export_gguf writes that for small tokenizers); more
    # would make token ids the embedding does not have
    if tokens is not None and (not isinstance(tokens, list) or len(tokens) > vocab):
        got = f"{len(tokens)} entries" if isinstance(tokens, list) else type(tokens).__name__
        raise GGUFError(f"{path}: GGUF metadata tokenizer.ggml.tokens must be a list of at most {vocab} tokens "
                        f"(token_embd.weight rows), got {got}")
    heads = _int_field(reader, "llama.attention.head_count", hi=hidden)
    kv = _int_field(reader, "llama.attention.head_count_kv", heads, hi=heads)
    if heads % kv:
        raise GGUFError(f"{path}: GGUF metadata llama.attention.head_count ({heads}) must be a multiple of "
                        f"llama.attention.head_count_kv ({kv})")
    if "llama.rope.dimension_count" not in reader.fields and hidden % heads:
        raise GGUFError(f"{path}: GGUF metadata llama.attention.head_count ({heads}) does not divide "
                        f"llama.embedding_length ({hidden}) and llama.rope.dimension_count is absent")
    head_dim = _int_field(reader, "llama.rope.dimension_count", hidden // heads, hi=hidden)
    if head_dim % 2:
        raise GGUFError(f"{path}: GGUF metadata llama.rope.dimension_count must be even (rotary pairs), got {head_dim}")
    for key in ("llama.attention.key_length", "llama.attention.value_length"):
        if key in reader.fields and _int_field(reader, key, hi=hidden * 4) != head_dim:
            raise GGUFError(f"{path}: GGUF metadata {key} is {_field(reader, key)}, but the head dim "
                            f"(llama.rope.dimension_count) is {head_dim}; load_gguf needs them equal")
    ffn = _int_field(reader, "llama.feed_forward_length")
    heads_why = "llama.attention.head_count x head dim"
    kv_why = "llama.attention.head_count_kv x head dim"
    for i in range(L):  # L is the number of blocks present, checked above
        b = f"blk.{i}."
        shape_of(b + "attn_norm.weight", (hidden,), "llama.embedding_length")
        shape_of(b + "ffn_norm.weight", (hidden,), "llama.embedding_length")
        shape_of(b + "attn_q.weight", (heads * head_dim, hidden), heads_why)
        shape_of(b + "attn_k.weight", (kv * head_dim, hidden), kv_why)
        shape_of(b + "attn_v.weight", (kv * head_dim, hidden), kv_why)
        shape_of(b + "attn_output.weight", (hidden, heads * head_dim), heads_why)
        shape_of(b + "ffn_gate.weight", (ffn, hidden), "llama.feed_forward_length")
        shape_of(b + "ffn_up.weight", (ffn, hidden), "llama.feed_forward_length")
        shape_of(b + "ffn_down.weight", (hidden, ffn), "llama.feed_forward_length")
    shape_of("output_norm.weight", (hidden,), "llama.embedding_length")
    shape_of("output.weight", (vocab, hidden), "the vocabulary and llama.embedding_length")
    token_ids = {}
    for key in ("bos_token_id", "eos_token_id", "padding_token_id"):
        if f"tokenizer.ggml.{key}" in reader.fields:
            token_ids[key] = _int_field(reader, f"tokenizer.ggml.{key}", lo=0, hi=vocab - 1)
    tied = "output.weight" not in shapes
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
        num_hidden_layers=L, num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, max_position_embeddings=_int_field(reader, "llama.context_length", 2048),
        # required, as in llama.cpp: a default would silently stand in for a corrupt key name
        rms_norm_eps=_positive_float_field(reader, "llama.attention.layer_norm_rms_epsilon", None),
        # transformers 5 maps rope_theta to rope_parameters
        rope_theta=_positive_float_field(reader, "llama.rope.freq_base", 10000.0),
        tie_word_embeddings=tied,
        bos_token_id=token_ids.get("bos_token_id"),
        eos_token_id=token_ids.get("eos_token_id"),
        pad_token_id=token_ids.get("padding_token_id"),
    )
    return cfg


def load_gguf(path, dtype: torch.dtype = torch.float32, *, validate: bool = True):
    """A transformers ``LlamaForCausalLM`` from a llama GGUF file. Linear layers (and lm_head) are
    :class:`GGUFLinear` holding the file's blocks; embeddings and norms are dequantized to ``dtype``.

    The file's metadata (``general.*``, ``tokenizer.*``) is kept in ``model.gguf_metadata`` so that
    :func:`export_gguf` can write the tokenizer back.

    Checked before anything is built (GGUFError, a ValueError naming the field or tensor): the header against the
    file size; tensor types, shapes, sizes and offsets; every metadata value the model uses against the tensors
    present (block count, embedding/feed-forward lengths, head counts, head dim, vocabulary, token ids) and rms eps /
    rope freq_base finite and positive. ``validate`` (default True) also scans the float tensors and the blocks' fp16
    scales for NaN/inf (one pass over the headers, cheap); False skips only that scan. Another architecture or
    unsupported tensors: :class:`GGUFUnsupportedError` (a GGUFError and a NotImplementedError). See
    docs/validation.md for what cannot be detected (GGUF has no checksums).
    """
    from transformers import LlamaForCausalLM

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    reader = open_gguf(path)
    cfg = _llama_config(reader, os.fspath(path))
    tensors = _copy_tensors(reader, validate)

    linears = {}
    dense = {}
    for name, (t, shape, data) in tensors.items():
        hf = gguf_to_hf_name(name)
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


def _float_weight(mod_or_tensor) -> torch.Tensor:
    if isinstance(mod_or_tensor, GGUFLinear):
        return mod_or_tensor.dequantize_weight(torch.float32)
    return mod_or_tensor.detach().to(torch.float32)


def export_gguf(model, path, mix: str = "Q4_K_M", *, tokenizer=None, imatrix: dict | None = None,
                name: str | None = None) -> dict:
    """Write a transformers llama model (``LlamaForCausalLM``, float or with :class:`GGUFLinear` layers) to a GGUF
    file quantized with llama.cpp's ``mix`` rules (a key of :data:`MIXES`: "Q4_0", "Q4_K_M", "Q5_K_M", "Q6_K",
    "Q8_0", "F16", "F32").

    ``tokenizer``: a transformers BPE tokenizer to embed; otherwise the tokenizer metadata of a model loaded with
    :func:`load_gguf` is copied. ``imatrix``: {gguf tensor name: float [cols]} importance weights.
    A GGUFLinear whose type already equals the target type is written byte for byte (no re-quantization).
    Returns {gguf tensor name: ggml type name}.
    """
    import gguf

    if mix not in MIXES:
        raise ValueError(f"mix must be one of {sorted(MIXES)}, got {mix!r}")
    if imatrix is not None and mix == "Q4_0":
        # llama.cpp then runs a weighted Q4_0 search and makes the first eighth of ffn_down Q4_1: not implemented
        raise NotImplementedError("imatrix is not supported for the Q4_0 mix (llama.cpp's imatrix Q4_0 search and "
                                  "its Q4_1 ffn_down rule are not implemented); pass imatrix=None")
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
                data = gguf_quantize(w if w.dim() > 1 else w[None], tid, im if tid in IMATRIX_TYPES else None)
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
