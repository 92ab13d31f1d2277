"""GGUF / llama.cpp block formats in plain PyTorch: the specification of the ``gguf_*`` ops.

Layouts follow ggml's ``block_*`` structs byte for byte (ggml/src/ggml-common.h); a row of ``cols`` values is
``cols / block_size`` consecutive blocks of ``type_size`` bytes, all little-endian:

==========  =====  =====  ==============================================================================
type        block  bytes  layout
==========  =====  =====  ==============================================================================
Q4_0        32     18     fp16 d | 16 B nibbles (elem j low, elem j+16 high); w = d * (q - 8)
Q4_1        32     20     fp16 d | fp16 m | 16 B nibbles; w = d * q + m
Q5_0        32     22     fp16 d | u32 qh (bit j = 5th bit of elem j) | 16 B nibbles; w = d * (q - 16)
Q5_1        32     24     fp16 d | fp16 m | u32 qh | 16 B nibbles; w = d * q + m
Q8_0        32     34     fp16 d | 32 x int8; w = d * q
MXFP4       32     17     e8m0 e | 16 B e2m1 nibbles; w = 2^(e-128) * (2 * e2m1 value)
Q2_K        256    84     16 B scales (4-bit scale | 4-bit min <<4) | 64 B 2-bit quants | fp16 d | fp16 dmin
Q3_K        256    110    32 B hmask | 64 B 2-bit quants | 12 B 6-bit scales | fp16 d; w = d*(sc-32)*(q-4)
Q4_K        256    144    fp16 d | fp16 dmin | 12 B 6-bit scales+mins (8 sub-blocks of 32) | 128 B nibbles
Q5_K        256    176    fp16 d | fp16 dmin | 12 B scales+mins | 32 B high bits | 128 B nibbles
Q6_K        256    210    128 B low nibbles | 64 B high 2 bits | 16 x int8 scales | fp16 d; w = d*sc*(q-32)
F32/F16/BF16  1    4/2/2  plain values
==========  =====  =====  ==============================================================================

Encoders reproduce llama.cpp's reference quantizers (ggml-quants.c: ``quantize_row_*_ref`` and, with an
importance matrix, ``quantize_row_*_impl``): the same search (make_qkx2_quants, make_qkx3_quants, make_qx_quants,
make_q3_quants, make_qp_quants) with the same float32 operation order, so the bytes are identical. That is why the
per-block sums below are explicit left-to-right loops over the block (vectorized over all blocks at once) rather
than ``torch.sum`` (whose reduction order differs). For the types gguf-py can quantize (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, MXFP4) the bytes also equal ``gguf.quants.quantize``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch

# The ggml types qkernels implements (ids, block sizes, byte sizes, header fields, which backend implements which
# op): GGML_TYPES below, after the encoders and decoders it names. TYPES / TYPE_NAMES / BLOCK are derived from it.
QK_K = 256
GROUP_MAX_EPS = 1e-15
_F32 = np.float32
KVALUES_MXFP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # 2 * e2m1


def row_bytes(type: int, cols: int) -> int:
    bs, ts = BLOCK[type]
    return cols // bs * ts


# ---- helpers: float32 ops in C order ------------------------------------------------------------------------


def _seqsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the last dim left to right starting from +0.0f, like ``float s = 0; for (...) s += t[i];``."""
    acc = torch.zeros(t.shape[:-1], dtype=t.dtype, device=t.device)
    for i in range(t.shape[-1]):
        acc = acc + t[..., i]
    return acc


def _nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's nearest_int: round half to even (valid for |v| < 2^22), as int32."""
    return torch.round(v).to(torch.int32)


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 [n] -> fp16 (round to nearest even, like GGML_FP32_TO_FP16) -> uint8 [n, 2] little-endian."""
    return v.to(torch.float16).reshape(-1, 1).view(torch.uint8)


def _fp16_value(v: torch.Tensor) -> torch.Tensor:
    """float32 -> fp16 -> float32: what a decoder reads back from the stored d."""
    return v.to(torch.float16).to(torch.float32)


def _read_fp16(b: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 2] -> float32 [n]."""
    return b.contiguous().view(torch.float16).reshape(-1).to(torch.float32)


def _abs_argmax_value(x: torch.Tensor):
    """(amax, max): largest |x| over the last dim and the signed value at its FIRST occurrence (ggml's strict >)."""
    ax = x.abs()
    idx = ax.argmax(dim=-1, keepdim=True)
    amax, mx = ax.gather(-1, idx).squeeze(-1), x.gather(-1, idx).squeeze(-1)
    # ggml starts from max = +0.0f: an all-(+-)zero block gives +0 even if x[0] is -0 (gguf-py would give -0 there)
    return amax, torch.where(amax > 0, mx, torch.zeros_like(mx))


def _pack_nibbles_halves(q: torch.Tensor) -> torch.Tensor:
    """[nb, 2h] values < 16 -> [nb, h] bytes: element j in the low nibble, element j + h in the high nibble."""
    h = q.shape[-1] // 2
    return (q[..., :h] | (q[..., h:] << 4)).to(torch.uint8)


def _pack_bits_u32(bits: torch.Tensor) -> torch.Tensor:
    """[nb, 32] of 0/1 -> [nb, 4] uint8: bit j of the little-endian u32 is element j."""
    w = (bits.to(torch.int64) << torch.arange(32, dtype=torch.int64, device=bits.device)).sum(-1)
    return torch.stack([(w >> (8 * i)) & 0xFF for i in range(4)], dim=-1).to(torch.uint8)


