"""GPTQ / AWQ export of layers with negative scales (the full-range symmetric grid, QuantConfig(full_range=True)):
the writers mirror such groups' codes and zero points (|s| (u' - z') = s (u - z)), so the checkpoint holds positive
scales as every GPTQ / AWQ reader expects, and our loaders read back the very same weights."""

import json

import pytest
import torch

import qkernels
from qkernels.algorithms import GPTQConfig, QuantConfig, gptq_quantize_model, rtn_quantize_model
from qkernels.formats import awq, gptq
from qkernels.nn import Int4WeightOnly, Int8WeightOnly, QuantLinear

from .conftest import rel_err
from .formats_fixtures import IDS, logits, random_codes, tiny_llama


def _signed(scale, seed):
    sign = torch.randint(0, 2, scale.shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return scale * sign


@pytest.mark.parametrize("bits, sym, act_order, v2", [(4, True, False, False), (4, True, True, True),
                                                      (3, True, False, False), (8, True, True, False),
                                                      (4, False, False, True), (2, False, True, True)])
def test_gptq_layer_with_negative_scales_round_trips(bits, sym, act_order, v2):
    N, K, g = 64, 160, 64  # a ragged last group of 32
    q, scale, zp, perm = random_codes(N, K, g, bits, sym, act_order, seed=bits)
    scale = _signed(scale, bits)
    if zp is not None:  # mirrored zeros must stay storable in v1 (zero - 1 >= 0): unsigned zero <= 2^b - 2
        zp = zp.clamp(max=(1 << (bits - 1)) - 2)
    scheme = Int4WeightOnly(g, sym, bits) if bits <= 4 else Int8WeightOnly(g, sym)
    layer = QuantLinear.from_codes(q, scale, zp, scheme, None, perm)
    t = gptq.export_layer(layer, v2=v2, name="l")
    assert bool((t["scales"] > 0).all())
    back = gptq.convert_layer("l", {f"l.{k}": v for k, v in t.items()},
                              gptq.parse_config({"bits": bits, "group_size": g,
                                                 "checkpoint_format": "gptq_v2" if v2 else "gptq"}))
    assert torch.equal(back.dequantize(), layer.dequantize())
    x = torch.randn(5, K)
    assert rel_err(back(x), layer(x)) < 1e-6


def test_gptq_v1_refuses_a_mirrored_zero_of_zero():
    q, scale, zp, _ = random_codes(64, 160, 64, 4, False, False, 0)
    zp[0, 0], scale[0, 0] = 7, -scale[0, 0]  # unsigned zero 15, mirrored 0: v1 would store -1
    with pytest.raises(ValueError, match="v1 cannot store a zero point of 0"):
        gptq.pack_layer(q, scale, zp, 4, 64, name="blk.q")
    assert gptq.pack_layer(q, scale, zp, 4, 64, v2=True)["qzeros"].shape == (3, 8)


@pytest.mark.parametrize("sym", [True, False])
def test_awq_layer_with_negative_scales_round_trips(sym):
    N, K, g = 64, 128, 32
    q, scale, zp, _ = random_codes(N, K, g, 4, sym, False, seed=5)
    scale = _signed(scale, 6)
    layer = QuantLinear.from_codes(q, scale, zp, Int4WeightOnly(g, sym), None, None)
    t = awq.export_layer(layer, "l")
    assert bool((t["scales"] > 0).all())
    back = awq.convert_layer("l", {f"l.{k}": v for k, v in t.items()}, awq.parse_config({"bits": 4,
                                                                                       "group_size": g}))
    assert torch.equal(back.dequantize(), layer.dequantize())


def _fp16_scales(model):
    for m in model.modules():  # fp16-exact scales, as the checkpoints store them
        if isinstance(m, QuantLinear):
            m.scale.copy_(m.scale.half().float())
    scales = torch.cat([m.scale.flatten() for m in model.modules() if isinstance(m, QuantLinear)])
    assert bool((scales < 0).any()) and bool((scales > 0).any())
    return model


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2", "awq"])
def test_full_range_model_dir_round_trips(tmp_path, fmt):
    cfg = QuantConfig(4, 32, True, full_range=True)
    if fmt == "awq":
        q = _fp16_scales(rtn_quantize_model(tiny_llama(), cfg))
        awq.save_awq(q, str(tmp_path))
    else:
        q = _fp16_scales(gptq_quantize_model(tiny_llama(), [IDS], GPTQConfig(cfg, act_order=True), progress=False))
        gptq.save_gptq(q, str(tmp_path), checkpoint_format=fmt)
        qcfg = json.load(open(tmp_path / "config.json"))["quantization_config"]
        assert qcfg["sym"] is False  # mirrored groups carry the zero 7: readers must not assume 8
    loaded = qkernels.load_quantized(str(tmp_path))
    for n, m in q.named_modules():
        if isinstance(m, QuantLinear):
            assert torch.equal(loaded.get_submodule(n).dequantize(), m.dequantize()), n
    assert rel_err(logits(loaded), logits(q)) < 1e-5
