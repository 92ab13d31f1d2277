"""The activation-weighted scale search (QuantConfig(mse=True, act_weighted=True), llama.cpp's importance matrix):
its objective, that it never loses to the min-max grid in that objective, RTN with calibration data, GPTQ with its
Hessian's diagonal as the weights, and the errors for misuse."""

import pytest
import torch
from torch import nn

from qkernels.algorithms import AWQConfig, GPTQConfig, QuantConfig, fake_quantize, gptq_quantize_weight, \
    quantize_weight, rtn_quantize_model
from qkernels.algorithms.grids import group_qparams

WMSE = [QuantConfig(4, 32, True, full_range=True, mse=True, act_weighted=True),
        QuantConfig(4, 32, True, mse=True, act_weighted=True),
        QuantConfig(4, 32, False, mse=True, act_weighted=True),
        QuantConfig(3, 16, False, mse=True, act_weighted=True)]


def _data(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.05
    w[:, 5] *= 8  # an outlier weight column
    imp = torch.rand(K, generator=g).pow(4) * 10  # second moments spread over orders of magnitude, as in LLMs
    imp[7] = 50.0  # an input channel that matters a lot
    return w, imp


def _weighted_group_err(w, deq, imp, g):
    N = w.shape[0]
    return (imp * (w - deq).pow(2)).reshape(N, -1, g).sum(-1)


def _plain(cfg):
    return QuantConfig(cfg.bits, cfg.group_size, cfg.symmetric, cfg.full_range)


@pytest.mark.parametrize("cfg", WMSE, ids=lambda c: c.name)
def test_weighted_search_never_worse_than_minmax_in_its_objective(cfg):
    w, imp = _data(24, 128, seed=1)
    g = cfg.group_size
    e_w = _weighted_group_err(w, fake_quantize(w, cfg, imp), imp, g)
    e_0 = _weighted_group_err(w, fake_quantize(w, _plain(cfg)), imp, g)
    assert (e_w <= e_0 * (1 + 1e-6) + 1e-12).all()
    assert e_w.sum() < 0.9 * e_0.sum()
    # and it beats the unweighted search in the weighted objective on this data (that is what it is for)
    unw = QuantConfig(cfg.bits, g, cfg.symmetric, cfg.full_range, mse=True)
    assert e_w.sum() < _weighted_group_err(w, fake_quantize(w, unw), imp, g).sum()


def _brute_force_sym_full(wg, imp, bits, grid, max_shrink):
    """Independent enumeration of the symmetric full-range search's candidates for ONE group (python floats)."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    w, a = wg.tolist(), imp.tolist()
    x = w[max(range(len(w)), key=lambda k: abs(w[k]))]

    def err(s):
        q = [min(max(round(v / s), qmin), qmax) for v in w]
        return sum(ak * (v - s * qk) ** 2 for ak, v, qk in zip(a, w, q)), q

    best = None
    for i in range(grid):
        s = x * (1.0 - max_shrink * i / grid) / qmin
        e, q = err(s)
        qq = sum(ak * qk * qk for ak, qk in zip(a, q))
        ls = sum(ak * v * qk for ak, v, qk in zip(a, w, q)) / qq
        for c in (s, ls):
            e = err(c)[0]
            best = e if best is None else min(best, e)
    return best


def test_weighted_objective_is_exact_on_a_tiny_case():
    torch.manual_seed(3)
    cfg = QuantConfig(3, 8, True, full_range=True, mse=True, act_weighted=True, mse_grid=7)
    for _ in range(20):
        wg = torch.randn(1, 8, dtype=torch.float32)
        imp = torch.rand(8) * torch.tensor([1, 1, 100, 1, 0.01, 1, 1, 1.0])
        s, z = group_qparams(wg, cfg, imp)
        assert z is None
        q = torch.clamp(torch.round(wg / s[:, None]), -4, 3)
        got = float((imp * (wg - s[:, None] * q).pow(2)).sum())
        want = _brute_force_sym_full(wg[0].double(), imp.double(), 3, 7, cfg.mse_max_shrink)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-9)


def test_importance_moves_the_error_to_unimportant_channels():
    w, imp = _data(64, 32, seed=2)
    imp = torch.ones(32)
    imp[3] = 1e4
    cfg = QuantConfig(4, 32, False, mse=True, act_weighted=True)
    err_w = (fake_quantize(w, cfg, imp) - w).pow(2)
    err_u = (fake_quantize(w, QuantConfig(4, 32, False, mse=True)) - w).pow(2)
    assert err_w[:, 3].sum() < 0.5 * err_u[:, 3].sum()


def test_zero_importance_group_keeps_minmax():
    w, _ = _data(8, 64)
    imp = torch.zeros(64)
    cfg = QuantConfig(4, 32, True, full_range=True, mse=True, act_weighted=True)
    assert torch.equal(fake_quantize(w, cfg, imp), fake_quantize(w, _plain(cfg)))


def test_gptq_weights_its_grid_by_the_hessian_diagonal():
    """With uncorrelated inputs (diagonal H) GPTQ propagates no error, so it must equal RTN with the weighted grid
    and importance diag(H), in the processing order of act-order as well."""
    w, imp = _data(16, 96, seed=4)
    H = torch.diag(2 * imp)
    for cfg in WMSE[:3]:
        q0, s0, z0 = quantize_weight(w, cfg, imp)
        res = gptq_quantize_weight(w, H, GPTQConfig(cfg, damp_percent=0.0))
        assert torch.equal(res.q, q0) and torch.equal(res.scale, s0)
        assert (z0 is None and res.zero_point is None) or torch.equal(res.zero_point, z0)
        res = gptq_quantize_weight(w, H, GPTQConfig(cfg, damp_percent=0.0, act_order=True))
        q1, s1, _ = quantize_weight(w[:, res.perm], cfg, imp[res.perm])
        assert torch.equal(res.q, q1) and torch.equal(res.scale, s1)


def test_rtn_model_with_calibration(tiny_llama):
    model, ids = tiny_llama
    cfg = QuantConfig(4, 32, True, full_range=True, mse=True, act_weighted=True)
    with pytest.raises(ValueError, match="calib_batches"):
        rtn_quantize_model(model, cfg)
    import copy

    with torch.no_grad():
        ref = model(input_ids=ids).logits
        errs = {}
        for name, c in (("wmse", cfg), ("mse", QuantConfig(4, 32, True, full_range=True, mse=True)),
                        ("minmax", QuantConfig(4, 32, True))):
            m = rtn_quantize_model(copy.deepcopy(model), c, [ids])
            errs[name] = float((m(input_ids=ids).logits - ref).norm() / ref.norm())
    # a random tiny model has little structure to exploit: the weighted search must beat the min-max grid and not
    # lose to the unweighted search (measured: 0.124 vs 0.158 min-max, 0.125 mse)
    assert errs["wmse"] < 0.9 * errs["minmax"]
    assert errs["wmse"] < errs["mse"] * 1.02


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    # uneven input channels, as trained models have: a few norm weights much larger than the rest
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.mul_(torch.rand(64).pow(3) * 4 + 0.2)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    return model, ids


def test_errors():
    w, imp = _data(8, 64)
    with pytest.raises(ValueError, match="needs mse=True"):
        QuantConfig(4, 32, act_weighted=True)
    cfg = QuantConfig(4, 32, mse=True, act_weighted=True)
    assert cfg.name == "int4-g32-sym-wmse"
    with pytest.raises(ValueError, match="importance"):
        fake_quantize(w, cfg)
    with pytest.raises(ValueError, match=r"importance must have shape \[K\] = \[64\]"):
        fake_quantize(w, cfg, imp[:32])
    with pytest.raises(ValueError, match="non-negative"):
        fake_quantize(w, cfg, -imp)
    with pytest.raises(ValueError, match="awq-gptq"):
        AWQConfig(cfg)


def test_scheme_names():
    from qkernels.eval.runner import parse_scheme

    assert parse_scheme("gptq-int4-asym-wmse") == ("gptq", QuantConfig(4, 128, False, mse=True, act_weighted=True))
    assert parse_scheme("rtn-int4-full-wmse")[1].act_weighted
    for bad in ("awq-int4-wmse", "gptq-int4-mse-wmse", "qat-int4-wmse"):
        with pytest.raises(ValueError, match="wmse"):
            parse_scheme(bad)


@pytest.mark.parametrize("name", ["rtn-int4-full-wmse", "gptq-int4-asym-wmse", "awq-gptq-int4-wmse"])
def test_eval_rows_hand_over_the_calibration_data(tiny_llama, name):
    from qkernels.eval import runner
    from qkernels.nn import QuantLinear

    model, ids = tiny_llama
    cfg = runner.EvalConfig(group_size=32, progress=False, awq_grid=2)
    q = runner._quantize(name, model, cfg, {"gptq": [ids], "awq": [ids]}, None)
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert float((q(input_ids=ids).logits - ref).norm() / ref.norm()) < 0.2
