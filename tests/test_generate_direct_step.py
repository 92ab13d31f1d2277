"""CompiledDecoder(skip_guards=True) calls the code dynamo compiled for its step directly (no frame hook: no guard
check, no cache lookup), one captured step per thread count."""

import pytest
import torch

from qkernels.eval.models import tiny_llama
from qkernels.generate import CompiledDecoder, eager_generate


def _model():
    model = tiny_llama(layers=1, hidden=64, intermediate=128, seed=0).eval()
    with torch.no_grad():  # larger weights than the default init, so that greedy tokens vary along the sequence
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0, 0.3)
    return model


def test_direct_step_gives_the_eager_tokens_and_bypasses_dynamo():
    torch._dynamo.reset()
    model = _model()
    eager = eager_generate(model, [5, 17, 99, 3], 12)[0]
    assert len(set(eager)) > 2, eager
    dec = CompiledDecoder(model, max_len=32, skip_guards=True)
    assert dec.generate([5, 17, 99, 3], 12)[0] == eager
    direct = dec._direct[torch.get_num_threads()]
    assert callable(direct)

    def fail(*a):
        raise AssertionError("the dynamo-wrapped step ran although a direct one was captured")

    dec._guarded_step = fail  # every later step must take the captured code
    assert dec.generate([5, 17, 99, 3], 12)[0] == eager
    assert dec.generate([200, 1, 64], 8)[0] == eager_generate(model, [200, 1, 64], 8)[0]


def test_direct_step_per_thread_count():
    torch._dynamo.reset()
    model = _model()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        dec = CompiledDecoder(model, max_len=16, skip_guards=True)
        first = dec.generate([1, 2, 3], 6)[0]
        torch.set_num_threads(2)  # a guard watches the thread count: a new graph, its own captured step
        assert dec.generate([1, 2, 3], 6)[0] == first
        assert set(dec._direct) == {1, 2}
        torch.set_num_threads(1)
        assert dec.generate([1, 2, 3], 6)[0] == first
    finally:
        torch.set_num_threads(old)


def test_without_skip_guards_every_step_goes_through_dynamo():
    torch._dynamo.reset()
    model = _model()
    dec = CompiledDecoder(model, max_len=16, skip_guards=False)
    first = dec.generate([1, 2, 3], 4)[0]
    assert dec._direct == {}
    dec._guarded_step = lambda *a: pytest.fail("expected")  # noqa: ARG005
    with pytest.raises(pytest.fail.Exception):
        dec.generate([1, 2, 3], 4)
    assert first


def test_cpp_wrapper_step_gives_the_eager_tokens(monkeypatch):
    """cpp_wrapper=True: inductor's wrapper in C++ (int4 QuantLinear layers: the qkernels op is called from it), the
    direct step still captured; the same greedy tokens as eager."""
    import torch._inductor.codecache as cc
    import torch._inductor.config as icfg

    from qkernels.nn import Int4WeightOnly, quantize_

    loads = []
    real = cc.CppWrapperCodeCache.load_pybinding.__func__
    monkeypatch.setattr(cc.CppWrapperCodeCache, "load_pybinding",
                        classmethod(lambda cls, *a, **k: loads.append(1) or real(cls, *a, **k)))
    torch._dynamo.reset()
    model = quantize_(_model(), Int4WeightOnly(group_size=32))
    eager = eager_generate(model, [5, 17, 99, 3], 10)[0]
    assert len(set(eager)) > 2, eager
    dec = CompiledDecoder(model, max_len=24, skip_guards=True, cpp_wrapper=True, mode="default")
    with icfg.patch(force_disable_caches=True):  # a cache hit would load the wrapper another way
        assert dec.generate([5, 17, 99, 3], 10)[0] == eager
    assert loads, "no C++ wrapper was built"
    assert callable(dec._direct[torch.get_num_threads()])
    assert dec.generate([5, 17, 99, 3], 10)[0] == eager