def _pack_2bit_k(L: torch.Tensor) -> torch.Tensor:
    """Q2_K/Q3_K quant layout: per 128 values, byte l holds elems l, l+32, l+64, l+96 in bits 0-1, 2-3, 4-5, 6-7."""
    nb = L.shape[0]
    L = L.reshape(nb, 2, 4, 32)
    out = L[:, :, 0] | (L[:, :, 1] << 2) | (L[:, :, 2] << 4) | (L[:, :, 3] << 6)
    return out.reshape(nb, 64).to(torch.uint8)


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins -> 12 bytes (ggml get_scale_min_k4 layout)."""
    ls = ls.to(torch.int32)
    lm = lm.to(torch.int32)
    b = torch.zeros(ls.shape[0], 12, dtype=torch.int32, device=ls.device)
    b[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    b[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    b[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return (b & 0xFF).to(torch.uint8)


def _unpack_scale_min_k4(b: torch.Tensor):
    b = b.to(torch.int32)
    sc = torch.cat([b[:, 0:4] & 63, (b[:, 8:12] & 0xF) | ((b[:, 0:4] >> 6) << 4)], dim=1)
    mn = torch.cat([b[:, 4:8] & 63, (b[:, 8:12] >> 4) | ((b[:, 4:8] >> 6) << 4)], dim=1)
    return sc, mn


def _pack_q3_scales(l: torch.Tensor) -> torch.Tensor:
    """16 six-bit values (already +32) -> 12 bytes (Q3_K layout)."""
    l = l.to(torch.int32)
    b = torch.zeros(l.shape[0], 12, dtype=torch.int32, device=l.device)
    b[:, 0:8] = (l[:, 0:8] & 0xF) | ((l[:, 8:16] & 0xF) << 4)
    hi = l >> 4
    b[:, 8:12] = hi[:, 0:4] | (hi[:, 4:8] << 2) | (hi[:, 8:12] << 4) | (hi[:, 12:16] << 6)
    return b.to(torch.uint8)


def _unpack_q3_scales(b: torch.Tensor) -> torch.Tensor:
    b = b.to(torch.int32)
    lo = torch.cat([b[:, 0:8] & 0xF, b[:, 0:8] >> 4], dim=1)
    hi = torch.cat([(b[:, 8:12] >> (2 * k)) & 3 for k in range(4)], dim=1)
    return (lo | (hi << 4)) - 32


def _sqrtf(t: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 sqrt (sqrtf). torch's vectorized float32 sqrt is not always; through float64 it is."""
    return torch.sqrt(t.double()).float()


def _pos_max(t: torch.Tensor) -> torch.Tensor:
    """``float m = 0; for (...) if (t[i] > m) m = t[i];``: the max over the last dim, but +0 when nothing is > 0."""
    m = t.amax(-1)
    return torch.where(m > 0, m, torch.zeros_like(m))


def _rdiv(c, t: torch.Tensor) -> torch.Tensor:
    """``c / t`` correctly rounded. (``python_scalar / tensor`` is ``reciprocal(t) * c`` in torch: two roundings.)"""
    return torch.full_like(t, float(c)).div(t)


# ---- llama.cpp's scale searches, vectorized over blocks -----------------------------------------------------


def _make_qkx(x, w, nmax, rmin, rdelta, nstep, use_mad):
    """make_qkx2_quants / make_qkx3_quants (identical once the weights are given): x, w [B, n] float32.
    Returns (scale [B], the_min [B] (>= 0, subtracted), L [B, n] int32)."""
    n = x.shape[1]
    mn = x[:, 0].clone()
    mx = x[:, 0].clone()
    sum_w = w[:, 0].clone()
    sum_x = sum_w * x[:, 0]
    for i in range(1, n):
        xi = x[:, i]
        mn = torch.where(xi < mn, xi, mn)
        mx = torch.where(xi > mx, xi, mx)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * xi
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    mn0 = mn
    flat = mx <= mn  # qkx2 tests max == min; with min <= max after clamping min to 0 both mean the same
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    iscale = _rdiv(nmax, rng)
    scale = _rdiv(1, iscale)
    xm = x - mn[:, None]
    L = _nearest_int(iscale[:, None] * xm).clamp(0, nmax)

    def err(sc, m, Lq):
        diff = sc[:, None] * Lq.to(torch.float32) + m[:, None] - x
        diff = diff.abs() if use_mad else diff * diff
        return _seqsum(w * diff)

    best = err(scale, mn, L)
    for s in range(nstep + 1):
        c = _F32(rmin) + _F32(rdelta) * _F32(s) + _F32(nmax)
        # llama.cpp re-reads min inside the loop: once a step wins, later steps search around the new min
        rng = torch.where(flat, torch.ones_like(mx), mx - mn)
        iscale = _rdiv(c, rng)
        La = _nearest_int(iscale[:, None] * (x - mn[:, None])).clamp(0, nmax)
        lf = La.to(torch.float32)
        wl = w * lf
        sum_l = _seqsum(wl)
        sum_l2 = _seqsum(wl * lf)
        sum_xl = _seqsum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / torch.where(sum_l2 == 0, torch.ones_like(sum_l2), sum_l2), this_scale)
        cur = err(this_scale, this_min, La)
        upd = ok & (cur < best)
        L = torch.where(upd[:, None], La, L)
        best = torch.where(upd, cur, best)
        scale = torch.where(upd, this_scale, scale)
        mn = torch.where(upd, this_min, mn)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    mn = torch.where(flat, mn0, mn)
    return scale, -mn, L


def _make_qx(x, nmax, qw=None):
    """make_qx_quants with rmse_type 1 (weights x^2, or the importance weights qw): x [B, n].
    Returns (scale [B], L [B, n] int32 in [0, 2*nmax - 1])."""
    amax, mx = _abs_argmax_value(x)
    zero = amax < GROUP_MAX_EPS
    mxs = torch.where(zero, torch.ones_like(mx), mx)
    w = qw if qw is not None else x * x
    wx = w * x

    def trial(iscale):
        l = _nearest_int(iscale[:, None] * x).clamp(-nmax, nmax - 1)
        lf = l.to(torch.float32)
        return l, _seqsum(wx * lf), _seqsum(w * lf * lf)

    iscale = _rdiv(-nmax, mxs)
    l, sumlx, suml2 = trial(iscale)
    L = l + nmax
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 == 0, torch.ones_like(suml2), suml2),
                        torch.zeros_like(sumlx))
    best = scale * sumlx
    for s in range(-9, 10):
        if s == 0:
            continue
        c = -(_F32(nmax) + _F32(0.1) * _F32(s))
        l, sumlx, suml2 = trial(_rdiv(c, mxs))
        upd = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        L = torch.where(upd[:, None], l + nmax, L)
        scale = torch.where(upd, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), scale)
        best = torch.where(upd, scale * sumlx, best)
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def _make_q3(x, nmax):
    """make_q3_quants(do_rmse=true): least-squares scale with 5 coordinate-descent sweeps. x [B, n]."""
    B, n = x.shape
    amax, mx = _abs_argmax_value(x)
    zero = amax < GROUP_MAX_EPS
    mxs = torch.where(zero, torch.ones_like(mx), mx)
    iscale = _rdiv(-nmax, mxs)
    L = _nearest_int(iscale[:, None] * x).clamp(-nmax, nmax - 1)
    w = x * x
    wx = w * x
    lf = L.to(torch.float32)
    sumlx = _seqsum(wx * lf)
    suml2 = _seqsum(w * lf * lf)
    # a sweep that changes nothing leaves the state as it was, so running all 5 sweeps on every block equals
    # llama.cpp's early exit
    for _ in range(5):
        for i in range(n):
            xi, wi, wxi = x[:, i], w[:, i], wx[:, i]
            Li = L[:, i].to(torch.float32)
            slx = sumlx - wxi * Li
            sl2 = suml2 - wi * Li * Li
            go = slx > 0
            new_l = _nearest_int(xi * sl2 / torch.where(go, slx, torch.ones_like(slx))).clamp(-nmax, nmax - 1)
            nl = new_l.to(torch.float32)
            go = go & (new_l != L[:, i])
            slx2 = slx + wxi * nl
            sl22 = sl2 + wi * nl * nl
            acc = go & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = torch.where(acc, new_l, L[:, i])
            sumlx = torch.where(acc, slx2, sumlx)
            suml2 = torch.where(acc, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(sumlx))
    L = torch.where(zero[:, None], torch.zeros_like(L), L + nmax)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


