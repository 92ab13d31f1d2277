"""Corrupt checkpoints and GGUF files: each corruption -> a clear error naming the problem (CheckpointError / GGUFError,
both ValueErrors), never a silent load; wrong-typed arguments -> TypeError naming the argument. What validate=False
skips is tested as documented (docs/validation.md, "Checkpoints and GGUF files")."""

import json
import shutil
import time

import numpy as np
import pytest
import torch

import qkernels
from qkernels.formats import CheckpointError
from qkernels.formats.gguf import GGUFError
from qkernels.nn import (Fp4, Fp8WeightOnly, Int4WeightOnly, Int8WeightOnly, IntWeightInt8Act, QuantLinear)
from qkernels.nn.quantize import set_submodule

from .formats_fixtures import gptq_layer, logits, tiny_llama, write_model_dir
from .gguf_corruption_fixtures import logits as gguf_logits
from .gguf_corruption_fixtures import patch_field, patch_tensor_bytes, patch_tensor_info, write_tiny_gguf

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

# ---- qkernels' own checkpoints (save_quantized / load_quantized) -----------------------------------------------

SCHEMES = {  # one layer per storage layout, so each corruption below has a layer to hit
    "model.layers.0.self_attn.q_proj": Int4WeightOnly(group_size=32),  # int4 nibbles + zero points
    "model.layers.0.self_attn.k_proj": Int4WeightOnly(group_size=32, symmetric=True, bits=3),  # 3-bit in nibbles
    "model.layers.0.self_attn.v_proj": IntWeightInt8Act(bits=6, group_size=32),  # 6-bit codes in int8
    "model.layers.0.self_attn.o_proj": Fp8WeightOnly(),
    "model.layers.0.mlp.gate_proj": Fp4("nvfp4", weight_only=True),
    "model.layers.0.mlp.up_proj": Int8WeightOnly(),
    "model.layers.0.mlp.down_proj": Fp4("mxfp4", weight_only=True),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(directory written by save_quantized, its logits)."""
    model = tiny_llama()
    for name, scheme in SCHEMES.items():
        set_submodule(model, name, QuantLinear.from_linear(model.get_submodule(name), scheme))
    path = tmp_path_factory.mktemp("ckpt") / "good"
    qkernels.save_quantized(model, str(path))
    return path, logits(qkernels.load_quantized(str(path)))


def corrupt(src, dst, tensors=None, qcfg=None, qcfg_file=None, config=None):
    """Copy checkpoint ``src`` to ``dst`` with changes applied in place: ``tensors(sd)`` to the safetensors,
    ``qcfg(d)`` to both copies of the quantization config (quantization_config.json and config.json's), ``qcfg_file``
    to quantization_config.json only, ``config(d)`` to config.json."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if tensors is not None:
        sd = load_file(str(dst / "model.safetensors"))
        tensors(sd)
        save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    both = None if qcfg is None else (lambda d: (config or (lambda _: None))(d) or qcfg(d["quantization_config"]))
    for fname, fns in (("quantization_config.json", (qcfg, qcfg_file)), ("config.json", (both or config,))):
        for fn in fns:
            if fn is not None:
                d = json.loads((dst / fname).read_text())
                fn(d)
                (dst / fname).write_text(json.dumps(d))
    return dst


Q, K3, V6, O8 = (f"model.layers.0.self_attn.{p}_proj" for p in "qkvo")
GATE4, UP8, DOWN4 = (f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down"))


def setitem(key, fn):
    def f(sd):
        sd[key] = fn(sd[key].clone())
    return f


def at0(value):
    def f(t):
        t.view(-1)[0] = value
        return t
    return f


def qlayer(key, fn):
    """A change to quantization_config.layers[key]."""
    return lambda d: fn(d["layers"][key])


CASES = {
    # scales and zero points (always checked)
    "int4 scale NaN": (dict(tensors=setitem(f"{Q}.scale", at0(float("nan")))), rf"{Q}\.scale contains NaN or inf"),
    "int4 scale inf": (dict(tensors=setitem(f"{Q}.scale", at0(float("inf")))), rf"{Q}\.scale contains NaN or inf"),
    "int4 scale zero": (dict(tensors=setitem(f"{Q}.scale", at0(0.0))), rf"{Q}\.scale must be positive"),
    "int4 scale negative": (dict(tensors=setitem(f"{Q}.scale", at0(-0.01))), rf"{Q}\.scale must be positive"),
    "int4 zero point 100": (dict(tensors=setitem(f"{Q}.zero_point", at0(100))),
                            rf"{Q}\.zero_point: zero points of 4-bit codes must be in \[-8, 8\], got \[.*, 100\]"),
    "6-bit zero point -40": (dict(tensors=setitem(f"{V6}.zero_point", at0(-40))),
                             rf"{V6}\.zero_point: zero points of 6-bit codes must be in \[-32, 32\]"),
    "int8 symmetric scale zero": (dict(tensors=setitem(f"{UP8}.scale", at0(0.0))), rf"{UP8}\.scale must be nonzero"),
    "int8 channel scale NaN": (dict(tensors=setitem(f"{UP8}.scale", at0(float("nan")))), rf"{UP8}\.scale contains NaN"),
    "fp8 scale zero": (dict(tensors=setitem(f"{O8}.scale", at0(0.0))), rf"{O8}\.scale must be positive"),
    "nvfp4 block scale NaN": (dict(tensors=setitem(f"{GATE4}.scale", at0(0x7F))),
                              rf"{GATE4}\.scale: 1 nvfp4 block scales are NaN"),
    "nvfp4 block scale negative": (dict(tensors=setitem(f"{GATE4}.scale", at0(0xB8))),
                                   rf"{GATE4}\.scale: 1 nvfp4 block scales are negative"),
    "mxfp4 block scale NaN": (dict(tensors=setitem(f"{DOWN4}.scale", at0(0xFF))),
                              rf"{DOWN4}\.scale: 1 mxfp4 block scales are NaN"),
    "nvfp4 global scale zero": (dict(tensors=setitem(f"{GATE4}.global_scale", lambda t: t * 0)),
                                rf"{GATE4}\.global_scale must be positive"),
    # codes (validate=True: one pass over the codes)
    "3-bit codes out of range": (dict(tensors=setitem(f"{K3}.qweight", at0(0x77))),
                                 rf"{K3}\.qweight: codes of Int4WeightOnly\(bits=3\) must be in \[-4, 3\], "
                                 r"got \[.*7\]"),
    "6-bit codes out of range": (dict(tensors=setitem(f"{V6}.qweight", at0(100))),
                                 rf"{V6}\.qweight: codes of IntWeightInt8Act\(bits=6\) must be in \[-32, 31\]"),
    "fp8 NaN code": (dict(tensors=setitem(f"{O8}.qweight", at0(0x7F))), rf"{O8}\.qweight: 1 fp8 e4m3fn codes are NaN"),
    "NaN in the embedding": (dict(tensors=setitem("model.embed_tokens.weight", at0(float("nan")))),
                             r"tensors \['model\.embed_tokens\.weight'\] contain NaN"),
    # dtypes and shapes
    "scale dtype": (dict(tensors=setitem(f"{Q}.scale", lambda t: t.half())), rf"{Q}\.scale must be torch\.float32"),
    "codes dtype": (dict(tensors=setitem(f"{UP8}.qweight", lambda t: t.view(torch.uint8))),
                    rf"{UP8}\.qweight must be torch\.int8"),
    "scale shape": (dict(tensors=setitem(f"{Q}.scale", lambda t: t[:, :1].contiguous())),
                    rf"{Q}\.scale must be torch\.float32 \(64, 2\), got torch\.float32 \(64, 1\)"),
    "missing tensor": (dict(tensors=lambda sd: sd.pop(f"{Q}.zero_point")), rf"{Q}\.zero_point is missing"),
    "layer shape in the config": (dict(qcfg=qlayer(Q, lambda lc: lc.update(in_features=96))), rf"{Q}\.qweight must be"),
    "scheme in the config": (dict(qcfg=qlayer(K3, lambda lc: lc["scheme"].update(bits=5))),
                             rf"quantization_config\.layers\['{K3}'\] is invalid"),
    # the config files
    "quantization_config.json disagrees with config.json": (
        dict(qcfg_file=qlayer(Q, lambda lc: lc["scheme"].update(group_size=64))),
        r"quantization_config\.json and config\.json disagree on quantization_config key\(s\) \['layers'\], e\.g\. "
        rf"layers\['{Q}'\]\['scheme'\]\['group_size'\]: 64 vs 32"),
    "config.json model shape": (dict(config=lambda d: d.update(intermediate_size=96)),
                                r"mlp\.\w+_proj is \[\d+, \d+\] but the model.s is"),
    "buffer_dtypes: unknown buffer": (
        dict(qcfg=lambda d: d["buffer_dtypes"].update({"model.rotary_emb.inv_freqq": "float32"})),
        r"buffer_dtypes\['model\.rotary_emb\.inv_freqq'\]: the model has no such floating non-persistent buffer"),
    "buffer_dtypes: a dtype the model never had": (
        dict(qcfg=lambda d: d["buffer_dtypes"].update({"model.rotary_emb.inv_freq": "bfloat16"})),
        r"buffer_dtypes\['model\.rotary_emb\.inv_freq'\] is 'bfloat16', but the model builds that buffer as float32 "
        r"and the checkpoint's float tensors are \['float32'\]"),
    "buffer_dtypes: not a float dtype": (
        dict(qcfg=lambda d: d["buffer_dtypes"].update({"model.rotary_emb.inv_freq": "int8"})),
        r"buffer_dtypes\['model\.rotary_emb\.inv_freq'\] must name a floating torch dtype"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_corrupt_checkpoint_raises_naming_the_problem(saved, tmp_path, case):
    good, _ = saved
    kw, match = CASES[case]
    bad = corrupt(good, tmp_path / "bad", **kw)
    with pytest.raises(CheckpointError, match=match):
        qkernels.load_quantized(str(bad))


def test_uncorrupted_copy_loads_the_same(saved, tmp_path):
    good, ref = saved
    torch.testing.assert_close(logits(qkernels.load_quantized(str(corrupt(good, tmp_path / "copy")))), ref,
                               rtol=0, atol=0)


def test_validate_false_skips_only_the_code_scans(saved, tmp_path):
    good, _ = saved
    kw, _ = CASES["3-bit codes out of range"]
    bad = corrupt(good, tmp_path / "codes", **kw)
    qkernels.load_quantized(str(bad), validate=False)  # documented: the pass over the codes is skipped
    kw, match = CASES["int4 scale zero"]
    bad = corrupt(good, tmp_path / "scale", **kw)
    with pytest.raises(CheckpointError, match=match):  # scales are checked whatever validate says
        qkernels.load_quantized(str(bad), validate=False)


def test_gptq_and_awq_scales_must_be_positive(tmp_path):
    seeds = iter(range(100))

    def layer(name, lin):
        tensors, w = gptq_layer(lin.in_features, lin.out_features, 4, 32, False, False, False, seed=next(seeds))
        if name == "model.layers.1.mlp.up_proj":
            tensors["scales"][0, 3] = 0.0
        return tensors, w

    write_model_dir(tmp_path, tiny_llama(), {"quant_method": "gptq", "bits": 4, "group_size": 32}, layer)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj scales must be positive"):
        qkernels.load_quantized(str(tmp_path))


def test_compressed_tensors_zero_point_out_of_range():
    from qkernels.formats import compressed_tensors as ct
    from qkernels.formats._common import pack_bits

    N, K = 16, 64
    q = torch.randint(0, 16, (N, K), generator=torch.Generator().manual_seed(0))
    tensors = {"l.weight_packed": pack_bits(q, 4), "l.weight_shape": torch.tensor([N, K]),
               "l.weight_scale": torch.tensor([0.01])}
    w = {"num_bits": 4, "type": "int", "symmetric": False, "strategy": "tensor"}
    ct.convert_layer("l", {**tensors, "l.weight_zero_point": torch.tensor([3], dtype=torch.int32)}, w)  # fine
    with pytest.raises(CheckpointError, match=r"l zero points: zero points of 4-bit codes must be in \[-8, 8\], "
                                              r"got \[100, 100\]"):
        ct.convert_layer("l", {**tensors, "l.weight_zero_point": torch.tensor([100], dtype=torch.int32)}, w)


def test_load_quantized_argument_types(saved):
    good, _ = saved
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module .* got str"):
        qkernels.load_quantized(str(good), model="x")
    with pytest.raises(TypeError, match=r"dtype must be a floating torch\.dtype \(torch\.float16\) or None, got str"):
        qkernels.load_quantized(str(good), dtype="float16")
    with pytest.raises(TypeError, match=r"dtype must be a floating torch\.dtype or None, got dtype torch\.int8"):
        qkernels.load_quantized(str(good), dtype=torch.int8)
    with pytest.raises(ValueError, match=r"dtype applies to a model built from config\.json"):
        qkernels.load_quantized(str(good), model=tiny_llama(), dtype=torch.float16)
    with pytest.raises(TypeError, match=r"validate must be a bool, got str"):
        qkernels.load_quantized(str(good), validate="yes")
    with pytest.raises(TypeError, match=r"path must be a str or os\.PathLike, got int"):
        qkernels.load_quantized(3)
    with pytest.raises(TypeError, match=r"device must be a str or torch\.device, got int"):
        qkernels.load_quantized(str(good), device=0)
    m = qkernels.load_quantized(str(good), dtype=torch.float16)  # a real dtype is honoured
    assert m.model.embed_tokens.weight.dtype == torch.float16


# ---- GGUF files ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    pytest.importorskip("gguf")
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path)


F16_NAN = b"\x00\x7e"
GGUF_CASES = {  # name: (patch(src, dst), error pattern)
    "block_count 2^31 - 1": (lambda s, d: patch_field(s, d, "llama.block_count", 2**31 - 1),
                             r"lacks tensors \['blk\.2\.attn_norm\.weight'.* \(GGUF metadata llama\.block_count is "
                             r"2147483647\)"),
    "block_count 2^32 - 1": (lambda s, d: patch_field(s, d, "llama.block_count", 2**32 - 1),
                             r"llama\.block_count must be in \[1, 2147483647\], got 4294967295"),
    "block_count 1": (lambda s, d: patch_field(s, d, "llama.block_count", 1),
                      r"llama\.block_count is 1 but the file has tensors for blocks 0\.\.1"),
    "block_count 0": (lambda s, d: patch_field(s, d, "llama.block_count", 0), r"llama\.block_count must be in \[1,"),
    "head_count 0": (lambda s, d: patch_field(s, d, "llama.attention.head_count", 0),
                     r"llama\.attention\.head_count must be in \[1, 256\], got 0"),
    "head_count 8": (lambda s, d: patch_field(s, d, "llama.attention.head_count", 8),
                     r"'blk\.0\.attn_q\.weight' has shape \[256, 256\] but the metadata say \[512, 256\] "
                     r"\(llama\.attention\.head_count x head dim\)"),
    "head_count_kv 3": (lambda s, d: patch_field(s, d, "llama.attention.head_count_kv", 3),
                        r"head_count \(4\) must be a multiple of llama\.attention\.head_count_kv \(3\)"),
    "head_count_kv 4": (lambda s, d: patch_field(s, d, "llama.attention.head_count_kv", 4),
                        r"'blk\.0\.attn_k\.weight' has shape \[128, 256\] but the metadata say \[256, 256\]"),
    "rope dimension 63": (lambda s, d: patch_field(s, d, "llama.rope.dimension_count", 63),
                          r"llama\.rope\.dimension_count must be even"),
    "embedding_length": (lambda s, d: patch_field(s, d, "llama.embedding_length", 255),
                         r"llama\.embedding_length is 255 but token_embd\.weight is \[64, 256\]"),
    "feed_forward_length": (lambda s, d: patch_field(s, d, "llama.feed_forward_length", 512),
                            r"'blk\.0\.ffn_gate\.weight' has shape \[256, 256\] but the metadata say \[512, 256\]"),
    "vocab_size": (lambda s, d: patch_field(s, d, "llama.vocab_size", 65),
                   r"token_embd\.weight has 64 rows but GGUF metadata llama\.vocab_size is 65"),
    "rms eps NaN": (lambda s, d: patch_field(s, d, "llama.attention.layer_norm_rms_epsilon", np.nan),
                    r"layer_norm_rms_epsilon must be finite and positive, got nan"),
    "rms eps -1": (lambda s, d: patch_field(s, d, "llama.attention.layer_norm_rms_epsilon", -1.0),
                   r"layer_norm_rms_epsilon must be finite and positive, got -1\.0"),
    "freq_base 0": (lambda s, d: patch_field(s, d, "llama.rope.freq_base", 0.0),
                    r"llama\.rope\.freq_base must be finite and positive, got 0\.0"),
    "freq_base inf": (lambda s, d: patch_field(s, d, "llama.rope.freq_base", np.inf),
                      r"llama\.rope\.freq_base must be finite and positive, got inf"),
    "bos token id": (lambda s, d: patch_field(s, d, "tokenizer.ggml.bos_token_id", 64),
                     r"tokenizer\.ggml\.bos_token_id must be in \[0, 63\], got 64"),
    "tensor type (middle tensor)": (
        lambda s, d: patch_tensor_info(s, d, "blk.0.attn_q.weight", type_id=13),  # Q4_K -> Q5_K
        r"tensor 'blk\.0\.attn_k\.weight' has data offset \d+, expected \d+"),
    "tensor type (last tensor)": (
        lambda s, d: patch_tensor_info(s, d, "output.weight", type_id=12),  # Q6_K -> Q4_K
        r"the tensors' data end at byte \d+ .* but the file has \d+ bytes"),
    "tensor type unknown": (lambda s, d: patch_tensor_info(s, d, "blk.0.ffn_up.weight", type_id=250),
                            r"not a readable GGUF"),
    "tensor offset +32": (lambda s, d: patch_tensor_info(s, d, "blk.1.ffn_up.weight", offset_delta=32),
                          r"tensor 'blk\.1\.ffn_up\.weight' has data offset \d+, expected \d+"),
    "tensor offset beyond the file": (lambda s, d: patch_tensor_info(s, d, "blk.1.ffn_up.weight", offset_delta=2**40),
                                      r"truncated|not a readable GGUF"),
    "NaN block scale (Q4_K d)": (lambda s, d: patch_tensor_bytes(s, d, "blk.0.ffn_up.weight", 144 * 5, F16_NAN),
                                 r"tensor 'blk\.0\.ffn_up\.weight' \(Q4_K\): 1 blocks have a NaN/inf fp16 scale at "
                                 r"byte 0 of the block \(first: block 5\)"),
    "inf block min (Q4_K dmin)": (lambda s, d: patch_tensor_bytes(s, d, "blk.1.attn_q.weight", 2, b"\x00\x7c"),
                                  r"'blk\.1\.attn_q\.weight' \(Q4_K\): 1 blocks have a NaN/inf fp16 scale at byte 2"),
    "NaN block scale (Q6_K d)": (lambda s, d: patch_tensor_bytes(s, d, "output.weight", 208, F16_NAN),
                                 r"'output\.weight' \(Q6_K\): 1 blocks have a NaN/inf fp16 scale at byte 208"),
    "NaN in an F32 norm": (lambda s, d: patch_tensor_bytes(s, d, "output_norm.weight", 8,
                                                           np.array([np.nan], np.float32).tobytes()),
                           r"tensor 'output_norm\.weight' \(F32\) contains 1 NaN/inf values"),
    "tensor count 2^40": (lambda s, d: patch_field(s, d, "GGUF.tensor_count", 2**40),
                          r"claims 1099511627776 tensors, more than"),
    "kv count 2^40": (lambda s, d: patch_field(s, d, "GGUF.kv_count", 2**40),
                      r"claims 1099511627776 metadata key-value pairs"),
    "int array count 2^33": (lambda s, d: patch_field(s, d, "tokenizer.ggml.token_type", ("count", 2**33)),
                             r"a metadata array at byte \d+ claims 8589934592 items"),
    "string array count 2^33": (lambda s, d: patch_field(s, d, "tokenizer.ggml.tokens", ("count", 2**33)),
                                r"a metadata array at byte \d+ claims 8589934592 items"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_corrupt_gguf_raises_naming_the_problem_quickly(gguf_file, tmp_path, case):
    src, _ = gguf_file
    patch, match = GGUF_CASES[case]
    dst = tmp_path / "bad.gguf"
    patch(src, dst)
    t0 = time.perf_counter()
    with pytest.raises(GGUFError, match=match):
        qkernels.load_gguf(dst)
    assert time.perf_counter() - t0 < 10  # ~0.05 s on an idle machine; minutes before the header checks


def test_gguf_unsupported_features_and_argument_types(gguf_file, tmp_path):
    import gguf

    from qkernels.formats.gguf import GGUFUnsupportedError

    src, ref = gguf_file
    # a renamed key (a flipped bit in its name) is refused rather than replaced by a default
    raw = bytearray(src.read_bytes())
    i = raw.find(b"llama.rope.freq_base")
    raw[i + len("llama.rope.freq_bas")] ^= 0x01
    (tmp_path / "key.gguf").write_bytes(bytes(raw))
    with pytest.raises(GGUFUnsupportedError, match=r"metadata keys \['llama\.rope\.freq_basd'\] are not understood"):
        qkernels.load_gguf(tmp_path / "key.gguf")
    # rope scaling is a feature the built model does not have
    w = gguf.GGUFWriter(tmp_path / "scaled.gguf", "llama")
    r = gguf.GGUFReader(src)
    for t in r.tensors:
        data = np.asarray(t.data)
        w.add_tensor(t.name, data, raw_shape=data.shape, raw_dtype=t.tensor_type)
    for key, f in r.fields.items():
        if key.startswith("llama.") or key == "tokenizer.ggml.model":
            v = f.contents()
            getattr(w, "add_float32" if isinstance(v, float) else ("add_string" if isinstance(v, str) else
                                                                    "add_uint32"))(key, v)
    w.add_string("llama.rope.scaling.type", "yarn")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(NotImplementedError, match=r"llama\.rope\.scaling\.type = 'yarn' is not supported"):
        qkernels.load_gguf(tmp_path / "scaled.gguf")
    with pytest.raises(TypeError, match=r"dtype must be a floating torch\.dtype"):
        qkernels.load_gguf(src, dtype="float16")
    with pytest.raises(TypeError, match=r"validate must be a bool"):
        qkernels.load_gguf(src, validate=1)
    # validate=False skips only the NaN scan over the blocks (documented), so the NaN reaches the logits
    dst = tmp_path / "nan.gguf"
    patch_tensor_bytes(src, dst, "output_norm.weight", 8, np.array([np.nan], np.float32).tobytes())
    assert torch.isnan(gguf_logits(qkernels.load_gguf(dst, validate=False))).any()
    torch.testing.assert_close(gguf_logits(qkernels.load_gguf(src)), ref, rtol=0, atol=0)


def test_symmetric_negative_scales_load(tmp_path):
    """The full-range symmetric grid (llama.cpp's Q4_0 rule, QuantConfig(full_range=True)) stores negative scales:
    legitimate, so they load; only asymmetric and fp8 scales must be positive."""
    from qkernels.algorithms import QuantConfig, rtn_quantize_model
    q = rtn_quantize_model(tiny_llama(), QuantConfig(4, 32, True, full_range=True))
    scales = torch.cat([m.scale.flatten() for m in q.modules() if isinstance(m, QuantLinear)])
    assert bool((scales < 0).any())
    qkernels.save_quantized(q, str(tmp_path / "full"))
    back = qkernels.load_quantized(str(tmp_path / "full"))
    assert torch.equal(logits(back), logits(q))
