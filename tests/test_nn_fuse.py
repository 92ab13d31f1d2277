"""fuse_projections: q/k/v and gate/up as one QuantLinear, bit-identical logits and generate on tiny HF models."""

import copy
import logging

import pytest
import torch

import qkernels
from qkernels.nn import (Fp4, Fp8Dynamic, Fp8WeightOnly, Int4WeightOnly, Int8Dynamic, Int8DynamicInt4Weight,
                         Int8WeightOnly, IntWeightInt8Act, QuantLinear, fuse_projections)
from qkernels.nn.fuse import FusedLinear, ProjectionSlice
from .formats_fixtures import IDS, tiny_llama

transformers = pytest.importorskip("transformers")

SCHEMES = [Int4WeightOnly(32), Int4WeightOnly(-1, symmetric=True), Int8WeightOnly(), Int8WeightOnly(32, False),
           Int8Dynamic(), IntWeightInt8Act(4, 32), Int8DynamicInt4Weight(64), Fp8WeightOnly(), Fp8Dynamic("row"),
           Fp4("mxfp4", weight_only=True), Fp4("mxfp4")]
PROMPT = torch.randint(0, 96, (1, 30), generator=torch.Generator().manual_seed(1))  # prefill M=30: the GEMM path


def tiny_qwen2(seed=0):
    cfg = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(cfg).eval()  # q/k/v with bias


def fused_pair(make, scheme, dtype):
    model = make().to(dtype)
    qkernels.quantize_(model, scheme)
    fused = copy.deepcopy(model)
    return model, fused, fuse_projections(fused)


def assert_same_outputs(model, fused):
    with torch.no_grad():
        for ids in (IDS, PROMPT):
            assert torch.equal(model(ids).logits, fused(ids).logits)
        kw = dict(max_new_tokens=6, do_sample=False)
        assert torch.equal(model.generate(IDS[:1], **kw), fused.generate(IDS[:1], **kw))
    with torch.inference_mode():  # inference tensors carry no version counter
        assert torch.equal(model(IDS).logits, fused(IDS).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_llama_bit_identical(scheme, dtype):
    model, fused, names = fused_pair(tiny_llama, scheme, dtype)
    assert names == [f"model.layers.{i}.{n}" for i in range(2) for n in ("self_attn.qkv_proj", "mlp.gate_up_proj")]
    attn = fused.model.layers[0].self_attn
    assert isinstance(attn.q_proj, ProjectionSlice) and isinstance(attn.qkv_proj, FusedLinear)
    assert attn.qkv_proj.linear.out_features == 64 + 32 + 32 and attn.k_proj.out_features == 32
    assert isinstance(fused.model.layers[0].self_attn.o_proj, QuantLinear)  # o_proj reads another input
    assert_same_outputs(model, fused)
    assert attn.qkv_proj._outs is None  # every part taken: the kept output is released


@pytest.mark.parametrize("scheme", [Int4WeightOnly(32), Int8Dynamic()], ids=repr)
def test_qwen2_bias_bit_identical(scheme):
    model, fused, names = fused_pair(tiny_qwen2, scheme, torch.float32)
    assert len(names) == 4 and fused.model.layers[1].self_attn.qkv_proj.linear.bias is not None
    assert_same_outputs(model, fused)


def test_fused_layer_is_the_concatenation():
    model, fused, _ = fused_pair(tiny_llama, Int4WeightOnly(32), torch.float32)
    parts = [getattr(model.model.layers[0].mlp, n) for n in ("gate_proj", "up_proj")]
    f = fused.model.layers[0].mlp.gate_up_proj.linear
    assert torch.equal(f.dequantize(), torch.cat([p.dequantize() for p in parts]))
    x = torch.randn(3, 64)
    assert torch.equal(f(x), torch.cat([p(x) for p in parts], -1))


def test_any_call_order_and_new_inputs():
    """A slice called twice with the same input, or with an input changed in place, recomputes: never stale."""
    model, fused, _ = fused_pair(tiny_llama, Int8WeightOnly(), torch.float32)
    a, f = model.model.layers[0].self_attn, fused.model.layers[0].self_attn
    x, y = torch.randn(2, 64), torch.randn(2, 64)
    assert torch.equal(f.v_proj(x), a.v_proj(x)) and torch.equal(f.q_proj(x), a.q_proj(x))
    assert torch.equal(f.q_proj(x), a.q_proj(x))  # q again before k: recomputed
    assert torch.equal(f.k_proj(y), a.k_proj(y))  # another input
    x.mul_(2)  # in place: same object, new version
    assert torch.equal(f.k_proj(x), a.k_proj(x))


def test_skips_with_reason(caplog):
    model = tiny_llama()
    qkernels.quantize_(model, Int4WeightOnly(32), filter_fn=lambda m, n: not n.endswith(("k_proj", "up_proj", "lm_head")))
    qkernels.quantize_(model, Int8WeightOnly(), filter_fn=lambda m, n: "up_proj" in n)  # k stays float
    with caplog.at_level(logging.WARNING, logger="qkernels.nn"):
        names = fuse_projections(model)
    assert names == []  # q/k/v: k is no QuantLinear; gate/up: schemes differ
    assert "schemes differ" in caplog.text
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)


@pytest.mark.parametrize("scheme, why", [(Fp8Dynamic("tensor"), "not per output row"),
                                         (Fp4("nvfp4"), "global_scale differs")], ids=repr)
def test_per_tensor_scales_not_fused(caplog, scheme, why):
    model = tiny_llama()
    qkernels.quantize_(model, scheme)
    with caplog.at_level(logging.WARNING, logger="qkernels.nn"):
        assert fuse_projections(model) == []
    assert why in caplog.text


def test_bad_model():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        fuse_projections("model")


def test_compile_fullgraph_one_gemm_per_group():
    """torch.compile traces the fused model without graph breaks, and the graph holds one GEMM per fused group:
    per layer qkv, o, gate_up, down."""
    from torch._dynamo.testing import CompileCounterWithBackend

    model = tiny_llama()
    qkernels.quantize_(model, Int4WeightOnly(32))
    fuse_projections(model)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("eager")
    with torch.no_grad():
        ref = model(IDS).logits
        out = torch.compile(model, fullgraph=True, backend=counter)(IDS).logits
    assert torch.equal(out, ref)
    gemms = [n for g in counter.graphs for n in g.graph.nodes if "int4_weight_only_mm" in str(n.target)]
    assert len(gemms) == 2 * 4