def _make_qp(x, nmax, qw):
    """make_qp_quants: unsigned codes in [0, nmax] for non-negative x [B, n] with weights qw; returns (scale, L)."""
    B, n = x.shape
    mx = torch.zeros(B, device=x.device)
    for i in range(n):
        mx = torch.maximum(mx, x[:, i])
    zero = mx < GROUP_MAX_EPS
    mxs = torch.where(zero, torch.ones_like(mx), mx)
    iscale = _rdiv(nmax, mxs)
    L = _nearest_int(iscale[:, None] * x)
    scale = _rdiv(1, iscale)
    d = x - scale[:, None] * L.to(torch.float32)
    best = _seqsum(qw * d * d)
    for s in range(-4, 5):
        if s == 0:
            continue
        isc = _rdiv(_F32(0.1) * _F32(s) + _F32(nmax), mxs)
        sc = _rdiv(1, isc)
        l = _nearest_int(isc[:, None] * x).clamp(max=nmax)
        d = x - sc[:, None] * l.to(torch.float32)
        mse = _seqsum(qw * d * d)
        upd = mse < best
        best = torch.where(upd, mse, best)
        iscale = torch.where(upd, isc, iscale)
    L = _nearest_int(iscale[:, None] * x).clamp(max=nmax)
    lf = L.to(torch.float32)
    sumlx = _seqsum(qw * x * lf)
    suml2 = _seqsum(qw * lf * lf)
    for _ in range(5):
        for i in range(n):
            wi, xi = qw[:, i], x[:, i]
            Li = L[:, i].to(torch.float32)
            slx = sumlx - wi * xi * Li
            sl2 = suml2 - wi * Li * Li
            go = (slx > 0) & (sl2 > 0)
            new_l = _nearest_int(xi * sl2 / torch.where(go, slx, torch.ones_like(slx))).clamp(max=nmax)
            nl = new_l.to(torch.float32)
            go = go & (new_l != L[:, i])
            slx2 = slx + wi * xi * nl
            sl22 = sl2 + wi * nl * nl
            acc = go & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            L[:, i] = torch.where(acc, new_l, L[:, i])
            sumlx = torch.where(acc, slx2, sumlx)
            suml2 = torch.where(acc, sl22, suml2)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)),
                        torch.zeros_like(sumlx))
    L = torch.where(zero[:, None], torch.zeros_like(L), L)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, L


# ---- code fields: unsigned codes L [nb, block] int32 -> the block's quant bytes (shared by the encoders and by
# pack_codes, which writes codes chosen elsewhere, e.g. by GPTQ, under an encoder's header) ------------------------


def _codes_q4_k(L):
    return [torch.cat([_pack_nibbles_halves(L[:, 64 * j:64 * (j + 1)]) for j in range(4)], 1)]


def _codes_q5_k(L):
    """[qh 32 B (bit 2j / 2j+1 of byte l: 5th bit of elem 64j + l / 64j + 32 + l), qs 128 B]."""
    nb = L.shape[0]
    Lr = L.reshape(nb, 4, 2, 32)
    hi = (Lr >> 4) & 1
    qh = torch.zeros(nb, 32, dtype=torch.int32, device=L.device)
    for n in range(4):
        qh = qh | (hi[:, n, 0] << (2 * n)) | (hi[:, n, 1] << (2 * n + 1))
    ql = Lr & 0xF
    qs = torch.cat([(ql[:, n, 0] | (ql[:, n, 1] << 4)) for n in range(4)], 1)
    return [qh.to(torch.uint8), qs.to(torch.uint8)]


def _codes_q6_k(L):
    """[ql 128 B, qh 64 B] for codes in [0, 63] (value = code - 32)."""
    L = L.reshape(L.shape[0], 2, 4, 32)
    ql = torch.cat([torch.cat([(L[:, h, 0] & 0xF) | ((L[:, h, 2] & 0xF) << 4),
                               (L[:, h, 1] & 0xF) | ((L[:, h, 3] & 0xF) << 4)], 1) for h in range(2)], 1)
    qh = torch.cat([(L[:, h, 0] >> 4) | ((L[:, h, 1] >> 4) << 2) | ((L[:, h, 2] >> 4) << 4) | ((L[:, h, 3] >> 4) << 6)
                    for h in range(2)], 1)
    return [ql.to(torch.uint8), qh.to(torch.uint8)]


def _codes_q3_k(L):
    """[hmask 32 B, qs 64 B] for codes in [0, 7] (value = code - 4; the high bit goes to hmask)."""
    nb = L.shape[0]
    high = (L > 3).to(torch.int32)
    hm = high.reshape(nb, 8, 32)
    hmask = torch.zeros(nb, 32, dtype=torch.int32, device=L.device)
    for k in range(8):
        hmask = hmask | (hm[:, k] << k)
    return [hmask.to(torch.uint8), _pack_2bit_k(L - 4 * high)]


# ---- encoders: blocks [nb, block] float32 -> [nb, type_size] uint8 ------------------------------------------


def _enc_q8_0(b, qw=None):
    amax = b.abs().amax(-1)
    d = amax / 127
    idv = torch.where(d != 0, _rdiv(1, torch.where(d != 0, d, torch.ones_like(d))), torch.zeros_like(d))
    v = b * idv[:, None]
    a = v.abs()
    fl = torch.floor(a)
    q = torch.sign(v) * (fl + torch.floor(2 * (a - fl)))  # roundf: half away from zero, exactly
    return torch.cat([_fp16_bytes(d), q.to(torch.int8).view(torch.uint8)], 1)


def _enc_sym(b, nmax):
    """Q4_0 (nmax 8) / Q5_0 (nmax 16): d = max / -nmax, q = min(2nmax-1, trunc(x/d + nmax + 0.5))."""
    _, mx = _abs_argmax_value(b)
    d = mx / -nmax
    idv = torch.where(d != 0, _rdiv(1, torch.where(d != 0, d, torch.ones_like(d))), torch.zeros_like(d))
    q = torch.trunc(b * idv[:, None] + (nmax + 0.5)).to(torch.int32).clamp(0, 2 * nmax - 1)
    return d, q


