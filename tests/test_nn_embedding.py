"""QuantEmbedding / quantize_(..., embedding_from_head=True): a tied model's input embedding reads its rows from the
quantized output head's codes instead of keeping a float copy."""

from __future__ import annotations

import copy

import pytest
import torch

import qkernels
from qkernels.nn import (Fp8WeightOnly, Int4WeightOnly, Int8DynamicInt4Weight, Int8WeightOnly, QuantEmbedding,
                         QuantLinear)

from .formats_fixtures import IDS, logits, tiny_llama

pytest.importorskip("transformers")

HEADS = [Int8WeightOnly(), Int4WeightOnly(32), Int4WeightOnly(64, symmetric=True), Int8WeightOnly(32, False),
         Int8DynamicInt4Weight(32)]


@pytest.mark.parametrize("head", HEADS, ids=repr)
def test_logits_equal_a_float_embedding_of_the_dequantized_head(head):
    base = tiny_llama(tie=True)
    m = qkernels.quantize_(copy.deepcopy(base), Int4WeightOnly(32), include_lm_head=head, embedding_from_head=True)
    emb = m.model.embed_tokens
    assert isinstance(emb, QuantEmbedding) and emb.head is m.lm_head
    assert not any(p.numel() == 96 * 64 for p in m.parameters())  # no float table left
    ref = qkernels.quantize_(copy.deepcopy(base), Int4WeightOnly(32), include_lm_head=head)
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(ref.lm_head.dequantize(torch.float32))
    assert torch.equal(logits(m), logits(ref))
    assert torch.equal(emb.weight, m.lm_head.dequantize(torch.float32))


@pytest.mark.parametrize("scheme", [Int4WeightOnly(64), Int4WeightOnly(32, True, bits=3), Int8WeightOnly(),
                                    Int8WeightOnly(64, False), Int8DynamicInt4Weight(64)], ids=repr)
@pytest.mark.parametrize("perm", [False, True])
def test_dequantize_rows_is_rows_of_dequantize(scheme, perm):
    """Ragged K (100 with groups of 64 / per channel) and act-order layers (input_perm) too."""
    N, K = 37, 100
    layer = QuantLinear.from_linear(torch.nn.Linear(K, N), scheme)
    if perm:
        layer = QuantLinear.from_codes(layer.codes(), layer.scale, layer.zero_point, scheme, None,
                                       torch.randperm(K, generator=torch.Generator().manual_seed(1)))
    rows = torch.tensor([5, 0, 36, 5, 12])
    for dtype in (torch.float32, torch.bfloat16):
        want = layer.dequantize(dtype)[rows]
        got = layer._layout.dequantize_rows(layer, rows, dtype)
        assert got.dtype == dtype and torch.equal(got, want)
    emb = QuantEmbedding(layer, torch.bfloat16)
    ids = torch.tensor([[5, 0], [36, 12]])
    assert torch.equal(emb(ids), layer.dequantize(torch.bfloat16)[ids])


def test_rows_follow_model_casts():
    m = qkernels.quantize_(tiny_llama(tie=True), Int4WeightOnly(32), include_lm_head=Int8WeightOnly(),
                           embedding_from_head=True)
    m.to(torch.bfloat16)
    assert m.model.embed_tokens(IDS).dtype == torch.bfloat16


def test_use_int8_activations_moves_the_embedding_to_the_switched_head():
    base = tiny_llama(tie=True)
    m = qkernels.quantize_(copy.deepcopy(base), Int4WeightOnly(32), include_lm_head=Int4WeightOnly(32),
                           embedding_from_head=True)
    qkernels.use_int8_activations(m)
    assert isinstance(m.lm_head.scheme, Int8DynamicInt4Weight) and m.model.embed_tokens.head is m.lm_head
    direct = qkernels.quantize_(copy.deepcopy(base), Int8DynamicInt4Weight(32),
                                include_lm_head=Int8DynamicInt4Weight(32), embedding_from_head=True)
    assert torch.equal(logits(m), logits(direct))


def test_compiles_without_graph_break():
    layer = QuantLinear.from_linear(torch.nn.Linear(64, 96), Int4WeightOnly(32))
    emb = QuantEmbedding(layer, torch.bfloat16)
    ids = torch.tensor([[3, 95, 0]])
    assert torch.equal(torch.compile(emb, fullgraph=True, backend="aot_eager")(ids), emb(ids))


def test_generate_and_save_load_round_trip(tmp_path):
    m = qkernels.quantize_(tiny_llama(tie=True), Int4WeightOnly(32), include_lm_head=Int8WeightOnly(),
                           embedding_from_head=True)
    out = m.generate(IDS[:1, :5], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 9)
    qkernels.save_quantized(m, str(tmp_path))  # the embedding is written as its dequantized float table
    loaded = qkernels.load_quantized(str(tmp_path))
    assert isinstance(loaded.model.embed_tokens, torch.nn.Embedding)
    assert torch.equal(logits(loaded), logits(m))
    m.load_state_dict(m.state_dict())  # its own table loads back (a no-op)
    with pytest.raises(RuntimeError, match="takes no other weight"):
        m.model.embed_tokens.load_state_dict({"weight": torch.zeros(96, 64)})


def test_errors_leave_the_model_untouched():
    base = tiny_llama(tie=True)
    for kwargs, match in [({}, "needs an output head tied"),  # no include_lm_head
                          ({"include_lm_head": Fp8WeightOnly()}, "integer codes")]:
        m = copy.deepcopy(base)
        with pytest.raises(ValueError, match=match):
            qkernels.quantize_(m, Int4WeightOnly(32), embedding_from_head=True, **kwargs)
        assert torch.equal(logits(m), logits(base))
        assert type(m.model.embed_tokens) is torch.nn.Embedding and type(m.lm_head) is torch.nn.Linear
    untied = tiny_llama(tie=False)
    with pytest.raises(ValueError, match="needs an output head tied"):
        qkernels.quantize_(untied, Int4WeightOnly(32), include_lm_head=Int8WeightOnly(), embedding_from_head=True)
    emb = QuantEmbedding(QuantLinear.from_linear(torch.nn.Linear(64, 96), Int8WeightOnly()), torch.float32)
    with pytest.raises(TypeError, match="ids must be int32 or int64"):
        emb(torch.zeros(2))
    with pytest.raises(TypeError, match="head must be a qkernels QuantLinear"):
        QuantEmbedding(torch.nn.Linear(4, 4), torch.float32)
