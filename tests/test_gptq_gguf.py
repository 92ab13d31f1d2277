"""GPTQ with GGUF block formats as the grid (qkernels.algorithms.gptq_gguf): exact bytes, lower layer error than
llama.cpp's own quantizer, the identity-Hessian limit, the model driver + export, the eval schemes."""

import json
import math

import pytest
import torch

from qkernels import gguf as qg
from qkernels.algorithms.gptq_gguf import (GGUFGPTQConfig, gguf_quantize_model, gptq_gguf_quantize_model,
                                           gptq_gguf_quantize_weight)
from qkernels.nn.gguf_linear import GGUFLinear
from qkernels.reference import gguf as ref

from .test_eval import tiny_dir  # noqa: F401 - the tiny Llama + tokenizer directory fixture

K_QUANTS = ("Q4_K", "Q5_K", "Q6_K", "Q3_K", "Q2_K")
LEGACY = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")


def correlated_problem(N, K, seed=0, n=1024):
    """A weight [N, K] and the Hessian 2 X^T X / n of correlated activations with unequal channel scales (as in
    LLMs); returns (W, X, H)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g) * 0.05
    mix = torch.randn(K, K, generator=g) / K ** 0.5 + torch.eye(K)
    X = (torch.randn(n, K, generator=g) @ mix) * torch.exp(torch.randn(K, generator=g) * 0.5)
    return W, X, 2 * X.t() @ X / n


def out_err(X, W, What):
    return float((X @ (W - What).t()).pow(2).mean())


@pytest.mark.parametrize("t", list(ref.CODES))
def test_pack_codes_under_an_encoder_header_decode_as_block_affine(t):
    bs, ts = ref.BLOCK[ref.TYPES[t] if isinstance(t, str) else t]
    g = torch.Generator().manual_seed(t)
    x = torch.randn(6, 2 * bs, generator=g)
    data = qg.quantize(x, t).reshape(-1, ts)
    off, cmax = ref.CODES[t][:2]
    codes = torch.randint(0, cmax + 1, (data.shape[0], bs), generator=g)
    packed = ref.pack_codes(data, t, codes)
    scale, o, bias = ref.block_affine(packed, t)
    assert o == off
    # the independent decoders (reference and C++) read exactly scale * (code - offset) + bias
    assert torch.equal(ref.affine_decode(scale, o, bias, codes), ref.DECODERS[t](packed))
    assert torch.equal(ref.affine_decode(scale, o, bias, codes),
                       qg.dequantize(packed.reshape(6, -1), t, (6, 2 * bs)).reshape(-1, bs))
    # re-packing the encoder's own codes gives the encoder's bytes back: headers untouched, code fields complete
    enc_scale, _, enc_bias = ref.block_affine(data, t)
    dec = ref.DECODERS[t](data)
    own = torch.round((dec - (0 if enc_bias is None else enc_bias)) / torch.where(enc_scale != 0, enc_scale, 1)) + off
    own = torch.where(enc_scale != 0, own, torch.full_like(own, off)).clamp(0, cmax).to(torch.int32)
    keep = (enc_scale != 0).all(1)
    assert torch.equal(ref.pack_codes(data, t, own)[keep], data[keep])
    with pytest.raises(ValueError, match=rf"codes must be in \[0, {cmax}\]"):
        ref.pack_codes(data, t, codes + cmax + 1)


@pytest.mark.parametrize("t", ["Q4_K", "Q6_K", "Q5_K", "Q5_0", "Q8_0", "Q4_0", "Q3_K"])
def test_gptq_gguf_bytes_are_exact_and_beat_llama_cpp(t):
    bs = ref.BLOCK[ref.TYPES[t]][0]
    K = 2 * bs if bs == 256 else 160
    W, X, H = correlated_problem(24, K, seed=ref.TYPES[t])
    res = gptq_gguf_quantize_weight(W, H, t)
    assert res.data.dtype == torch.uint8 and res.data.shape == qg.quantize(W, t).shape
    # the bytes are a normal GGUF tensor that decodes (C++ and reference) to exactly the weights GPTQ accounted for
    assert torch.equal(qg.dequantize(res.data, t, W.shape), res.weight)
    assert torch.equal(ref.gguf_dequantize(res.data, ref.TYPES[t], *W.shape, torch.float32), res.weight)
    plain = qg.dequantize(qg.quantize(W, t), t, W.shape)
    e_gptq, e_plain = out_err(X, W, res.weight), out_err(X, W, plain)
    assert e_gptq < 0.8 * e_plain, (t, e_gptq, e_plain)
    assert math.isfinite(res.loss) and res.loss > 0


@pytest.mark.parametrize("t", ["Q4_K", "Q6_K", "Q5_0"])
@pytest.mark.parametrize("opt", [dict(act_order=True), dict(imatrix=True), dict(block_size=48)])
def test_gptq_gguf_options(t, opt):
    K = 512 if t != "Q5_0" else 96
    W, X, H = correlated_problem(16, K, seed=3)
    res = gptq_gguf_quantize_weight(W, H, t, GGUFGPTQConfig(**opt))
    assert torch.equal(qg.dequantize(res.data, t, W.shape), res.weight)
    plain = qg.dequantize(qg.quantize(W, t), t, W.shape)
    assert out_err(X, W, res.weight) < 0.8 * out_err(X, W, plain)


@pytest.mark.parametrize("t", K_QUANTS + LEGACY)
def test_identity_hessian_gives_llama_cpp_quantization(t):
    """With H = I GPTQ spreads no error, so each column is rounded to the encoder's grid: the K-quants (whose
    encoders round codes to nearest with the final scales) give llama.cpp's bytes; the legacy types round
    slightly differently (x * (1/d) + 0.5 truncated) and may only differ at near-ties, never with a larger error."""
    bs = ref.BLOCK[ref.TYPES[t]][0]
    W = torch.randn(8, 2 * bs, generator=torch.Generator().manual_seed(1))
    W[0, :bs] = 0  # an all-zero block
    res = gptq_gguf_quantize_weight(W, torch.eye(2 * bs), t)
    plain = qg.quantize(W, t)
    if t in K_QUANTS:
        assert torch.equal(res.data, plain)
    else:
        p = qg.dequantize(plain, t, W.shape)
        assert float((res.weight - W).pow(2).sum()) <= float((p - W).pow(2).sum())
        assert (res.weight != p).float().mean() < 0.01


def test_dead_inputs_are_zeroed_and_bytes_still_exact():
    W, X, H = correlated_problem(8, 256, seed=5)
    H[:, 7] = 0
    H[7, :] = 0
    res = gptq_gguf_quantize_weight(W, H, "Q4_K")
    assert torch.equal(qg.dequantize(res.data, "Q4_K", W.shape), res.weight)


def test_bad_input():
    W, _, H = correlated_problem(4, 576, seed=0)
    with pytest.raises(ValueError, match="K=576 must be a multiple of the Q4_K block size 256"):
        gptq_gguf_quantize_weight(W, H, "Q4_K")
    with pytest.raises(ValueError, match="type must be one of"):
        gptq_gguf_quantize_weight(W, H, "Q9_9")
    with pytest.raises(ValueError, match="integer codes for GPTQ"):
        gptq_gguf_quantize_weight(W, H, "MXFP4")
    with pytest.raises(ValueError, match="integer codes for GPTQ"):
        gptq_gguf_quantize_weight(W, H, "F16")
    with pytest.raises(ValueError, match=r"H must have shape \[K, K\]"):
        gptq_gguf_quantize_weight(W, H[:32, :32], "Q5_0")
    Wn = W.clone()
    Wn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        gptq_gguf_quantize_weight(Wn, H, "Q5_0")
    with pytest.raises(ValueError, match="2-D weight"):
        gptq_gguf_quantize_weight(W[0], H, "Q5_0")
    with pytest.raises(ValueError, match="not an affine grid"):
        ref.block_affine(torch.zeros(1, 17, dtype=torch.uint8), ref.TYPES["MXFP4"])
    with pytest.raises(ValueError, match="damp_percent"):
        GGUFGPTQConfig(damp_percent=2)


# ---- model level ---------------------------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0):
    """hidden 64 (Q4_K falls back to Q5_0, attn_v's Q6_K to Q8_0), intermediate 256 (ffn_down is a real K-quant:
    Q4_K in layer 0, Q6_K in the last layer by llama.cpp's use_more_bits)."""
    from qkernels.eval.models import tiny_llama as build

    return build(vocab_size=300, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=256, seed=seed)


def _batches(n, L=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 300, (2, L), generator=g) for _ in range(n)]


