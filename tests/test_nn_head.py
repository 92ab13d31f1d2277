"""quantize_(..., include_lm_head=...): the output head as a QuantLinear, tied and untied embeddings."""

import copy

import pytest
import torch
from torch import nn

import qkernels
from qkernels.nn import Int4WeightOnly, Int8WeightOnly, QuantLinear
from .conftest import rel_err
from .formats_fixtures import IDS, logits, tiny_llama

transformers = pytest.importorskip("transformers")


def float_head_copy(model):
    """The model with its quantized head replaced by an nn.Linear holding the head's dequantized weight."""
    ref = copy.deepcopy(model)
    head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    head.weight.data = model.lm_head.dequantize()
    ref.lm_head = head
    return ref


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("head", [True, Int8WeightOnly(), Int4WeightOnly(32)], ids=repr)
def test_head_quantized(tie, head):
    model = tiny_llama(tie=tie)
    emb = model.model.embed_tokens.weight.detach().clone()
    w_head = model.lm_head.weight.detach().clone()
    ref_float = logits(model)
    qkernels.quantize_(model, Int4WeightOnly(32), include_lm_head=head)
    assert isinstance(model.lm_head, QuantLinear)
    assert model.lm_head.scheme == (Int4WeightOnly(32) if head is True else head)
    # the embedding lookup stays float and unchanged; a tied model is untied (and told so)
    assert type(model.model.embed_tokens) is nn.Embedding and torch.equal(model.model.embed_tokens.weight, emb)
    assert model.config.tie_word_embeddings is False
    # logits: those of the same model with the dequantized head in float (fp32: the kernels' rounding only)
    out = logits(model)
    assert rel_err(out, logits(float_head_copy(model))) < 1e-5
    # the head's own quantization error is that of its scheme (int8 small, int4 larger), never zero
    err = rel_err(model.lm_head.dequantize(), w_head)
    assert 0 < err < (0.02 if model.lm_head.bits == 8 else 0.2)
    assert 0 < rel_err(out, ref_float) < 0.3
    with torch.no_grad():
        gen = model.generate(IDS[:1], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, IDS.shape[1] + 5)


def test_default_leaves_head_and_bad_option():
    model = tiny_llama(tie=True)
    qkernels.quantize_(model, Int8WeightOnly())
    assert type(model.lm_head) is nn.Linear and model.config.tie_word_embeddings is True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(TypeError, match="include_lm_head must be a bool or a qkernels.nn scheme, got str"):
        qkernels.quantize_(tiny_llama(), Int8WeightOnly(), include_lm_head="int8")


def test_head_with_filter_excluding_everything_else():
    """include_lm_head takes the head whatever filter_fn says; the filter still governs the other layers."""
    model = tiny_llama()
    qkernels.quantize_(model, Int8WeightOnly(), lambda m, n: False, include_lm_head=True)
    names = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert names == ["lm_head"]
