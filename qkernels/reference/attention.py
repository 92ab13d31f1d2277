"""Decode attention: one query per sequence over a KV cache, the single-token step of a decoder.

``decode_attention(q [B, H, D], k [B, KVH, L, D], v [B, KVH, L, D], mask [B, L] or None, scale)`` with grouped-query
heads (query head ``h`` reads kv head ``h // (H // KVH)``) and an additive float mask: position ``l`` is *closed* when
``mask[b, l]`` is -inf or the mask dtype's lowest finite value (what transformers' masks put on positions a query
must not see); closed positions are left out of the softmax. In fp32:

    s[b, h, l] = scale * (q[b, h] . k[b, h // G, l]) + mask[b, l]     over the open positions l
    out[b, h]  = sum_l softmax_l(s[b, h, :]) * v[b, h // G, l]         (zeros if no position is open)

cast to q's dtype; a NaN score at an open position makes its head's row NaN, as in a softmax. Closed positions of k
and v are never read (a static cache's unused slots may hold anything). Leaving closed positions out equals adding
the lowest value (their softmax weight underflows to exactly 0 in fp32) whenever some position is open; a sequence
with none (or a head whose scores are all -inf) gets zeros instead of the uniform average (or NaN) an additive mask
would give.
"""

from __future__ import annotations

import torch


def closed_positions(mask: torch.Tensor) -> torch.Tensor:
    """Bool [B, L]: the positions ``mask`` closes (-inf or its dtype's lowest value)."""
    return mask.float() <= float(torch.finfo(mask.dtype).min) if mask.dtype != torch.float64 else mask == -torch.inf


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, scale: float) -> torch.Tensor:
    B, H, D = q.shape
    KVH, L = k.shape[1], k.shape[2]
    G = H // KVH
    qf = q.float().reshape(B, KVH, G, D)
    kf, vf = k.float(), v.float()
    if mask is not None:  # closed positions are never read: whatever a cache holds there (NaN, inf) stays out
        closed = closed_positions(mask)
        kf = kf.masked_fill(closed[:, None, :, None], 0)
        vf = vf.masked_fill(closed[:, None, :, None], 0)
    s = torch.einsum("bkgd,bkld->bkgl", qf, kf) * scale
    if mask is not None:
        s = (s + mask.float()[:, None, None, :]).masked_fill(closed[:, None, None, :], -torch.inf)
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx)  # no open position: every weight 0 below
    p = torch.exp(s - mx)
    denom = p.sum(-1, keepdim=True)
    out = torch.einsum("bkgl,bkld->bkgd", p, vf)
    # no weight at all (no open position, or every score -inf): zeros; a NaN score (NaN denominator) stays NaN, as in
    # a softmax
    none = denom == 0
    out = torch.where(none, torch.zeros_like(out), out / torch.where(none, torch.ones_like(denom), denom))
    return out.reshape(B, H, D).to(q.dtype)
