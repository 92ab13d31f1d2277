"""quantize_ on a small random-weight transformers Llama, save/load round trips, torch.compile, failure atomicity."""

import json
import logging
import os

import pytest
import torch
from torch import nn

import qkernels
from qkernels.nn import Int4WeightOnly, Int8Dynamic, Int8WeightOnly, QuantLinear
from .formats_fixtures import IDS, logits, quant_names, tiny_llama  # noqa: F401

transformers = pytest.importorskip("transformers")

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")



@pytest.mark.parametrize("scheme, tol", [(Int4WeightOnly(32), 0.2), (Int8WeightOnly(), 0.02), (Int8Dynamic(), 0.05)],
                         ids=repr)
def test_quantize_llama(scheme, tol):
    model = tiny_llama()
    ref = logits(model)
    emb = model.model.embed_tokens.weight.clone()
    assert qkernels.quantize_(model, scheme) is model
    names = quant_names(model)
    assert len(names) == 2 * len(LINEARS) and all(n.split(".")[-1] in LINEARS for n in names)
    assert type(model.lm_head) is nn.Linear and torch.equal(model.model.embed_tokens.weight, emb)
    out = logits(model)
    err = float((out - ref).norm() / ref.norm())
    assert 0 < err < tol


def test_skips_with_logged_reason(caplog):
    model = tiny_llama(intermediate=97)  # down_proj has in_features 97: odd, int4 cannot pack one group per row
    with caplog.at_level(logging.INFO, logger="qkernels.nn"):
        qkernels.quantize_(model, Int4WeightOnly(-1))
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    msgs = [r.getMessage() for r in caplog.records]
    assert any("skipping model.layers.0.mlp.down_proj" in m and "in_features=97 is odd" in m for m in msgs)
    assert any("lm_head left unquantized" in m for m in msgs)


def test_filter_fn_can_take_lm_head():
    model = tiny_llama()
    qkernels.quantize_(model, Int8WeightOnly(), filter_fn=lambda m, name: name == "lm_head" or "mlp" in name)
    assert isinstance(model.lm_head, QuantLinear)
    assert isinstance(model.model.layers[1].mlp.up_proj, QuantLinear)
    assert type(model.model.layers[1].self_attn.q_proj) is nn.Linear


def test_failure_leaves_model_untouched():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        qkernels.quantize_(model, Int4WeightOnly(32))
    assert quant_names(model) == []
    with pytest.raises(ValueError, match="NaN or inf"):
        qkernels.quantize_(model, qkernels.Fp8WeightOnly())
    assert quant_names(model) == []
    with pytest.raises(TypeError, match="scheme must be"):
        qkernels.quantize_(model, {"scheme": "int4"})


@pytest.mark.parametrize("scheme", [Int4WeightOnly(32), Int8WeightOnly(32, symmetric=False), Int8Dynamic()], ids=repr)
def test_save_load_bit_identical(tmp_path, scheme):
    model = qkernels.quantize_(tiny_llama(), scheme)
    out = logits(model)
    qkernels.save_quantized(model, str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["quantization_config"]["quant_method"] == "qkernels"
    assert cfg["quantization_config"]["layers"]["model.layers.0.self_attn.q_proj"]["scheme"] == scheme.to_dict()
    loaded = qkernels.load_quantized(str(tmp_path))  # built from config.json
    assert isinstance(loaded, transformers.LlamaForCausalLM)
    assert quant_names(loaded) == quant_names(model)
    assert torch.equal(logits(loaded), out)
    # into a given float model, and plain state_dict/load_state_dict
    into = qkernels.load_quantized(str(tmp_path), model=tiny_llama(seed=5))
    assert torch.equal(logits(into), out)
    other = qkernels.quantize_(tiny_llama(seed=7), scheme)
    other.load_state_dict(model.state_dict())
    assert torch.equal(logits(other), out)


def test_save_load_tied_embeddings(tmp_path):
    model = qkernels.quantize_(tiny_llama(tie=True), Int4WeightOnly(32))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    out = logits(model)
    qkernels.save_quantized(model, str(tmp_path))
    loaded = qkernels.load_quantized(str(tmp_path))
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), out)


