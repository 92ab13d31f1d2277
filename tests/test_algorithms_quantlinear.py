"""QuantLinear with a ragged last group (K not a multiple of the group size) and the algorithms' QuantLinear outputs.
The GPTQ / AWQ writers are tested in tests/test_formats_gptq.py / tests/test_formats_awq.py."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkernels
from qkernels.algorithms import (AWQConfig, GPTQConfig, QuantConfig, awq_quantize_model, export_gptq_tensors,
                                 fake_quantize, gptq_quantize_model, gptq_quantize_weight, rtn_quantize_model)
from qkernels.algorithms.rtn import build_quant_linear, scheme_for
from qkernels.nn import Int4WeightOnly, Int8DynamicInt4Weight, Int8WeightOnly, IntWeightInt8Act, QuantLinear
from qkernels.qat import fake_quant_act_int8
from qkernels.reference import int_gemm as ref_gemm
from qkernels.reference import int_quant as ref_q

from .conftest import rel_err
from .test_nn_linear import make_linear

transformers = pytest.importorskip("transformers")
from .formats_fixtures import logits, tiny_llama  # noqa: E402

RAGGED = [Int4WeightOnly(64), Int4WeightOnly(64, symmetric=True), Int4WeightOnly(32, bits=3),
          Int4WeightOnly(48, symmetric=True, bits=2), Int8WeightOnly(64, False), Int8WeightOnly(48, True),
          IntWeightInt8Act(4, 64), IntWeightInt8Act(6, 64, True), Int8DynamicInt4Weight(64)]



# ---- ragged groups in QuantLinear --------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", RAGGED, ids=repr)
@pytest.mark.parametrize("K", [200, 96])
def test_ragged_layer_matches_reference(scheme, K):
    N, g = 40, scheme.group_size
    G, Kp = math.ceil(K / g), math.ceil(K / g) * g
    lin = make_linear(K, N, seed=K)
    q = QuantLinear.from_linear(lin, scheme)
    assert q.padded_in_features == Kp and tuple(q.scale.shape) == (N, G)
    # the reference ops on the weight zero-padded to whole groups; the padding is then dropped
    bits = q.bits
    wp = F.pad(lin.weight.detach(), (0, Kp - K))
    s, z = ref_q.choose_qparams_affine(wp, bits, g, scheme.symmetric, True, False)
    z = None if scheme.symmetric else z
    codes = ref_q.quantize_affine(wp, s, z, bits, g, True, False)
    w_ref = ref_q.dequantize_affine(codes, s, z, g, False, torch.float32)[:, :K]
    assert torch.equal(q.codes(), codes[:, :K]) and torch.equal(q.scale, s)
    assert z is None and q.zero_point is None or torch.equal(q.zero_point, z)
    assert torch.equal(q.dequantize(), w_ref)
    # the padding columns hold the last group's zero point: they dequantize to exactly 0
    stored = q._stored_codes()
    assert tuple(stored.shape) == (N, Kp)
    pad_w = ref_q.dequantize_affine(stored, q.scale, q.zero_point, g, False, torch.float32)[:, K:]
    assert pad_w.shape == (N, Kp - K) and not pad_w.any()
    x = torch.randn(3, 5, K)
    xr = fake_quant_act_int8(x) if isinstance(scheme, IntWeightInt8Act) else x
    if isinstance(scheme, Int8DynamicInt4Weight):  # x to int8 per token and weight group (of the padded width)
        xq, sx = ref_gemm.quantize_per_group_int8(F.pad(x, (0, Kp - K)).reshape(-1, Kp), g)
        xr = (xq.float() * sx.repeat_interleave(g, dim=1))[:, :K].reshape(x.shape)
    out = q(x)
    assert out.shape == (3, 5, N)
    assert rel_err(out, F.linear(xr.double(), w_ref.double(), lin.bias.double())) < 1e-5
    # state_dict round trip into a freshly built layer
    q2 = QuantLinear(K, N, scheme)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2(x), out)
    if Kp > K:  # x must have the real K, not the padded width
        with pytest.raises(ValueError, match=f"K={K}"):
            q(torch.randn(2, Kp))


def test_ragged_asymmetric_padding_with_out_of_range_zero_point():
    """Checkpoint zero points may lie outside the code range (GPTQ v1 reads 2^b as a zero): the padding codes are
    clamped, and the zero inputs still make the padding add nothing."""
    N, K, g = 8, 40, 32
    q = torch.randint(-8, 8, (N, K), dtype=torch.int8)
    scale = torch.rand(N, 2) + 0.5
    zp = torch.full((N, 2), 8, dtype=torch.int32)
    layer = QuantLinear.from_codes(q, scale, zp, Int4WeightOnly(g))
    assert torch.equal(layer._stored_codes()[:, K:], torch.full((N, 64 - K), 7, dtype=torch.int8))
    x = torch.randn(4, K)
    w = scale.repeat_interleave(g, 1)[:, :K] * (q.float() - 8)
    assert rel_err(layer(x), x.double() @ w.double().t()) < 1e-6


def test_ragged_act_order_and_shards():
    N, K, g = 48, 200, 64
    gen = torch.Generator().manual_seed(5)
    q = torch.randint(-8, 8, (N, K), generator=gen, dtype=torch.int8)
    scale = torch.rand(N, 4, generator=gen) * 0.02 + 0.001
    zp = torch.randint(-8, 8, (N, 4), generator=gen, dtype=torch.int32)
    perm = torch.randperm(K, generator=gen)
    layer = QuantLinear.from_codes(q, scale, zp, Int4WeightOnly(g), torch.randn(N, generator=gen), perm)
    w_stored = scale.repeat_interleave(g, 1)[:, :K] * (q.float() - zp.float().repeat_interleave(g, 1)[:, :K])
    w = torch.empty_like(w_stored)
    w[:, perm] = w_stored
    assert torch.equal(layer.dequantize(), w)
    x = torch.randn(6, K, generator=gen)
    assert rel_err(layer(x), F.linear(x.double(), w.double(), layer.bias.double())) < 1e-6
    shards = [layer.shard(r, 2, 0) for r in range(2)]
    assert torch.equal(torch.cat([s(x) for s in shards], -1), layer(x))
    plain = QuantLinear.from_codes(q, scale, zp, Int4WeightOnly(g))
    with pytest.raises(ValueError, match="whole groups"):
        plain.shard(0, 2, 1)


def test_quantize_and_native_save_load_ragged(tmp_path):
    model = tiny_llama(intermediate=96)  # down_proj: K=96 = one group of 64 + a ragged group of 32
    qkernels.quantize_(model, Int4WeightOnly(64))
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantLinear) and tuple(down.scale.shape) == (64, 2)
    ref = logits(model)
    qkernels.save_quantized(model, str(tmp_path))
    loaded = qkernels.load_quantized(str(tmp_path))
    assert torch.equal(logits(loaded), ref)


# ---- the algorithms build QuantLinear ------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg, act, want", [
    (QuantConfig(4, 64, False), False, Int4WeightOnly(64, False, 4)),
    (QuantConfig(3, 64, True), False, Int4WeightOnly(64, True, 3)),
    (QuantConfig(8, -1, True), False, Int8WeightOnly()),
    (QuantConfig(8, 64, False), False, Int8WeightOnly(64, False)),
    (QuantConfig(6, -1, True), False, Int8WeightOnly()),
    (QuantConfig(4, -1, True), False, Int8WeightOnly(-1, True)),  # odd K=97: no nibble packing, int8 storage
    (QuantConfig(4, 64, True), True, IntWeightInt8Act(4, 64, True)),
    (QuantConfig(8, -1, True), True, IntWeightInt8Act(8, -1, True)),
])
def test_scheme_for(cfg, act, want):
    K = 97 if want == Int8WeightOnly(-1, True) else 200
    assert scheme_for(cfg, K, act) == want


@pytest.fixture(scope="module")
def ragged_model():
    # hidden 96 and intermediate 160 with groups of 64: every projection has a ragged last group
    from qkernels.eval.models import tiny_llama as eval_llama

    m = eval_llama(vocab_size=256, hidden=96, layers=2, intermediate=160)
    ids = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    return m, ids


def _as_float(model):
    """The model with every QuantLinear replaced by an nn.Linear holding its dequantized weight."""
    f = copy.deepcopy(model)
    for name, m in list(f.named_modules()):
        if isinstance(m, QuantLinear):
            lin = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                lin.weight.copy_(m.dequantize())
                if m.bias is not None:
                    lin.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(f.get_submodule(parent), child, lin)
    return f


@pytest.mark.parametrize("algo", ["rtn", "gptq", "awq"])
def test_algorithms_output_quantlinear(ragged_model, algo):
    m, ids = ragged_model
    cfg = QuantConfig(4, 64, False)
    orig = {n: x.weight.detach().clone() for n, x in m.named_modules() if isinstance(x, nn.Linear)}
    if algo == "rtn":
        q = rtn_quantize_model(copy.deepcopy(m), cfg)
    elif algo == "gptq":
        q = gptq_quantize_model(copy.deepcopy(m), [ids], GPTQConfig(cfg, act_order=True), progress=False)
    else:
        q = awq_quantize_model(copy.deepcopy(m), [ids], AWQConfig(cfg, n_grid=4), progress=False)
    layers = {n: x for n, x in q.named_modules() if isinstance(x, QuantLinear)}
    assert len(layers) == 14 and type(q.lm_head) is nn.Linear
    assert all(x.scheme == Int4WeightOnly(64, False, 4) for x in layers.values())
    assert any(x.in_features % 64 for x in layers.values())
    if algo == "rtn":  # bit-identical to the fake-quantization grid that GPTQ / AWQ / QAT use
        for n, x in layers.items():
            assert torch.equal(x.dequantize(), fake_quantize(orig[n], cfg))
    if algo == "gptq":
        assert any(x.input_perm is not None for x in layers.values())
    with torch.no_grad():
        out, exp = q(ids).logits, _as_float(q)(ids).logits
    assert rel_err(out, exp) < 1e-5


def test_gptq_result_to_quantlinear_ragged():
    """build_quant_linear of a ragged act-order GPTQ result holds exactly scale * (q - zero) of the result."""
    N, K, g = 32, 200, 64
    cfg = QuantConfig(4, g, False)
    lin = make_linear(K, N, seed=3)
    x = torch.randn(256, K, generator=torch.Generator().manual_seed(4))
    res = gptq_quantize_weight(lin.weight.data, 2 * x.t() @ x / 256, GPTQConfig(cfg, act_order=True, block_size=64))
    ql = build_quant_linear(lin, cfg, res.q, res.scale, res.zero_point, res.perm)
    qf = res.q[:, :K].float()
    w_stored = res.scale.repeat_interleave(g, 1)[:, :K] * (qf - res.zero_point.float().repeat_interleave(g, 1)[:, :K])
    w = torch.empty_like(w_stored)
    w[:, res.perm] = w_stored
    assert torch.equal(ql.dequantize(), w)
    # g_idx of the export: the group of each input feature, the last (ragged) group included. v2 zeros: an
    # asymmetric group may have the unsigned zero 0, which v1 (zero - 1) cannot store
    t = export_gptq_tensors(res, 4, lin.bias, v2=True)
    assert torch.equal(t["g_idx"], res.g_idx) and int(t["g_idx"].max()) == 3
    assert int((t["g_idx"] == 3).sum()) == K - 3 * g


def test_eval_schemes_are_quantlinear(ragged_model):
    from qkernels.eval import metrics, runner

    m, ids = ragged_model
    cfg = runner.EvalConfig(group_size=64, awq_grid=2, qat_steps=1, progress=False)
    for name in ("int8", "rtn-int4", "gptq-int4", "awq-int4", "qat-int4"):
        q = runner._quantize(name, m, cfg, {"gptq": [ids], "awq": [ids]}, ids)
        layers = [x for x in q.modules() if isinstance(x, QuantLinear)]
        assert len(layers) == 14, name
        with torch.no_grad():
            assert rel_err(q(ids).logits, _as_float(q)(ids).logits) < 1e-5, name
    # bits per weight: codes of the padded width + one fp32 scale per group (symmetric: no zero points)
    r = runner._quantize("rtn-int4", m, cfg, None, None)
    lin = [x for x in r.modules() if isinstance(x, QuantLinear)]
    expect = sum(x.out_features * (x.padded_in_features * 4 + x.scale.shape[1] * 32) for x in lin) / \
        sum(x.out_features * x.in_features for x in lin)
    assert metrics.bits_per_weight(r) == pytest.approx(expect)


def test_ragged_compile_fullgraph():
    torch._dynamo.reset()
    model = nn.Sequential(QuantLinear.from_linear(make_linear(200, 64, seed=1), Int4WeightOnly(64)),
                          QuantLinear.from_linear(make_linear(64, 32, seed=2), IntWeightInt8Act(8, 48)))
    x = torch.randn(3, 200)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="eager")(x)
    assert rel_err(compiled, eager) < 1e-6
