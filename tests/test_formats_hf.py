"""Model-directory loading (qkernels.load_quantized): config discovery, shards, single files, clear errors."""

import json
import os

import pytest
import torch

import qkernels
from .formats_fixtures import awq_layer, gptq_layer, tiny_llama, write_model_dir
from qkernels.formats import CheckpointError
from qkernels.formats.hf import read_quantization_config, read_tensors
from qkernels.nn import QuantLinear


def gptq_dir(path, **kw):
    seeds = iter(range(100))
    return write_model_dir(path, tiny_llama(**kw), {"quant_method": "gptq", "bits": 4, "group_size": 32},
                           lambda n, lin: gptq_layer(lin.in_features, lin.out_features, 4, 32, False, False, False,
                                                     seed=next(seeds)))


def test_config_discovery(tmp_path):
    (tmp_path / "quantization_config.json").write_text(json.dumps({"quant_method": "awq", "bits": 4}))
    assert read_quantization_config(str(tmp_path))[0]["quant_method"] == "awq"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "gptq", "bits": 8}}))
    q, cfg = read_quantization_config(str(tmp_path))
    assert q["quant_method"] == "gptq" and cfg["model_type"] == "llama"  # config.json wins
    os.remove(tmp_path / "config.json")
    os.remove(tmp_path / "quantization_config.json")
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 128}))
    assert read_quantization_config(str(tmp_path))[0]["quant_method"] == "gptq"  # AutoGPTQ's file
    os.remove(tmp_path / "quantize_config.json")
    with pytest.raises(CheckpointError, match="no quantization_config found"):
        read_quantization_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read JSON"):
        read_quantization_config(str(tmp_path))


def test_sharded_files_and_single_file(tmp_path):
    from safetensors.torch import load_file, save_file

    ref = gptq_dir(tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    keys = sorted(sd)
    os.remove(tmp_path / "model.safetensors")
    save_file({k: sd[k] for k in keys[::2]}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[1::2]}, str(tmp_path / "model-00002-of-00002.safetensors"))
    loaded = qkernels.load_quantized(str(tmp_path))
    ids = torch.randint(0, 96, (1, 6))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    save_file({keys[0]: sd[keys[0]]}, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match="also appear in another file"):
        read_tensors(str(tmp_path))


def test_single_file_path(tmp_path):
    gptq_dir(tmp_path)
    loaded = qkernels.load_quantized(str(tmp_path / "model.safetensors"))
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantLinear)


def test_errors(tmp_path):
    gptq_dir(tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg["quantization_config"]["quant_method"] = "exl2"
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(CheckpointError, match=r"quant_method must be one of \['awq', 'compressed-tensors', 'gptq', "
                                              r"'qkernels'\], got 'exl2'"):
        qkernels.load_quantized(str(tmp_path))
    # no config.json and no model to load into
    os.remove(tmp_path / "config.json")
    json.dump({"quant_method": "gptq", "bits": 4, "group_size": 32}, open(tmp_path / "quantization_config.json", "w"))
    with pytest.raises(CheckpointError, match="no config.json: pass model="):
        qkernels.load_quantized(str(tmp_path))
    # a model of another shape: nothing swapped
    other = tiny_llama(intermediate=96)
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj is \[\d+, \d+\] but the model.s is \[\d+, \d+\]"):
        qkernels.load_quantized(str(tmp_path), model=other)
    assert not any(isinstance(m, QuantLinear) for m in other.modules())
    # AWQ tensors under a GPTQ config
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "quantization_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no .safetensors files"):
        qkernels.load_quantized(str(empty), model=other)


def test_awq_tensors_with_gptq_config_fail_cleanly(tmp_path):
    seeds = iter(range(100))
    write_model_dir(tmp_path, tiny_llama(), {"quant_method": "gptq", "bits": 4, "group_size": 32},
                    lambda n, lin: awq_layer(lin.in_features, lin.out_features, 32, seed=next(seeds)))
    target = tiny_llama(seed=2)
    with pytest.raises(CheckpointError, match="must have"):
        qkernels.load_quantized(str(tmp_path), model=target)
    assert not any(isinstance(m, QuantLinear) for m in target.modules())