def _enc_asym(b, nmax):
    """Q4_1 (15) / Q5_1 (31): d = (max - min) / nmax, q = min(nmax, trunc((x - min)/d + 0.5))."""
    # first occurrence, like ggml's strict-compare loop (only the sign of zero in all-zero blocks depends on it)
    mn = b.gather(-1, b.argmin(-1, keepdim=True)).squeeze(-1)
    mx = b.gather(-1, b.argmax(-1, keepdim=True)).squeeze(-1)
    d = (mx - mn) / nmax
    idv = torch.where(d != 0, _rdiv(1, torch.where(d != 0, d, torch.ones_like(d))), torch.zeros_like(d))
    q = torch.trunc((b - mn[:, None]) * idv[:, None] + 0.5).to(torch.int32).clamp(0, nmax)
    return d, mn, q


def _enc_q4_0(b, qw=None):
    d, q = _enc_sym(b, 8)
    return torch.cat([_fp16_bytes(d), _pack_nibbles_halves(q)], 1)


def _enc_q5_0(b, qw=None):
    d, q = _enc_sym(b, 16)
    return torch.cat([_fp16_bytes(d), _pack_bits_u32(q >> 4), _pack_nibbles_halves(q & 0xF)], 1)


def _enc_q4_1(b, qw=None):
    d, mn, q = _enc_asym(b, 15)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(mn), _pack_nibbles_halves(q)], 1)


def _enc_q5_1(b, qw=None):
    d, mn, q = _enc_asym(b, 31)
    return torch.cat([_fp16_bytes(d), _fp16_bytes(mn), _pack_bits_u32(q >> 4), _pack_nibbles_halves(q & 0xF)], 1)


def _e8m0_half(e: torch.Tensor) -> torch.Tensor:
    """ggml_e8m0_to_fp32_half: 2^(e - 128) as float32 (subnormal for e < 2)."""
    e = e.to(torch.int32)
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23)
    return bits.view(torch.float32)


def _enc_mxfp4(b, qw=None):
    amax = b.abs().amax(-1)
    # floorf(log2f(amax)): a correctly rounded float32 log2 (through float64), which is what log2f/np.log2 return
    # near powers of two (where an exact exponent would differ)
    lg = torch.floor(torch.log2(amax.double()).float())
    e = torch.where(amax > 0, lg - 2 + 127, torch.zeros_like(lg)).clamp(0, 255).to(torch.int32)
    d = _e8m0_half(e)
    kv = torch.tensor(KVALUES_MXFP4, dtype=torch.float32, device=b.device)
    err = (kv[None, None, :] * d[:, None, None] - b[:, :, None]).abs()
    q = err.argmin(-1).to(torch.int32)  # first minimum, like best_index_mxfp4's strict <
    return torch.cat([e.to(torch.uint8)[:, None], _pack_nibbles_halves(q)], 1)


def _q4k_q5k(b, nmax, qw):
    """Shared Q4_K/Q5_K search: returns (d bytes, dmin bytes, scales 12 B, L [nb, 256] codes in [0, nmax])."""
    nb = b.shape[0]
    x = b.reshape(nb * 8, 32)
    if qw is None:
        sum_x2 = _seqsum(x * x)
        av_x = _sqrtf(sum_x2 / 32)
        w = av_x[:, None] + x.abs()
        rmin, rdelta, nstep = (-1.0, 0.1, 20) if nmax == 15 else (-0.5, 0.1, 15)
        scales, mins, L = _make_qkx(x, w, nmax, rmin, rdelta, nstep, False)
        scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
        max_scale = _pos_max(scales)
        max_min = _pos_max(mins)
        inv_s = torch.where(max_scale > 0, _rdiv(63, torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale))),
                            torch.zeros_like(max_scale))
        inv_m = torch.where(max_min > 0, _rdiv(63, torch.where(max_min > 0, max_min, torch.ones_like(max_min))),
                            torch.zeros_like(max_min))
        ls = (_nearest_int(inv_s[:, None] * scales) & 0xFF).clamp(max=63)  # (uint8_t) then MIN(63, .)
        lm = (_nearest_int(inv_m[:, None] * mins) & 0xFF).clamp(max=63)
        dv, mv = max_scale / 63, max_min / 63
    else:
        sum_x2 = _seqsum(b * b)
        sigma2 = 2 * sum_x2 / QK_K
        qwb = qw.reshape(nb * 8, 32)
        s2 = sigma2.repeat_interleave(8)
        w = qwb * _sqrtf(s2[:, None] + x * x)
        sw = _seqsum(w).reshape(nb, 8)
        scales, mins, L = _make_qkx(x, w, nmax, -0.9, 0.05, 36, False)
        dv, ls = _make_qp(scales.reshape(nb, 8), 63, sw)
        mv, lm = _make_qp(mins.reshape(nb, 8), 63, sw)
        ls, lm = ls & 0xFF, lm & 0xFF  # uint8_t stores
        if nmax == 31:  # only the Q5_K path clamps (MIN(63, .)); Q4_K's codes are <= 63 by construction
            ls, lm = ls.clamp(max=63), lm.clamp(max=63)
    L = L.reshape(nb, 8, 32)
    sc_bytes = _pack_scale_min_k4(ls, lm)
    df, mf = _fp16_value(dv), _fp16_value(mv)
    d = df[:, None] * ls.to(torch.float32)
    dm = mf[:, None] * lm.to(torch.float32)
    ok = d != 0
    lq = _nearest_int((b.reshape(nb, 8, 32) + dm[..., None]) / torch.where(ok, d, torch.ones_like(d))[..., None])
    L = torch.where(ok[..., None], lq.clamp(0, nmax), L).reshape(nb, 256)
    return _fp16_bytes(dv), _fp16_bytes(mv), sc_bytes, L


def _enc_q4_k(b, qw=None):
    d, dmin, sc, L = _q4k_q5k(b, 15, qw)
    return torch.cat([d, dmin, sc, *_codes_q4_k(L)], 1)


def _enc_q5_k(b, qw=None):
    d, dmin, sc, L = _q4k_q5k(b, 31, qw)
    return torch.cat([d, dmin, sc, *_codes_q5_k(L)], 1)


