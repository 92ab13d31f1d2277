"""GPTQ checkpoints: fixtures packed by a transcription of AutoGPTQ's own pack loop (tests/formats_fixtures.py),
converted by qkernels.formats.gptq; dequantized weights must match the encoded float weights exactly."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import qkernels
from qkernels.algorithms import GPTQConfig, QuantConfig, gptq_quantize_model
from qkernels.formats import CheckpointError, gptq
from qkernels.formats._common import pack_bits, unpack_bits
from qkernels.nn import Int4WeightOnly, Int8WeightOnly, IntWeightInt8Act, QuantLinear

from .conftest import rel_err
from .formats_fixtures import (autogptq_pack_rows, autogptq_pack_zeros, gptq_layer, logits, random_codes, tiny_llama,
                               write_model_dir)
from .test_nn_linear import make_linear


def convert(tensors, bits, group_size, v2, name="layer"):
    cfg = gptq.parse_config({"bits": bits, "group_size": group_size,
                             "checkpoint_format": "gptq_v2" if v2 else "gptq"})
    return gptq.convert_layer(name, {f"{name}.{k}": v for k, v in tensors.items()}, cfg)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("v2", [False, True])
def test_gptq_layer_exact(bits, group_size, sym, act_order, v2):
    K, N = 128, 64
    tensors, w = gptq_layer(K, N, bits, group_size, sym, act_order, v2, seed=bits * 7 + group_size)
    q = convert(tensors, bits, group_size, v2)
    assert isinstance(q, QuantLinear) and (q.in_features, q.out_features) == (K, N)
    assert torch.equal(q.dequantize(), w)  # exact: fp16 scales are exact in fp32, q - z is an exact integer
    if bits <= 4:
        assert isinstance(q.scheme, Int4WeightOnly) and q.kind == "int4"
    else:
        assert isinstance(q.scheme, Int8WeightOnly)
    assert q.act_order == (act_order and group_size != -1)  # one group: the order of features does not matter
    assert q.scheme.symmetric == sym
    x = torch.randn(5, K)
    out = q(x)
    ref = F.linear(x.double(), w.double())
    assert float((out.double() - ref).norm() / ref.norm()) < 1e-5


def test_bias_and_missing_g_idx():
    tensors, w = gptq_layer(64, 32, 4, 32, False, False, False, seed=1, bias=True)
    del tensors["g_idx"]  # older AutoGPTQ exports have none: groups are consecutive
    q = convert(tensors, 4, 32, False)
    assert torch.equal(q.dequantize(), w)
    assert q.bias.dtype == torch.float16 and torch.equal(q.bias, tensors["bias"])
    x = torch.randn(3, 64)
    assert torch.allclose(q(x), F.linear(x, w, tensors["bias"].float()), atol=1e-4)


def test_v1_zero_wraps_to_2_pow_bits():
    # v1 zero 2^b is stored as 2^b - 1 (all ones) and must read back as 2^b, not 0
    tensors, w = gptq_layer(64, 32, 4, 32, False, False, False, seed=2)
    tensors["qzeros"] = torch.full_like(tensors["qzeros"], -1)  # every stored nibble 0xF
    q = convert(tensors, 4, 32, False)
    codes = unpack_bits(tensors["qweight"].t().contiguous(), 4, 64)  # [N, K]
    gi = torch.arange(64) // 32
    expected = tensors["scales"].float()[gi].T * (codes - 16).float()
    assert torch.equal(q.dequantize(), expected)


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 4), count=st.integers(1, 100), seed=st.integers(0, 2**16))
def test_pack_unpack_bits_round_trip(bits, rows, count, seed):
    v = torch.randint(0, 2**bits, (rows, count), generator=torch.Generator().manual_seed(seed))
    p = pack_bits(v, bits)
    assert p.dtype == torch.int32 and p.shape == (rows, (count * bits + 31) // 32)
    assert torch.equal(unpack_bits(p, bits, count), v.to(torch.int32))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_matches_autogptq_words(bits):
    from .formats_fixtures import autogptq_pack_rows

    import numpy as np

    v = np.random.default_rng(bits).integers(0, 2**bits, size=(64, 5), dtype=np.uint32)
    packed = torch.from_numpy(autogptq_pack_rows(v, bits))
    assert torch.equal(unpack_bits(packed.t().contiguous(), bits, 64), torch.from_numpy(v.T.astype(np.int32)))
    assert torch.equal(pack_bits(torch.from_numpy(v.T.astype(np.int64)), bits), packed.t())


@pytest.mark.parametrize("bits, act_order, v2", [(4, True, False), (3, False, True), (8, True, True)])
def test_gptq_model_dir(tmp_path, bits, act_order, v2):
    model = tiny_llama()
    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": 32, "desc_act": act_order, "sym": False,
            "checkpoint_format": "gptq_v2" if v2 else "gptq"}
    seeds = iter(range(100))
    ref = write_model_dir(tmp_path, model, qcfg, lambda name, lin: gptq_layer(
        lin.in_features, lin.out_features, bits, 32, False, act_order, v2, seed=next(seeds)))
    loaded = qkernels.load_quantized(str(tmp_path))
    names = [n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 14 and type(loaded.lm_head) is torch.nn.Linear
    for n in names:
        assert torch.equal(loaded.get_submodule(n).dequantize(), ref.get_submodule(n).weight.detach())
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        out, exp = loaded(ids).logits, ref(ids).logits
    assert float((out - exp).norm() / exp.norm()) < 1e-4


def test_autogptq_standalone_config(tmp_path):
    """AutoGPTQ's own layout: quantize_config.json next to the weights (no quant_method), loaded into a given model."""
    model = tiny_llama()
    seeds = iter(range(100))
    ref = write_model_dir(tmp_path, model, {}, lambda name, lin: gptq_layer(
        lin.in_features, lin.out_features, 4, 32, True, False, False, seed=next(seeds)))
    cfg = json.load(open(tmp_path / "config.json"))
    del cfg["quantization_config"]
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "desc_act": False,
                                                               "sym": True}))
    loaded = qkernels.load_quantized(str(tmp_path), model=tiny_llama(seed=4))
    layer = loaded.model.layers[0].mlp.down_proj
    assert layer.scheme == Int4WeightOnly(32, symmetric=True) and layer.zero_point is None
    assert torch.equal(layer.dequantize(), ref.model.layers[0].mlp.down_proj.weight.detach())


