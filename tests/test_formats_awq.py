"""AWQ "gemm" checkpoints: fixtures packed by a transcription of AutoAWQ's WQLinear_GEMM.from_linear loop
(tests/formats_fixtures.py), converted by qkernels.formats.awq; dequantized weights must match exactly."""

import pytest
import torch
import torch.nn.functional as F

import qkernels
from qkernels.algorithms import AWQConfig, QuantConfig, awq_quantize_model, rtn_quantize_model
from qkernels.formats import CheckpointError, awq
from qkernels.nn import Int4WeightOnly, Int8WeightOnly, QuantLinear

from .formats_fixtures import autoawq_pack, awq_layer, logits, random_codes, tiny_llama, write_model_dir
from .test_nn_linear import make_linear


def convert(tensors, group_size, name="l"):
    return awq.convert_layer(name, {f"{name}.{k}": v for k, v in tensors.items()},
                             awq.parse_config({"bits": 4, "group_size": group_size, "version": "gemm"}))


def test_interleaved_nibble_order():
    # column c of a word sits in nibble ORDER.index(c): [0, 2, 4, 6, 1, 3, 5, 7]
    cols = (torch.arange(32, dtype=torch.int32) % 8).reshape(1, 32)  # AutoAWQ packs N in multiples of 32
    words = autoawq_pack(cols)
    assert [int(w) & 0xFFFFFFFF for w in words[0]] == [0x75316420] * 4
    assert torch.equal(awq.unpack_awq(words), cols)


@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("K, N", [(64, 32), (128, 96)])
def test_awq_layer_exact(group_size, K, N):
    tensors, w = awq_layer(K, N, group_size, seed=K + N + group_size, bias=True)
    q = convert(tensors, group_size)
    assert isinstance(q, QuantLinear) and q.scheme == Int4WeightOnly(
        -1 if group_size in (-1, K) else group_size, symmetric=False)  # one group per row is stored as -1
    assert torch.equal(q.dequantize(), w)
    x = torch.randn(4, K)
    ref = F.linear(x.double(), w.double(), tensors["bias"].double())
    assert float((q(x).double() - ref).norm() / ref.norm()) < 1e-5


def test_awq_model_dir(tmp_path):
    model = tiny_llama()
    seeds = iter(range(100))
    qcfg = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    ref = write_model_dir(tmp_path, model, qcfg,
                          lambda n, lin: awq_layer(lin.in_features, lin.out_features, 32, seed=next(seeds)))
    loaded = qkernels.load_quantized(str(tmp_path))
    names = [n for n, m in loaded.named_modules() if isinstance(m, QuantLinear)]
    assert len(names) == 14
    for n in names:
        assert torch.equal(loaded.get_submodule(n).dequantize(), ref.get_submodule(n).weight.detach())
    ids = torch.randint(0, 96, (1, 11))
    with torch.no_grad():
        out, exp = loaded(ids).logits, ref(ids).logits
    assert float((out - exp).norm() / exp.norm()) < 1e-4


def test_awq_bad_inputs():
    tensors, _ = awq_layer(64, 32, 32)
    t = {f"l.{k}": v for k, v in tensors.items()}
    cfg = awq.parse_config({"bits": 4, "group_size": 32})
    for key, bad, match in [
        ("l.scales", tensors["scales"][:, :16], r"l.scales must have shape \(2, 32\), got \(2, 16\)"),
        ("l.qzeros", tensors["qzeros"][:1], r"l.qzeros must have shape \(2, 4\), got \(1, 4\)"),
        ("l.qweight", tensors["qweight"].to(torch.int64), "l.qweight must have dtype int32, got torch.int64"),
        ("l.scales", tensors["scales"].to(torch.int32), "l.scales must have dtype float16/bfloat16/float32"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            awq.convert_layer("l", {**t, key: bad}, cfg)
    with pytest.raises(NotImplementedError, match="AWQ version 'gemv' is not supported"):
        awq.parse_config({"bits": 4, "group_size": 128, "version": "gemv"})
    with pytest.raises(CheckpointError, match="bits must be 4 for AWQ, got 8"):
        awq.parse_config({"bits": 8, "group_size": 128})
    with pytest.raises(CheckpointError, match="in_features=64 is not divisible by group_size=48"):
        awq.convert_layer("l", t, awq.parse_config({"bits": 4, "group_size": 48}))


# ---- AWQ export (qkernels.formats.awq writer) --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sym", [False, True])
def test_awq_writer_matches_autoawq_and_round_trips(sym):
    N, K, g = 64, 128, 32  # N: a multiple of 32 for the fixture's packer
    q, scale, zp, _ = random_codes(N, K, g, 4, sym, False, seed=7)
    layer = QuantLinear.from_codes(q, scale, zp, Int4WeightOnly(g, sym), torch.randn(N).half().float())
    t = awq.export_layer(layer, "l")
    u = (q.to(torch.int32) + 8).t().contiguous()
    z = torch.full((N, K // g), 8, dtype=torch.int32) if zp is None else zp + 8
    assert torch.equal(t["qweight"], autoawq_pack(u)) and torch.equal(t["qzeros"], autoawq_pack(z.t().contiguous()))
    back = awq.convert_layer("l", {f"l.{k}": v for k, v in t.items()}, awq.parse_config({"bits": 4, "group_size": g}))
    assert back.scheme == layer.scheme
    for k in ("qweight", "scale", "zero_point", "bias"):
        a, b = getattr(back, k), getattr(layer, k)
        assert (a is None and b is None) or torch.equal(a.float(), b.float()), k
    x = torch.randn(3, K)
    assert torch.equal(back(x), layer(x))


def test_awq_writer_errors():
    ragged = QuantLinear.from_linear(make_linear(96, 48), Int4WeightOnly(64))
    with pytest.raises(ValueError, match=r"model.layers.3.mlp.down_proj: AWQ needs in_features divisible by group_size "
                                         r"\(no ragged groups in AutoAWQ\), got in_features=96, group_size=64"):
        awq.export_layer(ragged, "model.layers.3.mlp.down_proj")
    q, scale, zp, perm = random_codes(48, 128, 32, 4, False, True, 0)
    with pytest.raises(ValueError, match="l: AWQ has no act-order"):
        awq.export_layer(QuantLinear.from_codes(q, scale, zp, Int4WeightOnly(32), None, perm), "l")
    with pytest.raises(ValueError, match="only Int4WeightOnly layers"):
        awq.export_layer(QuantLinear.from_linear(make_linear(128, 48), Int8WeightOnly()), "l")


def test_save_awq_model_dir_round_trip(tmp_path):
    model = tiny_llama()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    q = awq_quantize_model(model, [ids], AWQConfig(QuantConfig(4, 32, False), n_grid=4), progress=False)
    for m in q.modules():
        if isinstance(m, QuantLinear):
            m.scale.copy_(m.scale.half().float())
    awq.save_awq(q, str(tmp_path))
    loaded = qkernels.load_quantized(str(tmp_path))
    for n, m in q.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(loaded.get_submodule(n).dequantize(), m.dequantize()), n
    assert torch.equal(logits(loaded), logits(q))
    ragged = rtn_quantize_model(tiny_llama(intermediate=96), QuantConfig(4, 64, True))
    with pytest.raises(ValueError, match="model.layers.0.mlp.down_proj: AWQ needs in_features divisible"):
        awq.save_awq(ragged, str(tmp_path / "r"))
