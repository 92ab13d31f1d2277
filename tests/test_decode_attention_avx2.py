"""The AVX2 decode attention kernel (csrc/cpu/attention_avx2.cpp) and the portable loops (QKERNELS_CPU_ISA=scalar,
via conftest's isa_pair): both against an fp64 oracle, over the shapes the register blocking splits on (odd head
dims, 1 to 9 query heads per kv head, batches, long caches, scattered masks), and the NaN / inf / fully closed
semantics of qkernels.reference.attention.

Tolerances (fp32 math, sums in another order than the oracle's): an fp32 output within 1e-5 of the fp64 oracle
relative to the weighted mean of |v| it averages (fp32 sums of up to a few thousand terms; one wrong or missing term
of 1500 would be off by ~1e-3);
a bf16 / fp16 output within 2^-7 / 2^-10 (one ulp at most) of the oracle rounded to that dtype, relative to that
value, plus the fp32 allowance above (1e-5 of the weighted mean of |v|): where the weighted values cancel, the output
is small next to the terms it sums, and the fp32 result may then be several of its own ulps from the oracle
(hypothesis found a bf16 output of 3e-6 two ulps off, with terms of magnitude ~1)."""

import math
from typing import NamedTuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qkernels import _ext
from qkernels.ops import decode_attention
from qkernels.reference.attention import decode_attention as ref_decode_attention

