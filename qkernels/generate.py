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

import logging

import torch
from torch import nn

__all__ = ["DECODE_ATTENTION", "Clock", "CompiledDecoder", "RotaryTable", "Timing", "add_step", "eager_generate",
           "register_decode_attention"]

logger = logging.getLogger("qkernels.generate")


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


DECODE_ATTENTION = "qkernels_decode"


def _decode_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function (``AttentionInterface``): single-token steps (``q_len == 1``) run
    ``qkernels.ops.decode_attention`` over the open positions of the mask; anything else (the prompt, training,
    dropout, logit soft-capping, attention sinks, another mask format) runs transformers' sdpa attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from .ops.attention import decode_attention

    B, H, q_len, D = query.shape
    L = key.shape[2]
    mask = None
    plain = (q_len == 1 and not module.training and not dropout and kwargs.get("softcap") is None
             and kwargs.get("s_aux") is None and query.device.type == "cpu")
    if plain and attention_mask is not None:
        am = attention_mask
        if am.dim() == 4 and am.is_floating_point() and am.shape[1] == 1 and am.shape[2] == 1 and am.shape[3] == L:
            mask = am[:, 0, 0, :]
            if mask.shape[0] != B:
                mask = mask.expand(B, L)
        else:
            plain = False
    if not plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    out = decode_attention(query[:, :, 0, :], key, value, mask, scaling)
    return out.view(B, 1, H, D), None