def _enc_q6_k(b, qw=None):
    nb = b.shape[0]
    x = b.reshape(nb * 16, 16)
    scales, L = _make_qx(x, 32, qw.reshape(nb * 16, 16) if qw is not None else None)
    scales = scales.reshape(nb, 16)
    L = L.reshape(nb, 16, 16)
    max_abs, max_scale = _abs_argmax_value(scales)
    zero = max_abs < GROUP_MAX_EPS
    ms = torch.where(zero, torch.ones_like(max_scale), max_scale)
    iscale = _rdiv(-128, ms)
    dv = _rdiv(1, iscale)
    sc = _nearest_int(iscale[:, None] * scales).clamp(max=127)
    d = _fp16_value(dv)[:, None] * sc.to(torch.float32)
    ok = d != 0
    lq = _nearest_int(b.reshape(nb, 16, 16) / torch.where(ok, d, torch.ones_like(d))[..., None]).clamp(-32, 31) + 32
    L = torch.where(ok[..., None], lq, L).reshape(nb, 256)
    out = torch.cat([*_codes_q6_k(L), sc.to(torch.int8).view(torch.uint8), _fp16_bytes(dv)], 1)
    return torch.where(zero[:, None], torch.zeros_like(out), out)


def _enc_q3_k(b, qw=None):
    nb = b.shape[0]
    x = b.reshape(nb * 16, 16)
    if qw is None:
        scales, L = _make_q3(x, 4)
        scales = scales.reshape(nb, 16)
        _, max_scale = _abs_argmax_value(scales)
        has = max_scale != 0
        iscale = _rdiv(-32, torch.where(has, max_scale, torch.ones_like(max_scale)))
        l = _nearest_int(iscale[:, None] * scales).clamp(-32, 31) + 32
        l = torch.where(has[:, None], l, torch.zeros_like(l))
        sc_bytes = torch.where(has[:, None], _pack_q3_scales(l), torch.zeros(nb, 12, dtype=torch.uint8, device=b.device))
        dv = torch.where(has, _rdiv(1, iscale), torch.zeros_like(iscale))
    else:
        sum_x2 = _seqsum(b * b)
        sigma2 = 2 * sum_x2 / QK_K
        w = qw.reshape(nb * 16, 16) * _sqrtf(sigma2.repeat_interleave(16)[:, None] + x * x)
        sw = _seqsum(w).reshape(nb, 16)
        scales, L = _make_qx(x, 4, w)
        dv, Ls = _make_qx(scales.reshape(nb, 16), 32, sw)
        sc_bytes = _pack_q3_scales(Ls)
    sc = _unpack_q3_scales(sc_bytes)
    d = _fp16_value(dv)[:, None] * sc.to(torch.float32)
    ok = d != 0
    lq = _nearest_int(b.reshape(nb, 16, 16) / torch.where(ok, d, torch.ones_like(d))[..., None]).clamp(-4, 3) + 4
    L = torch.where(ok[..., None], lq, L.reshape(nb, 16, 16)).reshape(nb, 256)
    return torch.cat([*_codes_q3_k(L), sc_bytes, _fp16_bytes(dv)], 1)


def _enc_q2_k(b, qw=None):
    nb = b.shape[0]
    x = b.reshape(nb * 16, 16)
    if qw is None:
        scales, mins, L = _make_qkx(x, x.abs(), 3, -0.5, 0.1, 15, True)
        scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
        max_scale = _pos_max(scales)
        max_min = _pos_max(mins)
        hs, hm = max_scale > 0, max_min > 0
        isc = _rdiv(15, torch.where(hs, max_scale, torch.ones_like(max_scale)))
        ism = _rdiv(15, torch.where(hm, max_min, torch.ones_like(max_min)))
        ls = torch.where(hs[:, None], _nearest_int(isc[:, None] * scales), torch.zeros(nb, 16, dtype=torch.int32, device=b.device))
        lm = torch.where(hm[:, None], _nearest_int(ism[:, None] * mins), torch.zeros(nb, 16, dtype=torch.int32, device=b.device))
        byte = (ls | (lm << 4)) & 0xFF  # uint8 stores, like y[i].scales[j] = l; ... |= (l << 4)
        dv = torch.where(hs, max_scale / 15, torch.zeros_like(max_scale))
        mv = torch.where(hm, max_min / 15, torch.zeros_like(max_min))
    else:
        sum_x2 = _seqsum(b * b)
        sigma2 = sum_x2 / QK_K
        w = qw.reshape(nb * 16, 16) * _sqrtf(sigma2.repeat_interleave(16)[:, None] + x * x)
        # llama.cpp sums only the first QK_K/16 = 16 weights of each 16-block: the whole block
        sw = _seqsum(w).reshape(nb, 16)
        scales, mins, L = _make_qkx(x, w, 3, -0.9, 0.05, 36, False)
        dv, ls = _make_qp(scales.reshape(nb, 16), 15, sw)
        mv, lm = _make_qp(mins.reshape(nb, 16), 15, sw)
        byte = (ls | (lm << 4)) & 0xFF
    df, mf = _fp16_value(dv), _fp16_value(mv)
    d = df[:, None] * (byte & 0xF).to(torch.float32)
    dm = mf[:, None] * (byte >> 4).to(torch.float32)
    ok = d != 0
    lq = _nearest_int((b.reshape(nb, 16, 16) + dm[..., None]) / torch.where(ok, d, torch.ones_like(d))[..., None])
    L = torch.where(ok[..., None], lq.clamp(0, 3), L.reshape(nb, 16, 16)).reshape(nb, 256)
    return torch.cat([byte.to(torch.uint8), _pack_2bit_k(L), _fp16_bytes(dv), _fp16_bytes(mv)], 1)


# ---- decoders: [nb, type_size] uint8 -> [nb, block] float32 (same float ops as ggml / gguf-py) ---------------


def _nib(qs):
    """[nb, 16] bytes -> [nb, 32]: low nibbles then high nibbles."""
    q = qs.to(torch.int32)
    return torch.cat([q & 0xF, q >> 4], 1)


def _bits_u32(qh):
    w = qh.to(torch.int64)
    w = w[:, 0] | (w[:, 1] << 8) | (w[:, 2] << 16) | (w[:, 3] << 24)
    return ((w[:, None] >> torch.arange(32, device=w.device)) & 1).to(torch.int32)


def _dec_q4_0(b):
    return _read_fp16(b[:, 0:2])[:, None] * (_nib(b[:, 2:18]) - 8).to(torch.float32)


def _dec_q4_1(b):
    return _read_fp16(b[:, 0:2])[:, None] * _nib(b[:, 4:20]).to(torch.float32) + _read_fp16(b[:, 2:4])[:, None]


