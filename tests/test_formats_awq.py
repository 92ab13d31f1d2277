"""AWQ "gemm" checkpoints: fixtures packed by a transcription of AutoAWQ's WQLinear_GEMM.from_linear loop
(tests/formats_fixtures.py), converted by qkernels.formats.awq; dequantized weights must match exactly."""

import pytest
import torch
import torch.nn.functional as F

import qkernels
from .formats_fixtures import autoawq_pack, awq_layer, tiny_llama, write_model_dir
from qkernels.formats import CheckpointError, awq
from qkernels.nn import Int4WeightOnly, QuantLinear


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
