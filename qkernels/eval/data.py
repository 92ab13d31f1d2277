"""Text for calibration and evaluation, offline.

The default corpus is Python's own documentation, which ships with every CPython as ``pydoc_data.topics`` (the
help() topics: about 0.5 MB of English prose with code). Any text file can be used instead. The text is split
deterministically into a calibration part and a disjoint evaluation part at a line boundary: the last
``eval_fraction`` of the characters is for evaluation, the rest for calibration.
"""

from __future__ import annotations

import torch


def pydoc_text() -> str:
    """The pydoc topics, sorted by topic name and joined by blank lines (deterministic for a Python version)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def load_text(path: str | None = None) -> str:
    if path is None:
        return pydoc_text()
    with open(path, encoding="utf-8") as f:
        return f.read()


def split_text(text: str, eval_fraction: float = 0.3) -> tuple[str, str]:
    """``(calibration, evaluation)``: disjoint parts of ``text``, split at the line break nearest before the cut."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    cut = int(len(text) * (1 - eval_fraction))
    nl = text.rfind("\n", 0, cut)
    cut = nl + 1 if nl > 0 else cut
    return text[:cut], text[cut:]


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """int64 ``[T]`` token ids, no special tokens (BOS is added per window/sample by the callers)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_id(tokenizer) -> int:
    for t in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if t is not None:
            return int(t)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token to start each window with")


def windows(ids: torch.Tensor, ctx: int, n_tokens: int | None, bos: int | None, what: str) -> torch.Tensor:
    """Non-overlapping windows ``[W, ctx]`` of ``ids``; each starts with ``bos`` (if given) followed by
    ``ctx - 1`` text tokens (``ctx`` without BOS). ``n_tokens`` caps the text tokens used (None = all full windows).

    Raises ValueError when the text holds less than one window."""
    if ctx < 2:
        raise ValueError(f"context length must be >= 2, got {ctx}")
    per = ctx - 1 if bos is not None else ctx
    avail = ids.numel() // per
    want = avail if n_tokens is None else min(avail, max(1, n_tokens // per))
    if avail == 0 or want == 0:
        raise ValueError(f"the {what} text is too short: it has {ids.numel()} tokens, at least {per} are needed for "
                         f"one window of context {ctx}; use a longer text or a smaller context")
    w = ids[: want * per].reshape(want, per)
    if bos is not None:
        w = torch.cat([torch.full((want, 1), bos, dtype=ids.dtype), w], 1)
    return w


def batches(w: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    return [w[i:i + batch_size] for i in range(0, w.shape[0], batch_size)]