def _dec_q5_0(b):
    q = _nib(b[:, 6:22]) | (_bits_u32(b[:, 2:6]) << 4)
    return _read_fp16(b[:, 0:2])[:, None] * (q - 16).to(torch.float32)


def _dec_q5_1(b):
    q = _nib(b[:, 8:24]) | (_bits_u32(b[:, 4:8]) << 4)
    return _read_fp16(b[:, 0:2])[:, None] * q.to(torch.float32) + _read_fp16(b[:, 2:4])[:, None]


def _dec_q8_0(b):
    return b[:, 2:34].contiguous().view(torch.int8).to(torch.float32) * _read_fp16(b[:, 0:2])[:, None]


def _dec_mxfp4(b):
    kv = torch.tensor(KVALUES_MXFP4, dtype=torch.float32, device=b.device)
    return _e8m0_half(b[:, 0])[:, None] * kv[_nib(b[:, 1:17]).long()]


def _dec_q2_k(b):
    nb = b.shape[0]
    sc = b[:, 0:16].to(torch.int32)
    q = b[:, 16:80].to(torch.int32).reshape(nb, 2, 1, 32) >> (2 * torch.arange(4, device=b.device)).reshape(1, 1, 4, 1)
    q = (q & 3).reshape(nb, 16, 16).to(torch.float32)
    dl = _read_fp16(b[:, 80:82])[:, None] * (sc & 0xF).to(torch.float32)
    ml = _read_fp16(b[:, 82:84])[:, None] * (sc >> 4).to(torch.float32)
    return (dl[..., None] * q - ml[..., None]).reshape(nb, 256)


def _dec_q3_k(b):
    nb = b.shape[0]
    hm = b[:, 0:32].to(torch.int32)
    q = b[:, 32:96].to(torch.int32).reshape(nb, 2, 1, 32) >> (2 * torch.arange(4, device=b.device)).reshape(1, 1, 4, 1)
    q = (q & 3).reshape(nb, 256)
    h = ((hm[:, None, :] >> torch.arange(8, device=b.device)[None, :, None]) & 1).reshape(nb, 256)
    qv = (q - 4 * (1 - h)).reshape(nb, 16, 16).to(torch.float32)
    dl = _read_fp16(b[:, 108:110])[:, None] * _unpack_q3_scales(b[:, 96:108]).to(torch.float32)
    return (dl[..., None] * qv).reshape(nb, 256)


def _dec_q4_k(b):
    nb = b.shape[0]
    sc, mn = _unpack_scale_min_k4(b[:, 4:16])
    d = _read_fp16(b[:, 0:2])[:, None] * sc.to(torch.float32)
    m = _read_fp16(b[:, 2:4])[:, None] * mn.to(torch.float32)
    q = torch.cat([torch.stack([(b[:, 16 + 32 * j:48 + 32 * j].to(torch.int32) & 0xF),
                                (b[:, 16 + 32 * j:48 + 32 * j].to(torch.int32) >> 4)], 1) for j in range(4)], 1)
    return (d[..., None] * q.to(torch.float32) - m[..., None]).reshape(nb, 256)


def _dec_q5_k(b):
    nb = b.shape[0]
    sc, mn = _unpack_scale_min_k4(b[:, 4:16])
    d = _read_fp16(b[:, 0:2])[:, None] * sc.to(torch.float32)
    m = _read_fp16(b[:, 2:4])[:, None] * mn.to(torch.float32)
    qh = b[:, 16:48].to(torch.int32)
    parts = []
    for j in range(4):
        ql = b[:, 48 + 32 * j:80 + 32 * j].to(torch.int32)
        parts.append((ql & 0xF) | (((qh >> (2 * j)) & 1) << 4))
        parts.append((ql >> 4) | (((qh >> (2 * j + 1)) & 1) << 4))
    q = torch.stack(parts, 1).to(torch.float32)
    return (d[..., None] * q - m[..., None]).reshape(nb, 256)