def test_compile_llama_fullgraph():
    torch._dynamo.reset()
    model = qkernels.quantize_(tiny_llama(), Int4WeightOnly(32))
    out = logits(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # dynamo graph capture: graph breaks raise
    with torch.no_grad():
        got = compiled(IDS).logits
    assert torch.allclose(got, out, atol=1e-5, rtol=1e-5)


# ---- bad checkpoints: clear errors, the model passed in is untouched --------------------------------------------
@pytest.fixture
def saved(tmp_path):
    model = qkernels.quantize_(tiny_llama(), Int4WeightOnly(32))
    qkernels.save_quantized(model, str(tmp_path))
    return tmp_path


def assert_untouched(model, before):
    assert quant_names(model) == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_unknown_quant_method(saved):
    cfg = json.load(open(saved / "config.json"))
    cfg["quantization_config"]["quant_method"] = "bitsandbytes"
    json.dump(cfg, open(saved / "config.json", "w"))
    # the two copies of the config must agree (else that is the error): change quantization_config.json too
    qfile = saved / "quantization_config.json"
    if qfile.exists():
        json.dump(cfg["quantization_config"], open(qfile, "w"))
    with pytest.raises(qkernels.formats.CheckpointError, match="quant_method must be one of .*got 'bitsandbytes'"):
        qkernels.load_quantized(str(saved))


def test_truncated_checkpoint(saved):
    model = tiny_llama(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(qkernels.formats.CheckpointError, match="cannot read safetensors"):
        qkernels.load_quantized(str(saved), model=model)
    assert_untouched(model, before)


def test_corrupt_tensor_shape_and_dtype(saved):
    from safetensors.torch import load_file, save_file

    model = tiny_llama(seed=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    f = str(saved / "model.safetensors")
    sd = load_file(f)
    good = dict(sd)
    sd["model.layers.1.mlp.up_proj.scale"] = sd["model.layers.1.mlp.up_proj.scale"][:, :1].contiguous()
    save_file(sd, f)
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.scale must be torch.float32 \(128, 2\)"):
        qkernels.load_quantized(str(saved), model=model)
    assert_untouched(model, before)
    sd = dict(good)
    sd["model.layers.0.self_attn.q_proj.qweight"] = sd["model.layers.0.self_attn.q_proj.qweight"].to(torch.int32)
    save_file(sd, f)
    with pytest.raises(ValueError, match="q_proj.qweight must be torch.uint8"):
        qkernels.load_quantized(str(saved), model=model)
    sd = dict(good)
    sd["model.norm.weight"] = torch.ones(3)
    save_file(sd, f)
    with pytest.raises(ValueError, match=r"model.norm.weight must have shape \(64,\), got \(3,\)"):
        qkernels.load_quantized(str(saved), model=model)
    sd = dict(good)
    del sd["model.layers.0.input_layernorm.weight"]
    save_file(sd, f)
    with pytest.raises(ValueError, match=r"missing \['model.layers.0.input_layernorm.weight'\]"):
        qkernels.load_quantized(str(saved), model=model)
    assert_untouched(model, before)


def test_bad_scheme_in_config(saved):
    q = json.load(open(saved / "quantization_config.json"))
    os.remove(saved / "config.json")
    q["layers"]["model.layers.0.self_attn.q_proj"]["scheme"]["nbits"] = 3
    json.dump(q, open(saved / "quantization_config.json", "w"))
    with pytest.raises(ValueError, match=r"layers\['model.layers.0.self_attn.q_proj'\] is invalid: .*no field"):
        qkernels.load_quantized(str(saved), model=tiny_llama())
    with pytest.raises(FileNotFoundError):
        qkernels.load_quantized(str(saved / "nope"))


def test_save_load_bf16_model(tmp_path):
    """A model cast after construction: its rotary buffers (outside the state dict) are bf16 too, and must be
    restored as such for the loaded forward to be bit-identical."""
    model = qkernels.quantize_(tiny_llama().to(torch.bfloat16), Int4WeightOnly(32))
    out = logits(model)
    qkernels.save_quantized(model, str(tmp_path))
    loaded = qkernels.load_quantized(str(tmp_path))
    assert loaded.model.layers[0].self_attn.q_proj.bias is None and loaded.model.norm.weight.dtype == torch.bfloat16
    assert torch.equal(logits(loaded), out)
