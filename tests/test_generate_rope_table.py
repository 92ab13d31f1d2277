"""CompiledDecoder's rotary tables (qkernels.generate.RotaryTable): the lookup returns the rotary module's own cos/sin,
only inside the decoder's calls; modules whose frequencies depend on the sequence are left alone."""

import pytest
import torch

from qkernels.eval.models import tiny_llama
from qkernels.generate import CompiledDecoder, RotaryTable, _rope_tables


def _rotary(model):
    return model.model.rotary_emb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_equals_module_per_position(dtype):
    model = tiny_llama(layers=1, hidden=64, intermediate=128, seed=0)
    rot = _rotary(model)
    table = RotaryTable(rot, 40, torch.device("cpu"))
    table.active = True
    x = torch.randn(1, 1, 64).to(dtype)
    for pos in ([[0]], [[7]], [[39]], [list(range(12))], [[3, 1, 30]]):
        pid = torch.tensor(pos)
        c, s = table(x, pid)
        c0, s0 = rot(x, pid)
        assert c.dtype == c0.dtype == dtype
        assert torch.equal(c, c0) and torch.equal(s, s0)
    table.active = False
    with pytest.raises(IndexError):  # active: the table covers max_len positions only
        table.active = True
        table(x, torch.tensor([[40]]))
    table.active = False
    c, _ = table(x, torch.tensor([[40]]))  # inactive: the original module (any position)
    assert torch.equal(c, rot(x, torch.tensor([[40]]))[0])


def test_decoder_installs_tables_active_only_inside_calls():
    model = tiny_llama(layers=1, hidden=64, intermediate=128, seed=0).eval()
    orig = _rotary(model)
    dec = CompiledDecoder(model, max_len=16)
    assert isinstance(_rotary(model), RotaryTable) and _rotary(model).original is orig
    assert not _rotary(model).active
    dec.generate([1, 2, 3], 3)
    assert not _rotary(model).active  # restored after the call
    off = tiny_llama(layers=1, hidden=64, intermediate=128, seed=0).eval()
    CompiledDecoder(off, max_len=16, rope_table=False)
    assert not isinstance(_rotary(off), RotaryTable)


def test_dynamic_rope_is_left_alone():
    model = tiny_llama(layers=1, hidden=64, intermediate=128, seed=0)
    _rotary(model).rope_type = "dynamic"
    assert _rope_tables(model, 16) == []
    assert not isinstance(_rotary(model), RotaryTable)


def test_non_table_module_is_left_alone():
    class FakeRotaryEmbedding(torch.nn.Module):  # cos/sin depend on the batch of positions: not a fixed table
        def forward(self, x, position_ids):
            v = position_ids.float()[..., None] / position_ids.numel()
            return v.cos(), v.sin()

    model = torch.nn.Sequential(FakeRotaryEmbedding())
    assert _rope_tables(model, 8) == []
    assert isinstance(model[0], FakeRotaryEmbedding)


def test_skip_guards_survives_a_thread_count_change():
    """With skip_guards, dynamo refuses to recompile; a change a guard watches (here the thread count, as
    bench_decode's 1- and 2-thread runs of one decoder) must recompile, not raise."""
    model = tiny_llama(layers=1, hidden=64, intermediate=128, seed=0).eval()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        dec = CompiledDecoder(model, max_len=16, skip_guards=True)
        first = dec.generate([1, 2, 3], 5)[0]
        torch.set_num_threads(2)
        assert dec.generate([1, 2, 3], 5)[0] == first
        torch.set_num_threads(1)
        assert dec.generate([1, 2, 3], 5)[0] == first
    finally:
        torch.set_num_threads(old)
