"""qkernels::decode_attention (one query per sequence over a KV cache) against its reference, transformers' eager
attention, argument checks, opcheck, and the transformers registration used by CompiledDecoder."""

import math

import pytest
import torch

import qkernels  # noqa: F401  (loads the ops)
from qkernels import _ext
from qkernels.ops import decode_attention
from qkernels.reference.attention import decode_attention as ref_decode_attention

needs_c = pytest.mark.skipif(not _ext.has_kernel("decode_attention", "CPU"), reason="qkernels._C not built")


def _inputs(B, H, KVH, L, D, dtype, open_len=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, D, generator=g).to(dtype)
    k = torch.randn(B, KVH, L, D, generator=g).to(dtype)
    v = torch.randn(B, KVH, L, D, generator=g).to(dtype)
    mask = None
    if open_len is not None:
        mask = torch.zeros(B, L, dtype=dtype)
        for b in range(B):
            mask[b, open_len[b]:] = torch.finfo(dtype).min
    return q, k, v, mask


def _eager(q, k, v, mask, scale):
    """transformers-style eager attention in fp64 (repeat_kv, additive mask, softmax)."""
    B, H, D = q.shape
    G = H // k.shape[1]
    kk = k.double().repeat_interleave(G, 1)
    vv = v.double().repeat_interleave(G, 1)
    s = torch.einsum("bhd,bhld->bhl", q.double(), kk) * scale
    if mask is not None:
        s = s + mask.double()[:, None, :]
    return torch.einsum("bhl,bhld->bhd", s.softmax(-1), vv)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,H,KVH,L,D,open_len", [
    (1, 9, 3, 32, 64, [5]), (2, 4, 4, 17, 16, [17, 3]), (3, 8, 2, 9, 8, [1, 9, 4]), (1, 6, 1, 40, 32, None),
])
def test_matches_reference_and_eager(dtype, B, H, KVH, L, D, open_len):
    q, k, v, mask = _inputs(B, H, KVH, L, D, dtype, open_len)
    scale = 1 / math.sqrt(D)
    out = decode_attention(q, k, v, mask, scale)
    ref = ref_decode_attention(q, k, v, mask, scale)
    assert out.dtype == dtype and out.shape == (B, H, D)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    exact = _eager(q, k, v, mask, scale)
    assert ((ref.double() - exact).norm() / exact.norm()).item() < tol


@needs_c
def test_closed_positions_are_never_read():
    q, k, v, mask = _inputs(2, 4, 2, 12, 8, torch.float32, [4, 7])
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 4:] = float("nan")  # closed slots of the cache hold garbage (e.g. a static cache's unused tail)
    v2[1, :, 7:] = float("inf")
    out = decode_attention(q, k2, v2, mask)
    torch.testing.assert_close(out, decode_attention(q, k, v, mask))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(ref_decode_attention(q, k2, v2, mask, 1 / math.sqrt(8)), out, rtol=1e-5, atol=1e-5)


@needs_c
def test_mask_values_and_fully_closed_rows():
    q, k, v, _ = _inputs(2, 2, 1, 6, 8, torch.float32)
    mask = torch.tensor([[0.0, -1.5, -torch.inf, 0.3, -torch.inf, 0.0], [-torch.inf] * 6])
    out = decode_attention(q, k, v, mask, 0.5)
    torch.testing.assert_close(out, ref_decode_attention(q, k, v, mask, 0.5), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[0], _eager(q, k, v, mask, 0.5)[0].float(), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[1], torch.zeros_like(out[1]))  # no open position: zeros


@needs_c
def test_empty_and_non_contiguous():
    q, k, v, mask = _inputs(1, 4, 2, 10, 8, torch.float32, [6])
    assert decode_attention(q[:0], k[:0], v[:0], mask[:0]).shape == (0, 4, 8)
    kt = k.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    torch.testing.assert_close(decode_attention(q, kt, v, mask), decode_attention(q, k, v, mask))


def test_argument_errors():
    q, k, v, mask = _inputs(1, 4, 2, 10, 8, torch.float32, [6])
    with pytest.raises(ValueError, match="q must be 3-D"):
        decode_attention(q[None], k, v)
    with pytest.raises(ValueError, match="multiple of k's kv_heads"):
        decode_attention(q[:, :3], k, v)
    with pytest.raises(TypeError, match="same dtype"):
        decode_attention(q.double() if False else q.bfloat16(), k, v)
    with pytest.raises(ValueError, match=r"mask must be \[batch, length\]"):
        decode_attention(q, k, v, mask[:, :5])
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        decode_attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="scale must be finite"):
        decode_attention(q, k, v, mask, float("nan"))


@needs_c
def test_opcheck():
    q, k, v, mask = _inputs(2, 4, 2, 10, 8, torch.float32, [6, 10])
    torch.library.opcheck(torch.ops.qkernels.decode_attention.default, (q, k, v, mask, 0.3))
    torch.library.opcheck(torch.ops.qkernels.decode_attention.default, (q, k, v, None, 0.3))


@needs_c
def test_transformers_registration_matches_sdpa_decode():
    """A tiny Llama decoding with a static cache: the registered attention gives the sdpa model's logits."""
    from transformers import StaticCache

    from qkernels.eval.models import tiny_llama
    from qkernels.generate import DECODE_ATTENTION, register_decode_attention

    register_decode_attention()
    model = tiny_llama(layers=2, hidden=64, intermediate=128, seed=0).eval()  # 4 heads / 2 kv heads (GQA)
    ids = torch.tensor([[5, 17, 99, 3, 250, 41]])
    logits = {}
    for impl in ("sdpa", DECODE_ATTENTION):
        model.set_attn_implementation(impl)
        cache = StaticCache(config=model.config, max_cache_len=16)
        with torch.no_grad():
            model(input_ids=ids, position_ids=torch.arange(6)[None], cache=cache, use_cache=True)
            steps = [model(input_ids=torch.tensor([[t]]), position_ids=torch.tensor([[6 + i]]), cache=cache,
                           use_cache=True).logits for i, t in enumerate([7, 8, 9])]
        logits[impl] = torch.cat(steps)
    torch.testing.assert_close(logits[DECODE_ATTENTION], logits["sdpa"], rtol=1e-4, atol=1e-4)


@needs_c
def test_compiles_fullgraph():
    q, k, v, mask = _inputs(1, 4, 2, 10, 8, torch.float32, [6])
    fn = torch.compile(lambda q, k, v, m: decode_attention(q, k, v, m) * 2, fullgraph=True)
    torch.testing.assert_close(fn(q, k, v, mask), decode_attention(q, k, v, mask) * 2)


@needs_c
def test_compiled_decoder_with_decode_attention_matches_eager():
    import torch._dynamo.utils

    from qkernels.eval.models import tiny_llama
    from qkernels.generate import DECODE_ATTENTION, CompiledDecoder, eager_generate

    model = tiny_llama(layers=1, hidden=64, intermediate=128, seed=0).eval()
    with torch.no_grad():  # larger weights, so that greedy tokens vary along the sequence
        for mod in model.modules():
            if isinstance(mod, torch.nn.Linear):
                mod.weight.normal_(0, 0.3)
    prompt = [5, 17, 99, 3, 250, 41, 7]
    eager = eager_generate(model, prompt, 10)[0]
    assert len(set(eager)) > 2, eager
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    dec = CompiledDecoder(model, max_len=32, attn_implementation=DECODE_ATTENTION, skip_guards=True)
    assert dec.generate(prompt, 10)[0] == eager
    assert dec.generate(prompt, 10)[0] == eager
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert sum(torch._dynamo.utils.counters["graph_break"].values()) == 0
