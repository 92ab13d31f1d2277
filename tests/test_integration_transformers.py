"""transformers integration (qkernels/integrations/transformers_quantizer.py): from_pretrained on qkernels
checkpoints, save_pretrained, quantize on load, pipeline; offline on tiny random Llamas."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import qkernels  # noqa: E402,F401 - installs the registration hook
from qkernels import (Fp4, Fp8Dynamic, Fp8WeightOnly, Int4WeightOnly, Int8Dynamic, Int8DynamicInt4Weight,  # noqa: E402
                      Int8WeightOnly, IntWeightInt8Act, QuantLinear, load_quantized, quantize_, save_quantized)
from qkernels.integrations.transformers_quantizer import QKernelsConfig, QKernelsHfQuantizer  # noqa: E402

from .formats_fixtures import IDS, quant_names  # noqa: E402

AutoModelForCausalLM = transformers.AutoModelForCausalLM

# RTN for every scheme; shapes of the tiny Llama (K = 64 / 128) fit all of them except 128x128 fp8 blocks
SCHEMES = [Int4WeightOnly(group_size=32), Int4WeightOnly(group_size=-1, symmetric=True), Int8WeightOnly(),
           Int8WeightOnly(group_size=32, symmetric=False), Int8Dynamic(), IntWeightInt8Act(bits=4, group_size=32),
           Int8DynamicInt4Weight(group_size=32), Fp8WeightOnly(), Fp8Dynamic("row"), Fp4("mxfp4"),
           Fp4("nvfp4", weight_only=True)]


def tiny(seed=0, tie=False, bias=False):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    if bias:  # Llama inits biases to zero: make them count
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.normal_()
    return model


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def test_import_qkernels_does_not_import_transformers():
    code = ("import sys, time; t = time.perf_counter(); import qkernels; dt = time.perf_counter() - t; "
            "print('transformers' in sys.modules, dt)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"


@pytest.mark.parametrize("tie,bias", [(False, False), (True, True)])
@pytest.mark.parametrize("scheme", [Int4WeightOnly(group_size=32), Fp8WeightOnly(), Fp4("nvfp4")], ids=repr)
def test_from_pretrained_reads_save_quantized(tmp_path, monkeypatch, scheme, tie, bias):
    model = tiny(tie=tie, bias=bias)
    quantize_(model, scheme)
    save_quantized(model, tmp_path)
    ref = load_quantized(tmp_path)

    # the quantized layers are built on the meta device, before any tensor is read: no float weight materialised
    seen = []
    orig = QKernelsHfQuantizer._process_model_before_weight_loading

    def spy(self, model, **kw):
        seen.extend(m.weight.device.type for m in model.modules() if type(m) is nn.Linear)
        return orig(self, model, **kw)

    monkeypatch.setattr(QKernelsHfQuantizer, "_process_model_before_weight_loading", spy)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert seen and set(seen) == {"meta"}
    assert quant_names(hf) == quant_names(ref) == quant_names(model) and len(quant_names(hf)) == 14
    assert isinstance(hf.config.quantization_config, QKernelsConfig)
    for name in quant_names(hf):
        a, b = hf.get_submodule(name), ref.get_submodule(name)
        assert a.scheme == b.scheme
        for k, v in b.state_dict().items():
            assert a.state_dict()[k].dtype == v.dtype and torch.equal(a.state_dict()[k], v), (name, k)
    assert torch.equal(logits(hf), logits(ref))
    assert torch.equal(logits(hf), logits(model))


def test_bf16_checkpoint_matches_load_quantized(tmp_path):
    model = tiny(bias=True).to(torch.bfloat16)
    quantize_(model, Int4WeightOnly(group_size=32))
    save_quantized(model, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    ref = load_quantized(tmp_path)
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    q = hf.model.layers[0].self_attn.q_proj
    assert q.scale.dtype == torch.float32 and q.bias.dtype == torch.bfloat16  # as saved, not cast to the model dtype
    assert torch.equal(logits(hf), logits(ref)) and torch.equal(logits(hf), logits(model))


def test_save_pretrained_roundtrip(tmp_path):
    model = tiny(tie=True)
    quantize_(model, Int4WeightOnly(group_size=32))
    save_quantized(model, tmp_path / "a")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    hf.save_pretrained(tmp_path / "b")
    qcfg = json.loads((tmp_path / "b" / "config.json").read_text())["quantization_config"]
    written = json.loads((tmp_path / "a" / "quantization_config.json").read_text())
    assert qcfg["quant_method"] == "qkernels" and qcfg["format_version"] == written["format_version"]
    assert qcfg["layers"] == written["layers"]
    want = logits(model)
    assert torch.equal(logits(load_quantized(tmp_path / "b")), want)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "b")), want)


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_quantize_on_load_equals_quantize_(tmp_path, scheme):
    tiny(bias=True).save_pretrained(tmp_path / "float")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "float", quantization_config=QKernelsConfig(scheme))
    ref = AutoModelForCausalLM.from_pretrained(tmp_path / "float")
    quantize_(ref, scheme)
    assert quant_names(hf) == quant_names(ref) and len(quant_names(hf)) == 14
    assert type(hf.lm_head) is nn.Linear  # the output embedding stays float by default, as in quantize_
    for name in quant_names(hf):
        a, b = hf.get_submodule(name), ref.get_submodule(name)
        assert a.scheme == scheme
        for k, v in b.state_dict().items():
            assert torch.equal(a.state_dict()[k], v), (name, k)
    assert torch.equal(logits(hf), logits(ref))
    # what it saves, both readers read
    hf.save_pretrained(tmp_path / "q")
    assert torch.equal(logits(load_quantized(tmp_path / "q")), logits(ref))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "q")), logits(ref))


def test_quantize_on_load_modules_to_not_convert(tmp_path):
    tiny().save_pretrained(tmp_path)
    cfg = QKernelsConfig({"scheme": "int8_weight_only"}, modules_to_not_convert=["model.layers.1", "lm_head"])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=cfg)
    names = quant_names(hf)
    assert len(names) == 7 and all(n.startswith("model.layers.0.") for n in names)
    assert type(hf.model.layers[1].mlp.up_proj) is nn.Linear


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="quant_method must be 'qkernels'"):
        QKernelsConfig(quant_method="gptq")
    with pytest.raises(TypeError, match="scheme must be a qkernels scheme"):
        QKernelsConfig("int4")
    with pytest.raises(ValueError, match="scheme must be one of"):
        QKernelsConfig({"scheme": "int3"})
    with pytest.raises(ValueError, match="format_version must be 1"):
        QKernelsConfig(format_version=7)
    with pytest.raises(TypeError, match="modules_to_not_convert must be a list"):
        QKernelsConfig(Int8WeightOnly(), modules_to_not_convert="lm_head")
    tiny().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="needs scheme="):
        AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=QKernelsConfig())


def test_checkpoint_layer_mismatch_is_named(tmp_path):
    model = tiny()
    quantize_(model, Int8WeightOnly())
    save_quantized(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"]["in_features"] = 32
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.up_proj is \[128, 32\] but the model's is \[128, 64\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def _tiny_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, **{f"w{i}": i for i in range(1, 96)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="w95")
    fast.save_pretrained(path)


def test_pipeline_text_generation(tmp_path):
    model = tiny()
    quantize_(model, Int4WeightOnly(group_size=32))
    save_quantized(model, tmp_path)
    _tiny_tokenizer(tmp_path)
    pipe = transformers.pipeline("text-generation", model=str(tmp_path), device="cpu")
    assert isinstance(pipe.model.model.layers[0].self_attn.q_proj, QuantLinear)
    text = pipe("w1 w2 w3", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    assert isinstance(text, str) and text.startswith("w1 w2 w3") and len(text) > len("w1 w2 w3")
    out = pipe("w1 w2 w3", max_new_tokens=5, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    # the same greedy continuation as load_quantized's model
    ref = load_quantized(tmp_path)
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path)("w1 w2 w3", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = ref.generate(ids, max_new_tokens=5, do_sample=False)
    assert list(out) == gen[0].tolist() and len(out) == 8
