"""The llama.cpp decode loop of bench_decode (llama-cpp-python's low-level eval, greedy argmax on its logits). The
transformers loops (eager DynamicCache, compiled StaticCache step) live in :mod:`qkernels.generate`.
"""

from __future__ import annotations

from qkernels.generate import Clock, Timing, add_step


def llama_cpp_generate(llm, prompt_ids: list, new_tokens: int) -> tuple[list, Timing]:
    """Greedy decoding through llama-cpp-python's low-level loop: ``Llama.eval`` of the prompt, then one token at a
    time, numpy argmax of the last logits row. Its high-level ``generate()`` / ``__call__`` spend most of a small
    model's step in per-token Python sampling code, which would measure the binding rather than ggml."""
    import llama_cpp
    import numpy as np

    n_vocab = llm.n_vocab()

    def argmax_last() -> int:
        # without logits_all, Llama.eval keeps no scores (0.3.x): read the last token's logits from the context
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))

    llm.reset()
    c = Clock()
    llm.eval(prompt_ids)
    tok = argmax_last()
    timing = Timing(*c.elapsed())
    out = [tok]
    for _ in range(new_tokens - 1):
        c = Clock()
        llm.eval([tok])
        tok = argmax_last()
        out.append(tok)
        add_step(timing, c)
    return out, timing