# ---- bad checkpoints --------------------------------------------------------------------------------------------
def _bad(mutate, match, cfg=None):
    tensors, _ = gptq_layer(128, 64, 4, 32, False, True, False, seed=3)
    tensors = {f"l.{k}": v for k, v in tensors.items()}
    mutate(tensors)
    with pytest.raises((CheckpointError, NotImplementedError), match=match):
        gptq.convert(tensors, cfg or {"bits": 4, "group_size": 32})


def test_bad_tensors():
    _bad(lambda t: t.update({"l.qzeros": t["l.qzeros"][:, :4]}), r"l.qzeros must have shape \(4, 8\), got \(4, 4\)")
    _bad(lambda t: t.update({"l.scales": t["l.scales"][:3]}), r"l.scales must have 4 groups .*got 3")
    _bad(lambda t: t.update({"l.scales": t["l.scales"][:, :60]}), r"l.qweight must have shape \(16, 60\)")
    _bad(lambda t: t.update({"l.qweight": t["l.qweight"].float()}),
         "l.qweight must have dtype int32, got torch.float32")
    _bad(lambda t: t.update({"l.g_idx": t["l.g_idx"] + 1}), r"l.g_idx values must be in \[0, 4\), got \[1, 4\]")
    _bad(lambda t: t.update({"l.g_idx": torch.zeros(128, dtype=torch.int32).index_fill_(0, torch.tensor([5]), 3)}),
         "groups do not all hold 32")
    _bad(lambda t: t.update({"l.g_idx": t["l.g_idx"][:100]}), r"l.g_idx must have shape \(128,\)")
    _bad(lambda t: t.pop("l.qzeros"), "l.qzeros is missing")
    _bad(lambda t: t["l.scales"].__setitem__((0, 0), float("nan")), "scales contains NaN or inf")
    _bad(lambda t: None, r"bits must be one of \(2, 3, 4, 8\) for GPTQ, got 5", {"bits": 5, "group_size": 32})
    _bad(lambda t: None, "checkpoint_format must be 'gptq' or 'gptq_v2', got 'marlin'",
         {"bits": 4, "group_size": 32, "checkpoint_format": "marlin"})


def test_bad_model_dir_leaves_model_untouched(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_llama()
    seeds = iter(range(100))
    write_model_dir(tmp_path, model, {"quant_method": "gptq", "bits": 4, "group_size": 32},
                    lambda name, lin: gptq_layer(lin.in_features, lin.out_features, 4, 32, False, False, False,
                                                 seed=next(seeds)))
    f = str(tmp_path / "model.safetensors")
    good = load_file(f)
    sd = dict(good)
    sd["model.layers.1.mlp.down_proj.scales"] = sd["model.layers.1.mlp.down_proj.scales"][:, :32].contiguous()
    save_file(sd, f)
    target = tiny_llama(seed=9)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="down_proj.qweight must have shape"):
        qkernels.load_quantized(str(tmp_path), model=target)
    assert not any(isinstance(m, QuantLinear) for m in target.modules())
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    # a layer the model does not have
    sd = dict(good)
    for s in ("qweight", "qzeros", "scales", "g_idx"):
        sd[f"model.layers.1.mlp.extra.{s}"] = sd.pop(f"model.layers.1.mlp.down_proj.{s}")
    save_file(sd, f)
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.extra must replace an nn.Linear of the model"):
        qkernels.load_quantized(str(tmp_path), model=target)
    assert not any(isinstance(m, QuantLinear) for m in target.modules())


