"""The scale grids of qkernels.algorithms.grids (full signed range, MSE search) through RTN, GPTQ and QuantLinear,
and the eval scheme names that select them."""

import pytest
import torch
from torch import nn

from qkernels.algorithms import GPTQConfig, QuantConfig, fake_quantize, gptq_quantize_weight, quantize_weight
from qkernels.algorithms.grids import group_qparams
from qkernels.algorithms.rtn import build_quant_linear

GRIDS = [QuantConfig(4, 32, True, full_range=True), QuantConfig(4, 32, True, mse=True),
         QuantConfig(4, 32, True, full_range=True, mse=True), QuantConfig(4, 32, False, mse=True),
         QuantConfig(3, 16, True, full_range=True, mse=True), QuantConfig(8, -1, True, mse=True)]


def _w(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    w[:, 5] *= 8  # an outlier column, as LLM weights have
    return w


def _group_err(w, cfg):
    g = cfg.group(w.shape[1])
    return (fake_quantize(w, cfg) - w).pow(2).reshape(w.shape[0], -1, g).sum(-1)


@pytest.mark.parametrize("cfg", GRIDS, ids=lambda c: c.name)
@pytest.mark.parametrize("K", [96, 100])
def test_grid_round_trip_matches_quant_linear(cfg, K):
    lin = nn.Linear(K, 24, bias=False)
    lin.weight.data = _w(24, K)
    q = build_quant_linear(lin, cfg)
    assert torch.equal(fake_quantize(lin.weight.data, cfg), q.dequantize())
    x = torch.randn(5, K)
    ref = x.double() @ q.dequantize().double().t()
    assert (q(x).double() - ref).norm() / ref.norm() < 1e-5


def test_full_range_uses_every_level_like_q4_0():
    w = _w(16, 64)
    cfg = QuantConfig(4, 32, True, full_range=True)
    q, scale, zp = quantize_weight(w, cfg)
    assert zp is None and int(q.min()) == -8 and int(q.max()) == 7
    wg = w.reshape(16, 2, 32)
    ext = wg.gather(-1, wg.abs().argmax(-1, keepdim=True))[..., 0]
    assert torch.equal(scale, ext / -8)  # llama.cpp Q4_0: d = max / -8, the sign of the extreme
    deq = fake_quantize(w, cfg).reshape(16, 2, 32)
    assert torch.equal(deq.gather(-1, wg.abs().argmax(-1, keepdim=True))[..., 0], ext)  # the extreme is exact
    # a 4-bit QuantLinear holds the -8 codes (with negative scales) exactly
    lin = nn.Linear(64, 16, bias=False)
    lin.weight.data = w
    assert int(build_quant_linear(lin, cfg).codes().min()) == -8
    # the full range gives a finer step on the same data than amax / 7, so a smaller error in total
    assert _group_err(w, cfg).sum() < _group_err(w, QuantConfig(4, 32, True)).sum()


@pytest.mark.parametrize("base", [QuantConfig(4, 32, True), QuantConfig(4, 32, True, full_range=True),
                                  QuantConfig(4, 32, False), QuantConfig(2, 16, False)], ids=lambda c: c.name)
def test_mse_search_never_worse_per_group(base):
    w = _w(32, 128, seed=3)
    mse = QuantConfig(base.bits, base.group_size, base.symmetric, base.full_range, mse=True)
    e0, e1 = _group_err(w, base), _group_err(w, mse)
    assert (e1 <= e0 * (1 + 1e-6) + 1e-12).all()
    assert e1.sum() < 0.99 * e0.sum()  # and it helps on this data (clipping the tails pays)


def test_group_qparams_default_is_the_ops_choice():
    from qkernels import ops

    w = _w(8, 64)
    for sym in (True, False):
        s, z = group_qparams(w.reshape(-1, 32), QuantConfig(4, 32, sym))
        s2, z2 = ops.choose_qparams_affine(w, 4, 32, sym)
        assert torch.equal(s, s2.reshape(-1)) and (z is None if sym else torch.equal(z, z2.reshape(-1)))


@pytest.mark.parametrize("cfg", [QuantConfig(4, 32, True, full_range=True, mse=True),
                                 QuantConfig(4, 32, False, mse=True)], ids=lambda c: c.name)
def test_gptq_on_searched_grid_beats_rtn_on_it(cfg):
    g = torch.Generator().manual_seed(1)
    K, N = 128, 32
    z = torch.randn(1024, K // 4, generator=g)
    x = z @ torch.randn(K // 4, K, generator=g) + 0.1 * torch.randn(1024, K, generator=g)
    w = _w(N, K)
    H = 2 * x.t() @ x / x.shape[0]
    res = gptq_quantize_weight(w, H, GPTQConfig(cfg, act_order=True))
    lin = nn.Linear(K, N, bias=False)
    lin.weight.data = w
    deq = build_quant_linear(lin, cfg, res.q, res.scale, res.zero_point, res.perm).dequantize()
    if cfg.symmetric:
        assert int(res.q.min()) >= -8 and res.zero_point is None
    err_gptq = (x @ (deq - w).t()).pow(2).sum()
    err_rtn = (x @ (fake_quantize(w, cfg) - w).t()).pow(2).sum()
    assert err_gptq < 0.8 * err_rtn


def test_quant_config_grid_errors():
    with pytest.raises(ValueError, match="full_range applies to the symmetric grid"):
        QuantConfig(4, 128, False, full_range=True)
    with pytest.raises(ValueError, match="mse_grid must be a positive int"):
        QuantConfig(4, 128, mse=True, mse_grid=0)
    with pytest.raises(ValueError, match="mse_max_shrink"):
        QuantConfig(4, 128, mse=True, mse_max_shrink=1.0)
    assert QuantConfig(4, 128, True, True, True).name == "int4-g128-sym-full-mse"


def test_eval_scheme_names():
    from qkernels.eval.runner import ALL_SCHEMES, parse_scheme

    assert parse_scheme("gptq-int4-asym-mse", 64) == ("gptq", QuantConfig(4, 64, False, mse=True))
    assert parse_scheme("awq-gptq-int4-full") == ("awq-gptq", QuantConfig(4, 128, True, full_range=True))
    assert parse_scheme("rtn-int4", symmetric=False)[1].symmetric is False
    assert parse_scheme("q4_k_m") is None and parse_scheme("float") is None
    for name in ALL_SCHEMES:
        parse_scheme(name)
    for bad in ("gptq-int9", "rtn-int4-mse-mse", "foo", "awq-int4-asym-full"):
        with pytest.raises(ValueError, match="scheme"):
            parse_scheme(bad)
