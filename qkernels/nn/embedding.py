"""An input embedding that reads its rows from a quantized output head.

Tied models (SmolLM2, Gemma, tied Llamas) share one [vocab, hidden] matrix between the token embedding and the
output head. ``quantize_(..., include_lm_head=...)`` unties them: the head becomes a QuantLinear and the embedding
keeps the float matrix (57 MB in bf16 for SmolLM2, about as much as all its int4 layers), read one row per
token.
:class:`QuantEmbedding` drops that float copy: a lookup dequantizes the head's rows for the ids it is given, so the
model holds the shared matrix once, quantized, as llama.cpp's GGUF files do (a tied ``token_embd`` is stored once,
quantized: Q8_0 in SmolLM2's Q4_0 file).
The embeddings then carry the head's quantization error, which ``qkernels eval`` measures (``+emb``).
"""

from __future__ import annotations

import torch
from torch import nn

from .linear import QuantLinear


class QuantEmbedding(nn.Module):
    """``forward(ids) = head.dequantize(dtype)[ids]``, dequantizing only the rows looked up.

    ``head``: the output head QuantLinear (integer schemes: int4 / int8 codes), shape [num_embeddings,
    embedding_dim]; it is not a submodule (the head owns the buffers). ``dtype``: of the looked-up rows (the float
    embedding's dtype). ``padding_idx`` is kept for code that reads it (the lookup itself does not treat it apart, as
    ``nn.Embedding``'s forward does not).

    ``state_dict`` holds ``weight``: the dequantized table, so that ``save_quantized`` writes an ordinary float
    embedding that any loader reads (after a reload the embedding is a float copy again); loading a ``weight`` other
    than that table is refused (the codes live in the head).
    """

    def __init__(self, head: QuantLinear, dtype: torch.dtype, padding_idx: int | None = None):
        super().__init__()
        if not isinstance(head, QuantLinear):
            raise TypeError(f"head must be a qkernels QuantLinear, got {type(head).__name__}")
        if not hasattr(head._layout, "dequantize_rows"):
            raise ValueError(f"QuantEmbedding needs a head with integer codes (int4 / int8 schemes); {head.scheme!r} "
                             "has none: keep the float embedding")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        object.__setattr__(self, "_head", head)  # not a submodule: the head owns (and saves) the codes
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.padding_idx, self.dtype = padding_idx, dtype

    @property
    def head(self) -> QuantLinear:
        return self._head

    @property
    def weight(self) -> torch.Tensor:
        """The whole dequantized table (a new tensor; for code that reads ``embedding.weight``)."""
        return self._head.dequantize(self.dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ids must be int32 or int64 token ids, got {ids.dtype}")
        rows = self._head._layout.dequantize_rows(self._head, ids.reshape(-1).long(), self.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def _apply(self, fn, recurse=True):
        # model.to(dtype) / .half() / .bfloat16(): the looked-up rows follow, as an nn.Embedding's weight would
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        return super()._apply(fn, recurse)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # a state_dict of this model (its dequantized table) loads back as a no-op; any other table is refused
        w = state_dict.get(prefix + "weight")
        if w is not None and not (w.shape == (self.num_embeddings, self.embedding_dim) and
                                  torch.equal(w.to(self.dtype), self.weight)):
            error_msgs.append(f"{prefix}weight: a QuantEmbedding reads its rows from the output head's codes and "
                              "takes no other weight; load into the float model, then quantize_(..., "
                              "embedding_from_head=True)")

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows from the output head ({self._head.scheme!r})"
