"""RTN / GPTQ / AWQ / QAT on small random layers and a tiny random Llama (from a config)."""

import copy
import logging

import pytest
import torch
from torch import nn

import qkernels
from qkernels.algorithms import (AWQConfig, GPTQConfig, QATScheme, QuantConfig, awq_quantize_model,
                                 export_gptq_tensors, fake_quantize, gptq_quantize_model, gptq_quantize_weight,
                                 quantize_weight, rtn_quantize_model)
from qkernels.algorithms._layers import UnsupportedModel
from qkernels.algorithms.awq import fold_scales
from qkernels.algorithms.rtn import build_quant_linear
from qkernels.nn import Int4WeightOnly, QuantLinear

transformers = pytest.importorskip("transformers")
from qkernels.eval.models import tiny_llama  # noqa: E402

CONFIGS = [QuantConfig(4, 64, True), QuantConfig(4, 64, False), QuantConfig(3, 32, True), QuantConfig(8, -1, True),
           QuantConfig(4, -1, False)]


def _linear(N, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N, bias=True)
    lin.weight.data = torch.randn(N, K, generator=g) * 0.05
    lin.bias.data = torch.randn(N, generator=g)
    return lin


def _correlated_x(T, K, seed=1):
    """Activations with correlated channels and a few outlier channels, like an LLM's."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(T, K // 4, generator=g)
    x = z @ torch.randn(K // 4, K, generator=g) + 0.1 * torch.randn(T, K, generator=g)
    x[:, :3] *= 20
    return x


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("K", [200, 256])
def test_rtn_matches_ops_and_kernel(cfg, K):
    lin = _linear(40, K)
    q = build_quant_linear(lin, cfg)
    # the torch grid used inside GPTQ/AWQ/QAT is bit-identical to the ops' quantize -> dequantize round trip
    assert torch.equal(fake_quantize(lin.weight.data, cfg), q.dequantize())
    x = torch.randn(3, 5, K)
    ref = torch.nn.functional.linear(x.double(), q.dequantize().double(), lin.bias.double())
    out = q(x)
    assert out.shape == (3, 5, 40)
    assert (out.double() - ref).norm() / ref.norm() < 1e-5
    expect = {4: "int4", 3: "int4", 8: "int8" if cfg.group_size == -1 else "int8_grouped"}[cfg.bits]
    assert isinstance(q, QuantLinear) and q.kind == expect and q.bits == cfg.bits


def test_quantized_linear_bad_input():
    with pytest.raises(ValueError, match="q must be int8"):
        QuantLinear.from_codes(torch.zeros(4, 8, dtype=torch.int32), torch.ones(4, 1), None, Int4WeightOnly(8))
    with pytest.raises(ValueError, match=r"int3 codes must be in \[-4, 3\], got \[-4, 4\]"):
        q = torch.zeros(4, 8, dtype=torch.int8)
        q[0, 0], q[1, 1] = -4, 4
        QuantLinear.from_codes(q, torch.ones(4, 1), None, Int4WeightOnly(8, symmetric=True, bits=3))
    w = torch.randn(4, 8)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_weight(w, QuantConfig(4, 8))
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(9, 128)


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("act_order,static", [(False, False), (True, False), (True, True)])
def test_gptq_layer_error_below_rtn(cfg, act_order, static):
    N, K = 32, 160
    lin = _linear(N, K)
    x = _correlated_x(512, K)
    H = 2 * x.t() @ x / x.shape[0]
    res = gptq_quantize_weight(lin.weight.data, H, GPTQConfig(cfg, act_order=act_order, static_groups=static,
                                                              block_size=64))
    ql = build_quant_linear(lin, cfg, res.q, res.scale, res.zero_point, res.perm)
    rl = build_quant_linear(lin, cfg)
    with torch.no_grad():
        ref = lin(x)
    err_gptq = float((ql(x) - ref).detach().pow(2).mean())
    err_rtn = float((rl(x) - ref).detach().pow(2).mean())
    assert err_gptq < 0.8 * err_rtn, (err_gptq, err_rtn)
    # codes stay in range and the kernel agrees with the dequantized weight
    lo, hi = -(1 << (cfg.bits - 1)), (1 << (cfg.bits - 1)) - 1
    assert int(res.q.min()) >= lo and int(res.q.max()) <= hi
    assert torch.allclose(ql(x), torch.nn.functional.linear(x, ql.dequantize(), lin.bias), rtol=1e-4, atol=1e-4)
    assert (res.perm is not None) == (act_order and not static and cfg.group_size != -1)
    assert res.g_idx.shape == (K,) and int(res.g_idx.max()) == -(-K // cfg.group(K)) - 1


def test_gptq_dead_columns_and_bad_input():
    lin = _linear(16, 64)
    x = _correlated_x(256, 64)
    x[:, 5] = 0  # a dead input channel
    H = 2 * x.t() @ x / x.shape[0]
    res = gptq_quantize_weight(lin.weight.data, H, GPTQConfig(QuantConfig(4, 32, False)))
    ql = build_quant_linear(lin, QuantConfig(4, 32, False), res.q, res.scale, res.zero_point, res.perm)
    assert torch.all(ql.dequantize()[:, 5] == 0)
    with pytest.raises(ValueError, match="H must have shape"):
        gptq_quantize_weight(lin.weight.data, H[:10, :10])
    Hn = H.clone()
    Hn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize_weight(lin.weight.data, Hn)
    with pytest.raises(ValueError, match="damp_percent"):
        GPTQConfig(damp_percent=1.5)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_export_layout(sym, act_order):
    """Unpack the published GPTQ layout by its own formula and compare with our dequantized weight."""
    cfg = QuantConfig(4, 32, sym)
    lin = _linear(32, 128)
    x = _correlated_x(512, 128)
    res = gptq_quantize_weight(lin.weight.data, 2 * x.t() @ x / 512, GPTQConfig(cfg, act_order=act_order))
    t = export_gptq_tensors(res, 4)
    assert torch.equal(t["g_idx"], res.g_idx)
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (128 // 8, 32)
    assert t["qzeros"].shape == (4, 32 // 8) and t["scales"].shape == (4, 32) and t["g_idx"].shape == (128,)
    sh = torch.arange(8) * 4
    u = ((t["qweight"].unsqueeze(1).to(torch.int64) >> sh.view(1, 8, 1)) & 15).reshape(128, 32)  # [K, N]
    z = ((t["qzeros"].unsqueeze(-1).to(torch.int64) >> sh) & 15).reshape(4, 32) + 1  # v1: stored zero - 1
    g = t["g_idx"].long()
    w = t["scales"].float()[g] * (u - z[g]).float()  # [K, N]
    ql = build_quant_linear(lin, cfg, res.q, res.scale, res.zero_point, res.perm)
    torch.testing.assert_close(w.t(), ql.dequantize(), rtol=2e-3, atol=1e-6)  # fp16 scales
    with pytest.raises(ValueError, match="bits must be one of"):
        export_gptq_tensors(res, 5)


@pytest.fixture(scope="module")
def tiny():
    m = tiny_llama(vocab_size=256, hidden=64, layers=2, intermediate=160)
    ids = torch.randint(3, 256, (8, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(ids).logits
    return m, ids, ref


def _logit_err(m, ids, ref):
    with torch.no_grad():
        return float((m(ids).logits - ref).pow(2).mean())


def test_gptq_model_beats_rtn(tiny):
    m, ids, ref = tiny
    cfg = QuantConfig(4, 32, True)
    g = gptq_quantize_model(copy.deepcopy(m), [ids[:4], ids[4:]], GPTQConfig(cfg, act_order=True), progress=False)
    r = rtn_quantize_model(copy.deepcopy(m), cfg)
    assert sum(isinstance(x, QuantLinear) for x in g.modules()) == 14
    assert all(x.scheme == Int4WeightOnly(32, symmetric=True) for x in g.modules() if isinstance(x, QuantLinear))
    assert isinstance(g.lm_head, nn.Linear)  # the tied output head stays float
    assert _logit_err(g, ids, ref) < _logit_err(r, ids, ref)


def test_awq_folding_keeps_float_outputs(tiny):
    m, ids, ref = tiny
    # folding arbitrary positive scales into every (prev op -> linears) pair AWQ uses is an identity on the function
    m1 = copy.deepcopy(m)
    g = torch.Generator().manual_seed(3)
    for layer in m1.model.layers:
        for prev, lins in ((layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                    layer.self_attn.v_proj]),
                           (layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]),
                           (layer.mlp.up_proj, [layer.mlp.down_proj])):
            s = torch.rand(lins[0].in_features, generator=g) * 4 + 0.25
            fold_scales(prev, lins, s)
    assert not torch.equal(m1.model.layers[0].mlp.gate_proj.weight, m.model.layers[0].mlp.gate_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(m1(ids).logits, ref, rtol=1e-4, atol=1e-5)
    # and so is the whole AWQ scale search + folding, before quantization
    m2 = copy.deepcopy(m)
    awq_quantize_model(m2, [ids[:4], ids[4:]], AWQConfig(QuantConfig(4, 32, True), n_grid=5, clip=False),
                       progress=False, quantize=False)
    with torch.no_grad():
        torch.testing.assert_close(m2(ids).logits, ref, rtol=1e-4, atol=1e-5)


def test_awq_model_beats_rtn(tiny):
    m, ids, ref = tiny
    cfg = QuantConfig(4, 32, True)
    a = awq_quantize_model(copy.deepcopy(m), [ids[:4], ids[4:]], AWQConfig(cfg, n_grid=10), progress=False)
    r = rtn_quantize_model(copy.deepcopy(m), cfg)
    assert _logit_err(a, ids, ref) < _logit_err(r, ids, ref)


class _NotALlama(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Sequential(nn.Linear(16, 16), nn.ReLU())])

    def forward(self, input_ids=None, use_cache=False):
        return self.model.layers[0](input_ids.float())


def test_awq_unsupported_architecture_refused_or_rtn_with_warning():
    m = _NotALlama()
    with pytest.raises(UnsupportedModel, match="no layer mapping"):
        awq_quantize_model(m, [torch.zeros(1, 16)], progress=False)
    assert isinstance(m.model.layers[0][0], nn.Linear)  # untouched
    with pytest.warns(UserWarning, match="falling back to round-to-nearest"):
        awq_quantize_model(m, [torch.zeros(1, 16)], AWQConfig(fallback_rtn=True), progress=False)
    assert isinstance(m.model.layers[0][0], QuantLinear)


def test_model_without_linears():
    m = nn.Sequential(nn.ReLU())
    for fn in (lambda: rtn_quantize_model(m), lambda: gptq_quantize_model(m, [torch.zeros(1, 4, dtype=torch.long)]),
               lambda: awq_quantize_model(m, [torch.zeros(1, 4, dtype=torch.long)]), lambda: qkernels.qat.prepare(m)):
        with pytest.raises(ValueError, match="no nn.Linear"):
            fn()
    with pytest.raises(ValueError, match="at least one"):
        gptq_quantize_model(tiny_llama(layers=1), [])


def test_nan_activations_are_reported(tiny):
    m, ids, _ = tiny
    bad = copy.deepcopy(m)
    bad.model.embed_tokens.weight.data[ids[0, 0]] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize_model(bad, [ids[:2]], progress=False)
    with pytest.raises(ValueError, match="NaN"):
        awq_quantize_model(copy.deepcopy(bad), [ids[:2]], progress=False)


import qkernels.qat  # noqa: E402


@pytest.mark.parametrize("scheme", [QATScheme(QuantConfig(4, 32, True)),
                                    QATScheme(QuantConfig(4, 32, False), act_int8_per_token=True, learnable_scales=True),
                                    QATScheme(QuantConfig(8, -1, True), act_int8_per_token=True)],
                         ids=["w4", "w4a8-lsq", "w8a8"])
def test_qat_prepare_train_convert(tiny, scheme):
    m, ids, _ = tiny
    s = qkernels.qat.prepare(copy.deepcopy(m), scheme)
    fq = s.model.layers[0].self_attn.q_proj
    assert isinstance(fq, qkernels.qat.FakeQuantLinear)
    w0 = fq.weight.detach().clone()
    losses = qkernels.qat.finetune(s, ids, steps=3, lr=1e-3, batch_size=2, teacher=m, progress=False)
    assert len(losses) == 3 and all(l >= 0 for l in losses)
    assert not torch.equal(w0, fq.weight)  # the straight-through gradient reached the float weights
    if scheme.learnable_scales:
        assert fq.scale.requires_grad is False  # frozen after training
    with torch.no_grad():
        out_fq = s(ids).logits
    qkernels.qat.convert(s)
    assert not any(isinstance(x, qkernels.qat.FakeQuantLinear) for x in s.modules())
    q_proj = s.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, QuantLinear) and q_proj.bits == scheme.weight.bits
    want = qkernels.IntWeightInt8Act if scheme.act_int8_per_token else Int4WeightOnly
    assert type(q_proj.scheme) is want
    with torch.no_grad():
        out_q = s(ids).logits
    torch.testing.assert_close(out_q, out_fq, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no FakeQuantLinear"):
        qkernels.qat.convert(s)