# ---- GPTQ export (qkernels.formats.gptq writer) -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym, act_order, v2", [(True, False, False), (False, True, False), (False, False, True)])
def test_gptq_writer_matches_autogptq_and_round_trips(bits, sym, act_order, v2):
    N, K, g = 64, 160, 64  # K = 2 groups of 64 + a ragged group of 32
    q, scale, zp, perm = random_codes(N, K, g, bits, sym, act_order, seed=bits)
    scheme = Int4WeightOnly(g, sym, bits) if bits <= 4 else Int8WeightOnly(g, sym)
    bias = torch.randn(N).half().float()
    layer = QuantLinear.from_codes(q, scale, zp, scheme, bias, perm)
    t = gptq.export_layer(layer, v2=v2, name="l")
    # independent packer: AutoGPTQ's loops on the unsigned codes in input order
    off = 1 << (bits - 1)
    u = q.to(torch.int64) + off
    if perm is not None:
        u = u[:, torch.argsort(perm)]
    zero = torch.full((N, 3), off) if zp is None else zp.to(torch.int64) + off
    stored = zero if v2 else zero - 1
    assert torch.equal(t["qweight"], torch.from_numpy(autogptq_pack_rows(u.t().numpy().astype(np.uint32), bits)))
    assert torch.equal(t["qzeros"], torch.from_numpy(autogptq_pack_zeros(stored.t().numpy().astype(np.uint32), bits)))
    assert t["scales"].dtype == torch.float16 and tuple(t["scales"].shape) == (3, N)
    assert torch.equal(t["g_idx"][perm] if perm is not None else t["g_idx"], (torch.arange(K) // g).to(torch.int32))
    # our loader reads it back to the same layer
    back = gptq.convert_layer("l", {f"l.{k}": v for k, v in t.items()},
                              gptq.parse_config({"bits": bits, "group_size": g,
                                                 "checkpoint_format": "gptq_v2" if v2 else "gptq"}))
    assert back.scheme == scheme and torch.equal(back.dequantize(), layer.dequantize())
    x = torch.randn(5, K)
    if perm is None:
        assert torch.equal(back.qweight, layer.qweight) and torch.equal(back(x), layer(x))
    else:  # the loader orders each group's features ascending: same weights, another summation order
        assert rel_err(back(x), layer(x)) < 1e-6


def test_gptq_writer_errors():
    q, scale, zp, _ = random_codes(64, 160, 64, 4, False, False, 0)
    zp[0, 0] = -8  # unsigned zero 0: v1 stores zero - 1 = -1
    with pytest.raises(ValueError, match="v1 cannot store a zero point of 0: write checkpoint_format='gptq_v2'"):
        gptq.pack_layer(q, scale, zp, 4, 64, name="blk.q")
    assert gptq.pack_layer(q, scale, zp, 4, 64, v2=True)["qzeros"].shape == (3, 8)
    with pytest.raises(ValueError, match=r"blk.q: in_features=48 and out_features=64 must fill whole int32 words of "
                                         r"3-bit values \(multiples of 32\)"):
        gptq.pack_layer(q[:, :48].clamp(-4, 3), scale[:, :1], None, 3, 64, name="blk.q")
    with pytest.raises(ValueError, match=r"codes must lie in \[-4, 3\] for 3 bits"):
        gptq.pack_layer(q, scale, None, 3, 64)
    with pytest.raises(ValueError, match="only integer weight-only layers"):
        gptq.export_layer(QuantLinear.from_linear(make_linear(64, 64), IntWeightInt8Act(4, 32)))


@pytest.mark.parametrize("bits, act_order, fmt", [(3, False, "gptq"), (4, True, "gptq_v2"), (8, True, "gptq")])
def test_save_gptq_model_dir_round_trip(tmp_path, bits, act_order, fmt):
    model = tiny_llama(intermediate=96)  # down_proj K=96: a ragged last group of 32 with group_size 64
    cfg = QuantConfig(bits, 64, True)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    q = gptq_quantize_model(model, [ids], GPTQConfig(cfg, act_order=act_order), progress=False)
    for m in q.modules():  # fp16-exact scales, as the checkpoint stores them
        if isinstance(m, QuantLinear):
            m.scale.copy_(m.scale.half().float())
    qkernels.formats.gptq.save_gptq(q, str(tmp_path), checkpoint_format=fmt)
    loaded = qkernels.load_quantized(str(tmp_path))
    for n, m in q.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(loaded.get_submodule(n).dequantize(), m.dequantize()), n
    assert rel_err(logits(loaded), logits(q)) < 1e-5
