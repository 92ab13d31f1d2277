"""Decode attention: one query per sequence over a KV cache (public function and fake kernel).

Semantics: :mod:`qkernels.reference.attention`. :func:`qkernels.generate.register_decode_attention` plugs it into
transformers as an attention implementation for compiled single-token decoding.
"""

from __future__ import annotations

import math

import torch

from .. import _ext
from ._call import call
from ._validate import FLOAT_DTYPES, check_same_device, check_tensor


def decode_attention(q, k, v, mask=None, scale=None, *, backend=None):
    """Attention of one query per sequence ``q [B, H, D]`` over ``k, v [B, KVH, L, D]`` (``H % KVH == 0``), with an
    additive float ``mask [B, L]`` whose -inf / lowest-value positions are skipped; ``scale`` defaults to
    ``1 / sqrt(D)``. Returns ``[B, H, D]`` in q's dtype (fp32 math)."""
    check_tensor(q, "q", FLOAT_DTYPES, dim=3)
    check_tensor(k, "k", FLOAT_DTYPES, dim=4)
    check_tensor(v, "v", FLOAT_DTYPES, dim=4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must have the same dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, H, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k must be [batch={B}, kv_heads, length, head_dim={D}], got {tuple(k.shape)}")
    if k.shape[1] == 0 or H % k.shape[1]:
        raise ValueError(f"q's heads ({H}) must be a multiple of k's kv_heads ({k.shape[1]})")
    if mask is not None:
        check_tensor(mask, "mask", FLOAT_DTYPES, dim=2)
        if tuple(mask.shape) != (B, k.shape[2]):
            raise ValueError(f"mask must be [batch, length] = {(B, k.shape[2])}, got {tuple(mask.shape)}")
        check_same_device("q", q, "mask", mask)
    check_same_device("q", q, "k", k)
    check_same_device("q", q, "v", v)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return call("decode_attention", (q, k, v, mask, scale), q.device, backend)


if _ext.HAS_C:

    @torch.library.register_fake("qkernels::decode_attention")
    def _(q, k, v, mask, scale):
        return q.new_empty(q.shape)