def _dec_q6_k(b):
    nb = b.shape[0]
    ql = b[:, 0:128].to(torch.int32).reshape(nb, 2, 64)
    qh = b[:, 128:192].to(torch.int32).reshape(nb, 2, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    d = _read_fp16(b[:, 208:210])[:, None] * sc  # (d * sc) * q, like gguf-py and ggml
    q = torch.stack([(ql[:, :, 0:32] & 0xF) | ((qh & 3) << 4),
                     (ql[:, :, 32:64] & 0xF) | (((qh >> 2) & 3) << 4),
                     (ql[:, :, 0:32] >> 4) | (((qh >> 4) & 3) << 4),
                     (ql[:, :, 32:64] >> 4) | (((qh >> 6) & 3) << 4)], 2) - 32  # [nb, 2, 4, 32]
    q = q.reshape(nb, 16, 16).to(torch.float32)
    return (d[..., None] * q).reshape(nb, 256)




def _enc_float(dtype):
    """F32 / F16 / BF16 as blocks of one value: [nb, 1] float32 -> [nb, bytes] uint8 (RNE cast)."""
    return lambda b, qw=None: b.to(dtype).contiguous().view(torch.uint8).clone()


def _dec_float(dtype):
    return lambda b: b.contiguous().view(dtype).to(torch.float32)


# ---- the type table: the one source of every per-type list in qkernels --------------------------------------
#
# Derived from it: TYPES / TYPE_NAMES / BLOCK here, the argument checks and overflow bounds of qkernels.ops.gguf,
# the header checks of qkernels.formats.gguf, the backend choice of qkernels.dispatch (through each backend's
# declaration: qkernels.triton.has_kernel), the Triton decoder's type list and quant offsets. The C++ kernels keep
# their own switch (csrc/include/qkernels/gguf.h QK_GGUF_TYPES, csrc/cpu/gguf_encode.h encode_block);
# tests/test_format_tables.py checks that they accept exactly the types listed here with these sizes.

OPS = ("gguf_quantize", "gguf_dequantize", "gguf_mm")
_ALL = {"cpu": OPS}  # the C++ CPU kernels implement every op for every type
_BLOCKS = {"cpu": OPS, "triton": ("gguf_dequantize", "gguf_mm")}  # + the Triton decoder (qkernels/triton/gguf.py)
FP16_MAX = 65504.0


@dataclass(frozen=True)
class GGMLType:
    """One ggml tensor type as qkernels implements it.

    ``encode``: blocks float32 ``[nb, block]`` (and importance weights ``[nb, block]`` or None) -> uint8
    ``[nb, size]``; ``decode``: uint8 ``[nb, size]`` -> float32 ``[nb, block]``.
    ``fp16_fields``: byte offsets of the fp16 block fields (d, and m / dmin), which must be finite (checked after
    encoding and when a file is loaded). ``quant_offset``: byte offset of the (low) quant bits in a block (where the
    Triton decoder reads the codes). ``max_abs``: the largest ``|x|`` the encoder can represent (see below), None
    where only float32's range limits it. ``imatrix``: what an importance matrix does: "weights" (the K-quant scale
    searches weight by it, per ``imatrix_sub_block`` columns), "ignored" (as in llama.cpp) or "unimplemented"
    (llama.cpp runs a weighted search for these that qkernels does not implement: refused).
    ``kernels``: backend -> the ``gguf_*`` ops it implements for this type (the reference implements all)."""

    name: str
    id: int
    block: int
    size: int
    encode: Callable
    decode: Callable
    fp16_fields: tuple[int, ...] = ()
    quant_offset: int | None = None
    max_abs: float | None = None
    imatrix: str = "ignored"
    imatrix_sub_block: int | None = None
    kernels: Mapping[str, tuple[str, ...]] = field(default_factory=lambda: dict(_ALL))


# max_abs: ggml stores block scales (and Q4_1/Q5_1 block minima, K-quant super-block scales and mins) as fp16, and
# llama.cpp (like gguf-py) writes inf there for larger inputs, which decodes to inf / NaN. The bound is 65504 times
# the factor between a block's largest |x| and its largest fp16 field: the code range for Q4_0 (8), Q5_0 (16), Q8_0
# (127); 1 for the stored minima of Q4_1/Q5_1 and the values of F16; the 6-bit (Q4_K, Q5_K: 63) or 4-bit (Q2_K: 15)
# super-block quantization of the sub-block minima; for Q3_K / Q6_K the sub-block scale search (which can pick
# scale = max / 1 in the worst case) times the signed sub-scale range (32 / 128). Beyond these the K-quant searches
# also overflow float32 (sums of x^2) and the C++ and reference encoders part. Inputs within the bound are still
# checked after encoding (fp16_fields), since the scale searches can round a block's scale a little above it.
GGML_TYPES = (
    GGMLType("F32", 0, 1, 4, _enc_float(torch.float32), _dec_float(torch.float32)),
    GGMLType("F16", 1, 1, 2, _enc_float(torch.float16), _dec_float(torch.float16), max_abs=FP16_MAX),
    GGMLType("Q4_0", 2, 32, 18, _enc_q4_0, _dec_q4_0, (0,), 2, 8 * FP16_MAX, "unimplemented", kernels=_BLOCKS),
    GGMLType("Q4_1", 3, 32, 20, _enc_q4_1, _dec_q4_1, (0, 2), 4, FP16_MAX, "unimplemented", kernels=_BLOCKS),
    GGMLType("Q5_0", 6, 32, 22, _enc_q5_0, _dec_q5_0, (0,), 6, 16 * FP16_MAX, "unimplemented", kernels=_BLOCKS),
    GGMLType("Q5_1", 7, 32, 24, _enc_q5_1, _dec_q5_1, (0, 2), 8, FP16_MAX, "unimplemented", kernels=_BLOCKS),
    GGMLType("Q8_0", 8, 32, 34, _enc_q8_0, _dec_q8_0, (0,), 2, 127 * FP16_MAX, kernels=_BLOCKS),
    GGMLType("Q2_K", 10, 256, 84, _enc_q2_k, _dec_q2_k, (80, 82), 16, 15 * FP16_MAX, "weights", 16, _BLOCKS),
    GGMLType("Q3_K", 11, 256, 110, _enc_q3_k, _dec_q3_k, (108,), 32, 32 * FP16_MAX, "weights", 16, _BLOCKS),
    GGMLType("Q4_K", 12, 256, 144, _enc_q4_k, _dec_q4_k, (0, 2), 16, 63 * FP16_MAX, "weights", 32, _BLOCKS),
    GGMLType("Q5_K", 13, 256, 176, _enc_q5_k, _dec_q5_k, (0, 2), 48, 63 * FP16_MAX, "weights", 32, _BLOCKS),
    GGMLType("Q6_K", 14, 256, 210, _enc_q6_k, _dec_q6_k, (208,), 0, 128 * FP16_MAX, "weights", 16, _BLOCKS),
    GGMLType("BF16", 30, 1, 2, _enc_float(torch.bfloat16), _dec_float(torch.bfloat16)),
    # e8m0 scale: no fp16 field; 2^127 * 12 exceeds float32, so float32's range is the bound
    GGMLType("MXFP4", 39, 32, 17, _enc_mxfp4, _dec_mxfp4, (), 1, kernels=_BLOCKS),
)
GGML = {t.id: t for t in GGML_TYPES}
TYPES = {t.name: t.id for t in GGML_TYPES}  # name -> ggml type id
TYPE_NAMES = {t.id: t.name for t in GGML_TYPES}
BLOCK = {t.id: (t.block, t.size) for t in GGML_TYPES}  # id -> (values per block, bytes per block)
ENCODERS = {t.id: t.encode for t in GGML_TYPES}
DECODERS = {t.id: t.decode for t in GGML_TYPES}
FP16_FIELDS = {t.id: t.fp16_fields for t in GGML_TYPES if t.fp16_fields}
MAX_ABS = {t.id: t.max_abs for t in GGML_TYPES if t.max_abs is not None}
# types whose llama.cpp quantizer uses an importance matrix (Q8_0 and MXFP4 ignore it there, and so do we)
IMATRIX_TYPES = tuple(t.id for t in GGML_TYPES if t.imatrix == "weights")


@functools.lru_cache(maxsize=None)  # the table is immutable; dispatch asks on every uncached decision
def types_with(backend: str, op: str) -> tuple[int, ...]:
    """The ggml type ids for which ``backend`` ("cpu", "triton") implements ``op`` (a name in :data:`OPS`)."""
    if op not in OPS:
        raise ValueError(f"op must be one of {OPS}, got {op!r}")
    return tuple(t.id for t in GGML_TYPES if op in t.kernels.get(backend, ()))


def describe_types(ids=None) -> str:
    """``"F32=0, F16=1, ..."``: how error messages list supported types (the C++ ops' messages use the same form)."""
    return ", ".join(f"{TYPE_NAMES[i]}={i}" for i in (TYPE_NAMES if ids is None else ids))


# ---- the ops -------------------------------------------------------------------------------------------------


def gguf_quantize(x: torch.Tensor, type: int, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """x: float [rows, cols] (cols a multiple of the block size); imatrix: float32 [cols] importance weights or None.
    Returns uint8 [rows, cols / block * type_size], row-major blocks exactly as ggml stores them."""
    rows, cols = x.shape
    bs, ts = BLOCK[type]
    xf = x.to(torch.float32).contiguous()
    nb = rows * cols // bs
    if nb == 0:
        return torch.empty(rows, cols // bs * ts, dtype=torch.uint8, device=x.device)
    blocks = xf.reshape(nb, bs)
    qw = None
    if imatrix is not None and type in IMATRIX_TYPES:
        qw = imatrix.to(torch.float32).reshape(1, cols).expand(rows, cols).reshape(nb, bs)
    return ENCODERS[type](blocks, qw).reshape(rows, cols // bs * ts)


def gguf_dequantize(data: torch.Tensor, type: int, rows: int, cols: int, out_dtype: torch.dtype) -> torch.Tensor:
    """data: uint8 [rows, cols / block * type_size] -> [rows, cols] in out_dtype (decoded in float32 first)."""
    bs, ts = BLOCK[type]
    nb = rows * cols // bs
    if nb == 0:
        return torch.empty(rows, cols, dtype=out_dtype, device=data.device)
    out = DECODERS[type](data.contiguous().reshape(nb, ts)).reshape(rows, cols)
    return out.to(out_dtype)


def gguf_mm(x: torch.Tensor, data: torch.Tensor, type: int, N: int, K: int) -> torch.Tensor:
    """x: float [M, K] @ dequant(data: uint8 [N, K / block * type_size])^T -> [M, N] in x's dtype (fp32 math)."""
    w = gguf_dequantize(data, type, N, K, torch.float32)
    return (x.to(torch.float32) @ w.t()).to(x.dtype)


# ---- the affine view of a block: w = scale * (code - offset) + bias ------------------------------------------
#
# Every type except MXFP4 (and the plain floats) decodes element i of a block as ``scale_i * (code_i - offset)`` plus
# (for the asymmetric types) ``bias_i``, with an unsigned integer code in ``[0, CODE_MAX]``: scale and bias come from
# the block header (for K-quants the super-block d/dmin times the 4/6/8-bit sub-block scale/min), so an algorithm
# may keep an encoder's header and choose the codes itself (GPTQ with the GGUF grid: qkernels.algorithms.gptq_gguf).

# type -> (offset, largest code, [(start, end) byte ranges of the code fields], fn(L) -> their bytes)
CODES = {
    2: (8, 15, [(2, 18)], lambda L: [_pack_nibbles_halves(L)]),
    3: (0, 15, [(4, 20)], lambda L: [_pack_nibbles_halves(L)]),
    6: (16, 31, [(2, 6), (6, 22)], lambda L: [_pack_bits_u32(L >> 4), _pack_nibbles_halves(L & 0xF)]),
    7: (0, 31, [(4, 8), (8, 24)], lambda L: [_pack_bits_u32(L >> 4), _pack_nibbles_halves(L & 0xF)]),
    8: (128, 255, [(2, 34)], lambda L: [(L - 128).to(torch.int8).view(torch.uint8)]),
    10: (0, 3, [(16, 80)], lambda L: [_pack_2bit_k(L)]),
    11: (4, 7, [(0, 32), (32, 96)], _codes_q3_k),
    12: (0, 15, [(16, 144)], _codes_q4_k),
    13: (0, 31, [(16, 48), (48, 176)], _codes_q5_k),
    14: (32, 63, [(0, 128), (128, 192)], _codes_q6_k),
}


def block_affine(blocks: torch.Tensor, type: int):
    """blocks: uint8 ``[nb, type_size]`` -> ``(scale [nb, block] f32, offset int, bias [nb, block] f32 or None)``
    such that ``scale * (code - offset) + bias`` (in float32, in that order) is bit-identical to the decoder's value
    for every code. Only the headers are read."""
    if type not in CODES:
        raise ValueError(f"{TYPE_NAMES.get(type, type)} blocks are not an affine grid of integer codes "
                         f"(supported: {[TYPE_NAMES[t] for t in CODES]})")
    nb = blocks.shape[0]
    bs = BLOCK[type][0]
    b = blocks
    off = CODES[type][0]

    def per(v, n):  # [nb, groups] -> [nb, block]: each sub-block value repeated over its n elements
        return v.repeat_interleave(n, dim=1)

    if type in (2, 6, 8):
        return _read_fp16(b[:, 0:2])[:, None].expand(nb, bs), off, None
    if type in (3, 7):
        return _read_fp16(b[:, 0:2])[:, None].expand(nb, bs), off, _read_fp16(b[:, 2:4])[:, None].expand(nb, bs)
    if type == 10:
        sc = b[:, 0:16].to(torch.int32)
        dl = _read_fp16(b[:, 80:82])[:, None] * (sc & 0xF).to(torch.float32)
        ml = _read_fp16(b[:, 82:84])[:, None] * (sc >> 4).to(torch.float32)
        return per(dl, 16), off, per(-ml, 16)
    if type == 11:
        dl = _read_fp16(b[:, 108:110])[:, None] * _unpack_q3_scales(b[:, 96:108]).to(torch.float32)
        return per(dl, 16), off, None
    if type in (12, 13):
        sc, mn = _unpack_scale_min_k4(b[:, 4:16])
        d = _read_fp16(b[:, 0:2])[:, None] * sc.to(torch.float32)
        m = _read_fp16(b[:, 2:4])[:, None] * mn.to(torch.float32)
        return per(d, 32), off, per(-m, 32)
    sc = b[:, 192:208].contiguous().view(torch.int8).to(torch.float32)
    return per(_read_fp16(b[:, 208:210])[:, None] * sc, 16), off, None


def affine_decode(scale: torch.Tensor, offset: int, bias, codes: torch.Tensor) -> torch.Tensor:
    """``scale * (codes - offset) + bias`` in float32 (the decoders' operation order)."""
    w = scale * (codes - offset).to(torch.float32)
    return w if bias is None else w + bias


def pack_codes(blocks: torch.Tensor, type: int, codes: torch.Tensor) -> torch.Tensor:
    """Copy of ``blocks`` (uint8 ``[nb, type_size]``) with the code fields replaced by ``codes`` (int ``[nb, block]``
    in ``[0, CODES[type][1]]``); the headers (scales, mins) are kept."""
    if type not in CODES:
        raise ValueError(f"{TYPE_NAMES.get(type, type)} has no integer code fields to pack")
    _, cmax, fields, fn = CODES[type]
    codes = codes.to(torch.int32)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > cmax):
        raise ValueError(f"codes must be in [0, {cmax}] for {TYPE_NAMES[type]}, got [{int(codes.min())}, "
                         f"{int(codes.max())}]")
    out = blocks.clone()
    for (a, e), v in zip(fields, fn(codes)):
        out[:, a:e] = v
    return out
