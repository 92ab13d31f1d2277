"""AWQ's per-family layer mappings (qkernels.algorithms.families), proven by invariance, and AWQ / GPTQ on tiny
random models of every supported decoder family."""

import copy
import dataclasses

import pytest
import torch

from qkernels.algorithms import AWQConfig, GPTQConfig, QuantConfig, awq_quantize_model, gptq_quantize_model
from qkernels.algorithms import families
from qkernels.algorithms._layers import UnsupportedModel
from qkernels.nn import QuantLinear

pytest.importorskip("transformers")
from qkernels.eval.models import TINY_FAMILIES, tiny_causal_lm  # noqa: E402


def _ids(seed=0, B=2, L=32):
    return torch.randint(3, 256, (B, L), generator=torch.Generator().manual_seed(seed))


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@torch.no_grad()
def _logits(m, ids):
    return m(input_ids=ids).logits.float()


@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_random_scales_fold_invariant(model_type, kv_heads):
    """Folding random scales in [1/e, e] into every group of the family's mapping leaves the float logits unchanged
    (with GQA the v -> o group does not apply: checked via the count of groups)."""
    m = tiny_causal_lm(model_type, kv_heads)
    ids = _ids()
    ref = _logits(m, ids)
    fam = families.family_of(m)
    gen = torch.Generator().manual_seed(1)
    applied = 0
    for layer in m.model.layers:
        for grp in fam.groups:
            if grp.applies(layer):
                K = layer.get_submodule(grp.linears[0]).in_features
                families.fold(layer, grp, torch.exp(torch.rand(K, generator=gen) * 2 - 1))
                applied += 1
    assert applied == len(m.model.layers) * (4 if kv_heads == 4 else 3)
    out = _logits(m, ids)
    assert _rel(out, ref) < 1e-4
    assert not torch.equal(out, ref) or applied == 0  # the weights really changed (the test can fail)


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_awq_scales_without_quantization_invariant(model_type):
    m = tiny_causal_lm(model_type, 4)
    ids = _ids()
    ref = _logits(m, ids)
    w0 = copy.deepcopy(m.state_dict())
    awq_quantize_model(m, [ids], AWQConfig(QuantConfig(4, 32), n_grid=5, clip=False), progress=False, quantize=False)
    assert any(not torch.equal(v, w0[k]) for k, v in m.state_dict().items())  # some scales were folded
    assert _rel(_logits(m, ids), ref) < 1e-4


@pytest.mark.parametrize("model_type", TINY_FAMILIES)
def test_int8_awq_and_gptq_close_to_float(model_type):
    base = tiny_causal_lm(model_type, 2)
    ids = _ids()
    ref = _logits(base, ids)
    q8 = QuantConfig(8, 32)
    awq = awq_quantize_model(copy.deepcopy(base), [ids], AWQConfig(q8, n_grid=3, clip_grid=4), progress=False)
    gptq = gptq_quantize_model(copy.deepcopy(base), [ids], GPTQConfig(q8, act_order=True), progress=False)
    for m in (awq, gptq):
        assert all(isinstance(m.model.layers[i].get_submodule(n), QuantLinear)
                   for i in range(2) for grp in families.family_of(m).sequential for n in grp)
        assert _rel(_logits(m, ids), ref) < 0.02


def test_gemma_plain_norm_fold_is_refused(monkeypatch):
    """The defect this mapping fixes: Gemma's norms compute x_hat * (1 + w), folding 1/s into w is wrong; the
    invariance check catches a wrong mapping before any layer is touched."""
    m = tiny_causal_lm("gemma2", 4)
    fam = families.family_of(m)
    wrong = dataclasses.replace(fam, groups=tuple(
        dataclasses.replace(g, fold=families.NORM) if g.fold == families.NORM_PLUS_ONE else g for g in fam.groups))
    ids = _ids()
    x_err = families.invariance_error(m.model.layers[0], wrong, m.model.embed_tokens(ids), _layer_kwargs(m, ids))
    assert x_err > 1e-2
    monkeypatch.setitem(families.FAMILIES, "gemma2", wrong)
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(UnsupportedModel, match="changes its float output"):
        awq_quantize_model(m, [ids], AWQConfig(QuantConfig(4, 32), n_grid=2), progress=False)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # untouched
    with pytest.warns(UserWarning, match="falling back to round-to-nearest"):
        awq_quantize_model(m, [ids], AWQConfig(QuantConfig(4, 32), n_grid=2, fallback_rtn=True), progress=False)
    assert isinstance(m.model.layers[0].mlp.down_proj, QuantLinear)


def _layer_kwargs(m, ids):
    from qkernels.algorithms._layers import capture_layer_inputs

    _, kws = capture_layer_inputs(m, [ids])
    return kws[0]


def test_unknown_family_refused():
    m = tiny_causal_lm("llama", 2)
    m.config.model_type = "mystery"
    ids = _ids()
    with pytest.raises(UnsupportedModel, match="no layer mapping for model_type 'mystery'"):
        awq_quantize_model(m, [ids], AWQConfig(QuantConfig(4, 32)), progress=False)
    with pytest.warns(UserWarning, match="falling back"):
        awq_quantize_model(m, [ids], AWQConfig(QuantConfig(4, 32), fallback_rtn=True), progress=False)
    assert isinstance(m.model.layers[1].self_attn.q_proj, QuantLinear)