def test_model_gptq_q4_k_m_types_export_and_quality(tmp_path):
    import copy

    from qkernels.formats.gguf import hf_to_gguf_name, read_tensors, rope_permute_rows

    base = tiny_llama()
    calib, held = _batches(4), _batches(2, seed=1)
    q = gptq_gguf_quantize_model(copy.deepcopy(base), calib, "Q4_K_M", progress=False)
    plain = gguf_quantize_model(copy.deepcopy(base), "Q4_K_M")
    types = {}
    for name, m in q.named_modules():
        if isinstance(m, GGUFLinear):
            types[name] = m.type_name
            assert plain.get_submodule(name).type_name == m.type_name
    assert types["model.layers.0.mlp.down_proj"] == "Q4_K" and types["model.layers.1.mlp.down_proj"] == "Q6_K"
    assert types["model.layers.1.self_attn.v_proj"] == "Q8_0" and types["model.layers.0.self_attn.q_proj"] == "Q5_0"
    assert len(types) == 14 and not isinstance(q.lm_head, GGUFLinear)

    def err(m, batches):
        with torch.no_grad():
            return sum(float((m(b).logits - base(b).logits).pow(2).mean()) for b in batches)

    assert err(q, calib) < err(plain, calib)
    assert err(q, held) < err(plain, held)

    # export writes the GPTQ bytes unchanged (q/k rows rope-permuted, as llama.cpp stores them)
    path = tmp_path / "gptq.gguf"
    plan = qg.export_gguf(q, path, "Q4_K_M")
    tensors, _ = read_tensors(path)
    for name, t in types.items():
        gname = hf_to_gguf_name(name + ".weight")
        assert plan[gname] == t
        data = q.get_submodule(name).data
        if gname.endswith(("attn_q.weight", "attn_k.weight")):
            data = rope_permute_rows(data, 4 if "attn_q" in gname else 2)
        assert torch.equal(tensors[gname][2], data), gname