def register_decode_attention() -> str:
    """Register qkernels' decode attention with transformers (``AttentionInterface`` and, for its masks, the
    additive float masks of ``eager_mask``) under the name :data:`DECODE_ATTENTION`; returns the name, for
    ``model.set_attn_implementation(name)`` or ``CompiledDecoder(..., attn_implementation=name)``.

    Why: a single query over a static KV cache. Compiled HF eager attention walks every slot of the cache (the
    closed ones only masked) inside inductor's fused kernels; sdpa stays one call of torch's flash-attention kernel
    per layer. The C++ op reads only the positions the mask leaves open (docs/decode.md)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(DECODE_ATTENTION, _decode_attention_forward)
    AttentionMaskInterface.register(DECODE_ATTENTION, eager_mask)
    return DECODE_ATTENTION


class RotaryTable(nn.Module):
    """Stands in for a transformers rotary-embedding module (``forward(x, position_ids) -> (cos, sin)``) while a
    :class:`CompiledDecoder` runs: cos/sin of the positions ``[0, max_len)`` are computed once, by the original
    module, and then looked up.

    Why: transformers computes cos/sin from the position ids in every forward. Compiled, inductor inlines that
    pointwise ``cos``/``sin`` into its consumers, and with eager attention the query's rotation lands inside the
    ``q @ k^T`` reduction: the query's cos/sin are recomputed for every cached position of every head (9 x 128 x 64
    vector cos + sin per layer on SmolLM2). A profile of the compiled int4 step showed that one fused kernel at
    ~250 us per layer, about a quarter of the step (docs/decode.md). A lookup inlines as a load.

    The table holds the module's fp32 output (the module is called with an fp32 ``x``) and the lookup casts it to
    ``x.dtype`` as the module does, so outputs are the module's own values (checked at construction on every
    position, one at a time, as decoding calls it). Outside :class:`CompiledDecoder`'s calls (``active`` False) the
    original module runs, so the model still serves longer sequences.
    """

    def __init__(self, rotary: nn.Module, max_len: int, device):
        super().__init__()
        self.original = rotary
        self.active = False
        pos = torch.arange(max_len, device=device)
        x = torch.zeros(1, dtype=torch.float32, device=device)
        with torch.no_grad():
            cos, sin = rotary(x, pos[None])
            for p in range(max_len):  # as decoding calls it: one position at a time
                c1, s1 = rotary(x, pos[None, p:p + 1])
                if not (torch.equal(c1[0, 0], cos[0, p]) and torch.equal(s1[0, 0], sin[0, p])):
                    raise ValueError(f"{type(rotary).__name__} gives position {p} other cos/sin alone than in a "
                                     f"batch of positions: not a fixed table")
        self.register_buffer("cos", cos[0].contiguous(), persistent=False)  # [max_len, head_dim] fp32
        self.register_buffer("sin", sin[0].contiguous(), persistent=False)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        if not self.active or args or kwargs:
            return self.original(x, position_ids, *args, **kwargs)
        return self.cos[position_ids].to(x.dtype), self.sin[position_ids].to(x.dtype)


def _rope_tables(model: nn.Module, max_len: int) -> list[RotaryTable]:
    """Replace (in place) every fixed rotary-embedding module of ``model`` by a :class:`RotaryTable`; modules whose
    frequencies change with the sequence (dynamic / long-rope scaling) or whose table check fails stay."""
    tables = []
    for name, mod in list(model.named_modules()):
        if not type(mod).__name__.endswith("RotaryEmbedding") or isinstance(mod, RotaryTable):
            continue
        rope_type = str(getattr(mod, "rope_type", "default"))
        if "dynamic" in rope_type or "longrope" in rope_type:
            logger.info("CompiledDecoder: %s keeps computing cos/sin (rope_type %r)", name, rope_type)
            continue
        try:
            table = RotaryTable(mod, max_len, next(iter(mod.buffers()), torch.empty(0)).device)
        except Exception as e:  # noqa: BLE001  (another forward signature or a non-table: keep the module)
            logger.info("CompiledDecoder: %s keeps computing cos/sin (%s)", name, e)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, table)
        tables.append(table)
    return tables


def _compiled_code(dec: "CompiledDecoder"):
    """The code dynamo compiled for ``dec._decode_step`` that its last call ran, as a bound method that runs without
    dynamo's frame hook; None where this torch does not expose it.

    dynamo keeps one cache entry per compiled variant on the function's code object, most recently used first; an
    entry's ``code`` is the transformed bytecode, which calls the compiled graph (``__compiled_fn_*``, placed in this
    module's globals by dynamo) with the tensors it reads from ``self`` and the arguments, and replays any Python side
    effects. Called without the hook it is the compiled step minus the per-call guard check and cache lookup."""
    import types

    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list

        fn = dec._decode_step.__func__
        entries = _debug_get_cache_entry_list(fn.__code__)
    except Exception:  # noqa: BLE001  (a torch without this API: keep the dynamo call)
        return None
    if not entries:
        return None
    return types.MethodType(types.FunctionType(entries[0].code, fn.__globals__, fn.__name__), dec)


class CompiledDecoder:
    """A StaticCache of ``max_len`` tokens and one ``torch.compile``d single-token step (greedy argmax inside the
    graph). The graph is compiled on the first decode step; :meth:`generate` can be called again (same or another
    prompt up to ``max_len`` tokens in all) without recompiling: the cache is reset in place."""

    def __init__(self, model, max_len: int, *, fullgraph: bool = True, mode: str | None = None,
                 attn_implementation: str | None = None, skip_guards: bool = False, rope_table: bool = True,
                 cpp_wrapper: bool = False, options: dict | None = None):
        """Args:
            model: a transformers causal LM (quantized or not), in eval mode.
            max_len: the static cache's length (prompt + new tokens, at most).
            attn_implementation: if given, set on ``model`` (``model.set_attn_implementation``: this changes the
                model) before the graph is traced. ``"eager"`` (HF's matmul + softmax attention) is what inductor
                fuses into its own kernels; the default ``"sdpa"`` stays a call of torch's CPU flash-attention
                kernel per layer, which for one query over a static cache cost ~16-24% of a SmolLM2 int4 decode step
                (docs/decode.md). Eager attention compiles several times slower (minutes on 2 cores, cached after).
                :data:`DECODE_ATTENTION` (``"qkernels_decode"``, registered here with transformers) runs the
                single-token steps on ``qkernels.ops.decode_attention``, which reads only the cache's open
                positions; the prompt runs on sdpa.
            skip_guards: after the first (compiling) step for a thread count, call the code dynamo compiled for it
                directly, bypassing dynamo's frame hook: neither its guard check of the whole model nor its cache
                lookup runs (together ~2-2.5 ms of a ~15 ms SmolLM2 int4 step, measured step by step interleaved in
                one process; skipping only the guards, ``set_stance(skip_guard_eval_unsafe=True)``, saved ~0.5 ms).
                Where that code cannot be found, the steps run under that stance instead. Safe only while the model
                is left unchanged: do not modify, move or fuse it between calls (build a new decoder instead).
            cpp_wrapper: inductor writes the step's wrapper (the code that calls the generated kernels and the ops
                in between: ~120 qkernels GEMM calls and ~150 fused kernels per SmolLM2 step) in C++ instead of
                Python (``torch._inductor.config.cpp_wrapper``). Same kernels, same outputs; the Python wrapper's
                per-call cost was ~10% of a SmolLM2 int4 step at 1 and 2 threads (same-process interleaved A/B,
                docs/decode.md). Costs a longer first compile (the wrapper is a large C++ file; ~4 minutes for
                SmolLM2 on 2 cores, cached after).
            options: extra inductor options (``torch.compile(options=...)``); may be combined with ``mode``.
            rope_table: replace the model's rotary-embedding modules by :class:`RotaryTable` lookups of the
                ``max_len`` positions (this changes the model: the tables are active only inside this decoder's
                calls, elsewhere the original modules run). Same cos/sin values; the compiled step no longer
                recomputes them inside attention.
        """
        from transformers import StaticCache

        if attn_implementation == DECODE_ATTENTION:
            register_decode_attention()
        if attn_implementation is not None:
            model.set_attn_implementation(attn_implementation)
        self.model, self.max_len, self.skip_guards = model, int(max_len), bool(skip_guards)
        self._compiled_once = False
        self._direct = {}  # thread count -> the compiled step without dynamo's frame hook (skip_guards)
        self._rope_tables = _rope_tables(model, self.max_len) if rope_table else []
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        options = dict(options or {})
        if cpp_wrapper:
            options["cpp_wrapper"] = True
        if mode is not None and options:  # torch.compile takes one of the two: spell the mode out as its options
            from torch._inductor import list_mode_options

            options, mode = {**list_mode_options(mode), **options}, None
        self._step = torch.compile(self._decode_step, fullgraph=fullgraph, mode=mode, dynamic=False,
                                   options=options or None)

    def _decode_step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=tok, position_ids=pos, cache=self.cache, use_cache=True).logits
        return _argmax_last(logits)

    def _run_step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        direct = self._direct.get(torch.get_num_threads()) if self.skip_guards else False
        if direct:
            return direct(tok, pos)
        out = self._guarded_step(tok, pos)
        if direct is None:  # False: looked up before, not available
            self._direct[torch.get_num_threads()] = _compiled_code(self) or False
        return out

    def _guarded_step(self, tok: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.skip_guards and self._compiled_once:
            try:
                with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                    return self._step(tok, pos)
            except RuntimeError as e:
                # dynamo refuses to recompile under this stance, before running anything: something a guard watches
                # changed since the first step (e.g. torch.set_num_threads). Run this step with the guards checked
                # (recompiling where needed); later steps skip them again, among the graphs compiled so far.
                if "skip_guard_eval_unsafe" not in str(e):
                    raise
        out = self._step(tok, pos)
        self._compiled_once = True
        return out

    @torch.no_grad()  # as model.generate (inference_mode tensors carry no version counter some layers use)
    def generate(self, prompt_ids: list, new_tokens: int) -> tuple[list, Timing]:
        P = len(prompt_ids)
        if P + new_tokens > self.max_len:
            raise ValueError(f"prompt ({P}) + new_tokens ({new_tokens}) exceeds max_len={self.max_len}")
        for t in self._rope_tables:
            t.active = True
        try:
            return self._generate(prompt_ids, new_tokens)
        finally:
            for t in self._rope_tables:
                t.active = False

    def _generate(self, prompt_ids: list, new_tokens: int) -> tuple[list, Timing]:
        P = len(prompt_ids)
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
