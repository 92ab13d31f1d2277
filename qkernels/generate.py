"""Greedy decoding of a transformers causal LM without the sampling machinery, timed token by token: eager with a
DynamicCache, or -- the recommended way to run a quantized model -- one compiled single-token step over a StaticCache:

    from qkernels.generate import CompiledDecoder
    dec = CompiledDecoder(model, max_len=prompt_len + new_tokens)
    tokens, timing = dec.generate(prompt_ids, new_tokens)

The prompt (prefill) runs eagerly into the static cache, as transformers' own ``generate(...,
cache_implementation="static")`` does: compiling it would add a second graph per prompt length. Every decode step
then calls the same compiled graph with a ``[1, 1]`` token and a ``[1, 1]`` position tensor: shapes and the cache's
tensor addresses never change, so dynamo neither breaks the graph (``fullgraph=True`` raises if it would) nor
recompiles per token. transformers is imported only when a decoder is built (the ``[hf]`` extra).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

__all__ = ["Clock", "CompiledDecoder", "Timing", "add_step", "eager_generate"]


@dataclass
class Timing:
    """Wall-clock and process CPU seconds. On a machine shared with other busy processes the wall time of a step
    includes the time the scheduler gave to others; the CPU time of a 1-thread run is the work of the step itself."""

    prefill_s: float
    prefill_cpu_s: float = float("nan")
    decode_s: list = field(default_factory=list)  # one entry per generated token after the first
    decode_cpu_s: list = field(default_factory=list)

    @property
    def decode_tok_s(self) -> float:
        """1 / median wall seconds per token (the median keeps bursts of load out)."""
        return 1.0 / statistics.median(self.decode_s) if self.decode_s else float("nan")

    @property
    def decode_cpu_tok_s(self) -> float:
        """1 / median CPU seconds per token (process CPU time: all threads)."""
        return 1.0 / statistics.median(self.decode_cpu_s) if self.decode_cpu_s else float("nan")


class Clock:
    """Wall-clock and process CPU time since construction."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def add_step(timing: Timing, clock: Clock) -> None:
    """Append the time since ``clock`` as one decode step of ``timing``."""
    wall, cpu = clock.elapsed()
    timing.decode_s.append(wall)
    timing.decode_cpu_s.append(cpu)


def _argmax_last(logits: torch.Tensor) -> torch.Tensor:
    return logits[:, -1].argmax(-1, keepdim=True)  # [1, 1] int64


@torch.no_grad()  # as model.generate (inference_mode tensors carry no version counter some layers use)
def eager_generate(model, prompt_ids: list, new_tokens: int) -> tuple[list, Timing]:
    """Greedy decoding with a DynamicCache (what ``model.generate`` uses by default), no sampling machinery.

    Returns the ``new_tokens`` generated ids and the timing: ``prefill_s`` is the prompt forward plus the argmax of
    the first token (time to first token), ``decode_s`` one forward + argmax per further token."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    c = Clock()
    tok = _argmax_last(model(input_ids=ids, cache=cache, use_cache=True).logits)
    timing = Timing(*c.elapsed())
    out = [int(tok)]
    for _ in range(new_tokens - 1):
        c = Clock()
        tok = _argmax_last(model(input_ids=tok, cache=cache, use_cache=True).logits)
        out.append(int(tok))  # int() syncs, so the step is timed whole
        add_step(timing, c)
    return out, timing


class CompiledDecoder:
    """A StaticCache of ``max_len`` tokens and one ``torch.compile``d single-token step (greedy argmax inside the
    graph). The graph is compiled on the first decode step; :meth:`generate` can be called again (same or another
    prompt up to ``max_len`` tokens in all) without recompiling: the cache is reset in place."""

    def __init__(self, model, max_len: int, *, fullgraph: bool = True, mode: str | None = None,
                 attn_implementation: str | None = None, skip_guards: bool = False):
        """Args:
            model: a transformers causal LM (quantized or not), in eval mode.
            max_len: the static cache's length (prompt + new tokens, at most).
            attn_implementation: if given, set on ``model`` (``model.set_attn_implementation``: this changes the
                model) before the graph is traced. ``"eager"`` (HF's matmul + softmax attention) is what inductor
                fuses into its own kernels; the default ``"sdpa"`` stays a call of torch's CPU flash-attention
                kernel per layer, which for one query over a static cache cost ~16-24% of a SmolLM2 int4 decode step
                (docs/decode.md). Eager attention compiles several times slower (minutes on 2 cores, cached after).
            skip_guards: after the first (compiling) step, run the steps under
                ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``: dynamo's guard check of the whole model
                is skipped (~1-2 ms a step on SmolLM2). Safe only while the model is left unchanged: do not modify,
                move or fuse it between calls (build a new decoder instead).
        """
        from transformers import StaticCache

        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        self.model, self.max_len, self.skip_guards = model, int(max_len), bool(skip_guards)
        self._compiled_once = False
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        self._step = torch.compile(self._decode_step, fullgraph=fullgraph, mode=mode, dynamic=False)

    def _decode_step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=tok, position_ids=pos, cache=self.cache, use_cache=True).logits
        return _argmax_last(logits)

    def _run_step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.skip_guards and self._compiled_once:
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self._step(tok, pos)
        out = self._step(tok, pos)
        self._compiled_once = True
        return out

    @torch.no_grad()  # as model.generate (inference_mode tensors carry no version counter some layers use)
    def generate(self, prompt_ids: list, new_tokens: int) -> tuple[list, Timing]:
        P = len(prompt_ids)
        if P + new_tokens > self.max_len:
            raise ValueError(f"prompt ({P}) + new_tokens ({new_tokens}) exceeds max_len={self.max_len}")
        self.cache.reset()
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        pos = torch.arange(P).unsqueeze(0)
        c = Clock()
        tok = _argmax_last(self.model(input_ids=ids, position_ids=pos, cache=self.cache, use_cache=True).logits)
        timing = Timing(*c.elapsed())
        out = [int(tok)]
        for i in range(new_tokens - 1):
            c = Clock()
            # fresh [1, 1] tensors each step: the graph takes them as inputs (a Python int would be a constant)
            tok = self._run_step(tok.clone(), torch.tensor([[P + i]]))
            out.append(int(tok))
            add_step(timing, c)
        return out, timing