def test_plain_model_quantization_is_llama_cpp_per_tensor():
    import copy

    base = tiny_llama(seed=1)
    q = gguf_quantize_model(copy.deepcopy(base), "Q4_K_M")
    down = base.model.layers[0].mlp.down_proj
    assert torch.equal(q.model.layers[0].mlp.down_proj.data, qg.quantize(down.weight.detach(), "Q4_K"))
    im = {"model.layers.0.mlp.down_proj": torch.rand(256, generator=torch.Generator().manual_seed(0)) + 0.1}
    qi = gguf_quantize_model(copy.deepcopy(base), "Q4_K_M", imatrix=im)
    want = qg.quantize(down.weight.detach(), "Q4_K", im["model.layers.0.mlp.down_proj"])
    assert torch.equal(qi.model.layers[0].mlp.down_proj.data, want)
    assert not torch.equal(want, q.model.layers[0].mlp.down_proj.data)
    assert torch.equal(qi.model.layers[1].mlp.down_proj.data, q.model.layers[1].mlp.down_proj.data)  # no entry


def test_model_errors():
    m = tiny_llama()
    with pytest.raises(ValueError, match="mix must be one of"):
        gptq_gguf_quantize_model(m, _batches(1), "Q4_K_S")
    with pytest.raises(ValueError, match="mix must be one of"):
        gguf_quantize_model(m, "F16")
    with pytest.raises(ValueError, match="at least one"):
        gptq_gguf_quantize_model(m, [], "Q4_K_M")


def test_eval_runs_the_gguf_schemes(tiny_dir, tmp_path):
    from qkernels.cli import main
    from qkernels.eval import runner

    d, text = tiny_dir
    assert "gptq-q4_k_m" not in runner.DEFAULT_SCHEMES  # opt-in: it costs minutes on the default model
    rc = main(["eval", "--model", str(d), "--text", str(text), "--schemes", "q8_0,q4_k_m", "--gguf-gptq",
               "--ctx", "64", "--eval-tokens", "192", "--calib-tokens", "192", "--calib-ctx", "64", "--no-progress",
               "--out", str(tmp_path / "o")])
    assert rc == 0
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    rows = {r["scheme"]: r for r in res["rows"]}
    assert list(rows) == ["float", "q8_0", "q4_k_m", "gptq-q4_k_m"]
    # stored bits incl. block headers: Q8_0 blocks are 34 bytes / 32 weights; with rows of 64 and 128 Q4_K_M
    # mixes Q5_0 (5.5 bits, Q4_K's fallback) and Q8_0 (8.5, the fallback of attn_v's and ffn_down's Q6_K) tensors
    assert rows["q8_0"]["bits_per_weight"] == pytest.approx(8.5)
    assert 5.5 < rows["q4_k_m"]["bits_per_weight"] < 8.5
    assert rows["gptq-q4_k_m"]["bits_per_weight"] == rows["q4_k_m"]["bits_per_weight"]
    for r in rows.values():
        assert r["ppl"] > 1 and math.isfinite(r["dppl_pct"])
    assert "gptq-q4_k_m" in runner.format_table(res["rows"])


def test_block_start_sees_exactly_updated_columns_across_lazy_batches():
    """A grid block that crosses GPTQ's lazy batch boundary must see the pending updates of the batch's already
    quantized columns: the block starts' inputs equal those of a run whose lazy batch holds every column."""
    from qkernels.algorithms.gptq import ColumnGrid, _inverse_cholesky, gptq_column_loop

    class Recording(ColumnGrid):
        block = 32

        def __init__(self):
            self.seen = []

        def start(self, col, w):
            self.seen.append(w.clone())

        def quantize(self, col, w):
            return torch.round(w * 4) / 4

    with pytest.raises(TypeError, match="abstract"):
        ColumnGrid()  # quantize() is abstract: a grid must define how it rounds

    W, _, H = correlated_problem(8, 160, seed=7)
    Hinv = _inverse_cholesky(H, 0.01)
    runs = []
    for bsz in (48, 160):
        g = Recording()
        gptq_column_loop(W.clone() * 10, Hinv, g, bsz)
        runs.append(g.seen)
    assert len(runs[0]) == 5
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