pytestmark = pytest.mark.skipif(not _ext.has_kernel("decode_attention", "CPU"), reason="qkernels._C not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _op(*args):
    return torch.ops.qkernels.decode_attention.default(*args)


class Exact(NamedTuple):
    out: torch.Tensor  # fp64 [B, H, D]
    mag: torch.Tensor  # fp64 [B, H, D]: sum_l p_l |v_l| / sum_l p_l


def _exact(q, k, v, mask, scale):
    """The op's semantics in fp64: closed positions (mask -inf or its dtype's lowest value) left out; a head with
    no weight at all gets zeros."""
    B, H, D = q.shape
    KVH = k.shape[1]
    G = H // KVH
    qf = q.double().reshape(B, KVH, G, D)
    kf, vf = k.double(), v.double()
    s = torch.einsum("bkgd,bkld->bkgl", qf, kf) * scale
    if mask is not None:
        lowest = -math.inf if mask.dtype == torch.float64 else torch.finfo(mask.dtype).min
        closed = mask.double() <= lowest
        s = (s + mask.double()[:, None, None, :]).masked_fill(closed[:, None, None, :], -math.inf)
        vf = vf.masked_fill(closed[:, None, :, None], 0)
    mx = s.amax(-1, keepdim=True)
    mx = torch.where(torch.isneginf(mx), torch.zeros_like(mx), mx)
    p = torch.exp(s - mx)
    denom = p.sum(-1, keepdim=True)
    out = torch.einsum("bkgl,bkld->bkgd", p, vf)
    out = torch.where(denom == 0, torch.zeros_like(out), out / torch.where(denom == 0, 1.0, denom))
    # the scale of each output's rounding errors: the weighted mean of |v| (an fp32 sum's error is relative to the
    # sum of its terms' magnitudes, not to the sum)
    mag = torch.einsum("bkgl,bkld->bkgd", p, vf.abs().nan_to_num(0.0)) / torch.where(denom == 0, 1.0, denom)
    return Exact(out.reshape(B, H, D), mag.reshape(B, H, D))


def assert_matches_exact(out, ex):
    """out [B, H, D] (fp32 / bf16 / fp16) against the fp64 oracle ``ex`` with the module docstring's tolerances."""
    assert torch.equal(torch.isnan(out), torch.isnan(ex.out)), "NaN pattern differs from the oracle's"
    o, e = out.double().nan_to_num(0.0), ex.out.nan_to_num(0.0)
    if out.dtype == torch.float32:
        err = ((o - e).abs() / ex.mag.nan_to_num(0.0).clamp_min(1e-30)).max().item()
        assert err <= 1e-5, f"error {err:.3g} x the weighted mean of |v| > 1e-5"
    else:
        e16 = e.to(out.dtype).double()  # the oracle rounded to out's dtype
        ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[out.dtype]
        tiny = {torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}[out.dtype]  # the smallest subnormal
        bound = torch.maximum(ulp * e16.abs(), torch.full_like(e16, tiny)) + 1e-5 * ex.mag.nan_to_num(0.0)
        bad = (o - e16).abs() > bound
        assert not bad.any(), f"{int(bad.sum())} elements more than one ulp from the oracle, e.g. " \
                              f"{o[bad][:3].tolist()} vs {e[bad][:3].tolist()}"


def _inputs(B, H, KVH, L, D, dtype, closed_frac=0.0, suffix=None, seed=0, mask_dtype=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(B, KVH, L, D, generator=g).to(dtype)
    v = torch.randn(B, KVH, L, D, generator=g).to(dtype)
    mask_dtype = mask_dtype or dtype
    mask = (torch.rand(B, L, generator=g) - 0.5).to(mask_dtype)  # open positions carry small additive values
    lowest = -math.inf if mask_dtype == torch.float64 else torch.finfo(mask_dtype).min  # what closes a position
    if closed_frac:
        mask[torch.rand(B, L, generator=g) < closed_frac] = lowest
    if suffix is not None:  # a static cache: positions past each sequence's length are closed
        for b, n in enumerate(suffix):
            mask[b, n:] = lowest
    return q, k, v, mask


# (B, H, KVH, L, D): SmolLM2's step; odd head dims (tails of 1..7 columns, chunk counts that leave a partial
# register block of columns); G = 1..9 (head blocks of 3, 2, 1); batches; a long cache
SHAPES = [
    (1, 9, 3, 256, 64),
    (1, 3, 3, 40, 5),
    (2, 4, 1, 33, 13),
    (1, 7, 1, 70, 67),
    (3, 8, 2, 19, 72),
    (1, 5, 5, 9, 24),
    (2, 9, 1, 50, 1),
    (1, 6, 2, 1500, 40),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,KVH,L,D", SHAPES)
def test_avx2_and_portable_match_exact(isa_pair, dtype, B, H, KVH, L, D):
    suffix = [max(1, L - 3 - 7 * b) for b in range(B)]
    q, k, v, mask = _inputs(B, H, KVH, L, D, dtype, closed_frac=0.3, suffix=suffix, seed=L + D)
    scale = 1 / math.sqrt(D)
    fast, slow = isa_pair(lambda: decode_attention(q, k, v, mask, scale))
    exact = _exact(q, k, v, mask, scale)
    assert_matches_exact(fast, exact)
    assert_matches_exact(slow, exact)
    # and the reference (fp32 math) within the same bounds
    assert_matches_exact(ref_decode_attention(q, k, v, mask, scale), exact)


@pytest.mark.parametrize("dtype", DTYPES)
def test_no_mask_and_other_mask_dtypes(isa_pair, dtype):
    q, k, v, _ = _inputs(2, 6, 3, 37, 20, dtype, seed=3)
    fast, slow = isa_pair(lambda: decode_attention(q, k, v, None, 0.3))
    assert_matches_exact(fast, _exact(q, k, v, None, 0.3))
    assert_matches_exact(slow, _exact(q, k, v, None, 0.3))
    for mdt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        _, _, _, mask = _inputs(2, 6, 3, 37, 20, dtype, closed_frac=0.4, seed=4, mask_dtype=mdt)
        fast, slow = isa_pair(lambda: _op(q, k, v, mask, 0.3))
        exact = _exact(q, k, v, mask, 0.3)
        assert_matches_exact(fast, exact)
        assert_matches_exact(slow, exact)


def test_fp64_mask_closes_only_minus_inf(isa_pair):
    """An fp64 mask (the op takes one; the public function does not) closes -inf only, the reference's rule: -1e300
    is an open position whose weight is 0, so whatever k holds there is read (NaN there makes the rows NaN), unlike
    at a -inf position."""
    q, k, v, _ = _inputs(1, 2, 1, 12, 8, torch.float32, seed=5)
    mask = torch.zeros(1, 12, dtype=torch.float64)
    mask[0, 3] = -1e300
    mask[0, 5] = -math.inf
    k[0, 0, 5] = float("nan")
    fast, slow = isa_pair(lambda: _op(q, k, v, mask, 0.5))
    assert torch.isfinite(fast).all() and torch.isfinite(slow).all()
    assert_matches_exact(fast, _exact(q, k, v, mask, 0.5))
    k[0, 0, 3] = float("nan")
    fast, slow = isa_pair(lambda: _op(q, k, v, mask, 0.5))
    assert torch.isnan(fast).all() and torch.isnan(slow).all()
    assert torch.isnan(ref_decode_attention(q, k, v, mask, 0.5)).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_garbage_in_closed_positions_never_leaks(isa_pair, dtype):
    # scattered closed positions (mixed 8-position blocks of the AVX2 mask pass), NaN / inf in their k and v rows
    q, k, v, mask = _inputs(2, 6, 2, 45, 19, dtype, closed_frac=0.5, suffix=[40, 45], seed=6)
    closed = mask <= torch.finfo(dtype).min
    k2, v2 = k.clone(), v.clone()
    k2.masked_fill_(closed[:, None, :, None], float("nan"))
    v2.masked_fill_(closed[:, None, :, None], float("inf"))
    fast, slow = isa_pair(lambda: decode_attention(q, k2, v2, mask, 0.25))
    assert torch.isfinite(fast).all() and torch.isfinite(slow).all()
    clean_fast, clean_slow = isa_pair(lambda: decode_attention(q, k, v, mask, 0.25))
    assert torch.equal(fast, clean_fast) and torch.equal(slow, clean_slow)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_at_open_positions_propagates(isa_pair, dtype):
    q, k, v, mask = _inputs(1, 6, 3, 30, 16, dtype, suffix=[20], seed=7)
    k[0, 1, 4, 9] = float("nan")  # kv head 1: a NaN score makes its 2 heads' rows NaN
    v[0, 2, 7, 3] = float("nan")  # kv head 2: column 3 of its heads NaN (its weight is never exactly 0 here)
    fast, slow = isa_pair(lambda: decode_attention(q, k, v, mask, 0.25))
    exact = _exact(q, k, v, mask, 0.25)
    assert torch.isnan(exact.out[0, 2:4]).all() and torch.isnan(exact.out[0, 4:, 3]).all()
    assert_matches_exact(fast, exact)
    assert_matches_exact(slow, exact)
    assert_matches_exact(ref_decode_attention(q, k, v, mask, 0.25), exact)


def test_fully_closed_rows_and_all_minus_inf_scores(isa_pair):
    q, k, v, mask = _inputs(3, 4, 2, 21, 11, torch.float32, suffix=[21, 0, 21], seed=8)
    # sequence 2: every score of kv head 0 overflows to -inf (no weight at all -> zeros, as the reference)
    q[2, :2] = 1e30
    k[2, 0] = -1e30
    fast, slow = isa_pair(lambda: decode_attention(q, k, v, mask, 1.0))
    ref = ref_decode_attention(q, k, v, mask, 1.0)
    for out in (fast, slow, ref):
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert torch.equal(out[2, :2], torch.zeros_like(out[2, :2]))
        assert torch.isfinite(out).all()
    exact = _exact(q, k, v, mask, 1.0)  # fp64: no overflow in sequence 2; compare the other rows
    assert torch.equal(exact.out[1], torch.zeros_like(exact.out[1]))
    for out in (fast, slow):
        assert_matches_exact(out[:2], Exact(exact.out[:2], exact.mag[:2]))
        assert_matches_exact(out[2:, 2:], Exact(exact.out[2:, 2:], exact.mag[2:, 2:]))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 3), KVH=st.integers(1, 3), G=st.integers(1, 9), L=st.integers(1, 70), D=st.integers(1, 80),
       dtype=st.sampled_from(DTYPES), closed=st.sampled_from([0.0, 0.3, 0.9]), seed=st.integers(0, 2**16))
def test_random_shapes(isa_pair, B, KVH, G, L, D, dtype, closed, seed):
    q, k, v, mask = _inputs(B, KVH * G, KVH, L, D, dtype, closed_frac=closed, seed=seed)
    scale = 1 / math.sqrt(D)
    fast, slow = isa_pair(lambda: decode_attention(q, k, v, mask, scale))
    exact = _exact(q, k, v, mask, scale)
    assert_matches_exact(fast, exact)
    assert_matches_exact(slow, exact)
