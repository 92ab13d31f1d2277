"""The compiled decode path of benchmarks/bench_decode (StaticCache + one compiled single-token step) on a tiny random
Llama with int4 QuantLinear layers: same greedy tokens as the eager loop, one graph, no graph break, no recompile when
generating again with another prompt."""

import torch

from qkernels.generate import CompiledDecoder, eager_generate
from benchmarks.decode_models import weight_bytes
from qkernels.eval.models import tiny_llama
from qkernels.nn import Int4WeightOnly, QuantLinear, quantize_


def _model():
    model = tiny_llama(layers=1, hidden=64, intermediate=128, seed=0)
    with torch.no_grad():  # larger weights than the default init, so that greedy tokens vary along the sequence
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0, 0.3)
    return quantize_(model, Int4WeightOnly(group_size=32))


def test_compiled_static_cache_decode_matches_eager():
    import torch._dynamo.utils

    model = _model()
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 7
    prompts = [[5, 17, 99, 3, 250, 41, 7], [200, 1, 64, 33]]
    eager = [eager_generate(model, p, 10)[0] for p in prompts]
    assert len(set(eager[0])) > 2, eager  # a sequence that varies, so the comparison means something

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    dec = CompiledDecoder(model, max_len=32)
    compiled = [dec.generate(p, 10)[0] for p in prompts]
    assert compiled == eager
    assert dec.generate(prompts[0], 10)[0] == eager[0]  # the cache is reset in place between generations
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0


def test_weight_bytes_counts_tied_weights_once():
    model = tiny_llama(vocab_size=256, hidden=64, layers=1, intermediate=128)
    params = {id(p): p for p in model.parameters()}.values()
    expected = sum(p.numel() * p.element_size() for p in params)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert weight_bytes(model) == expected
    quantize_(model, Int4WeightOnly(group_size=32))
    assert weight_bytes(model) < expected
