"""Language-model quality and size metrics: perplexity over fixed windows, next-token top-1 accuracy, top-1
agreement with a reference (the float model), model size, bits per weight, throughput."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.gguf_linear import GGUFLinear
from ..nn.linear import QuantLinear


@torch.no_grad()
def evaluate_lm(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, ref_top1: torch.Tensor | None = None,
                progress: bool = True, desc: str = "eval") -> tuple[dict, torch.Tensor]:
    """Scores every next-token prediction inside each window (the first token, BOS, is context only).

    Args:
        windows: int64 ``[W, L]`` token ids. ref_top1: int32 ``[W, L-1]`` argmax predictions of a reference model.
    Returns:
        ``(metrics, top1)``: metrics has ppl, nll (mean, nats), top1_acc, top1_agree (if ref_top1), tokens_per_s
        (forward throughput over all window tokens), n_scored; top1 is int32 ``[W, L-1]``.
    """
    from tqdm.auto import tqdm

    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [W, L] with L >= 2, got {tuple(windows.shape)}")
    nll, correct, agree, n = 0.0, 0, 0, 0
    top1 = torch.empty(windows.shape[0], windows.shape[1] - 1, dtype=torch.int32)
    elapsed = 0.0
    for i in tqdm(range(0, windows.shape[0], batch_size), desc=desc, disable=not progress, leave=False):
        b = windows[i:i + batch_size]
        t0 = time.perf_counter()
        logits = model(input_ids=b, use_cache=False).logits[:, :-1].float()
        elapsed += time.perf_counter() - t0
        if not torch.isfinite(logits).all():
            raise ValueError(f"{desc}: the model produced NaN/inf logits")
        tgt = b[:, 1:]
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="sum"))
        pred = logits.argmax(-1)
        top1[i:i + b.shape[0]] = pred.to(torch.int32)
        correct += int((pred == tgt).sum())
        if ref_top1 is not None:
            agree += int((pred.to(torch.int32) == ref_top1[i:i + b.shape[0]]).sum())
        n += tgt.numel()
    mean_nll = nll / n
    out = {"ppl": math.exp(mean_nll), "nll": mean_nll, "top1_acc": correct / n, "n_scored": n,
           "tokens_per_s": windows.numel() / elapsed if elapsed > 0 else float("nan")}
    if ref_top1 is not None:
        out["top1_agree"] = agree / n
    return out, top1


def _tensors(model: nn.Module):
    seen = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t is None or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        yield t


def model_size_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (shared/tied tensors counted once)."""
    return sum(t.numel() * t.element_size() for t in _tensors(model))


def bits_per_weight(model: nn.Module, skip=("lm_head",)) -> float:
    """Stored bits per weight of the linear layers (quantized: codes + scales + zero points, as stored; GGUF: the
    ggml blocks with their headers, each tensor in its own type; float: the dtype's width), output head excluded."""
    bits, n = 0, 0
    for name, m in model.named_modules():
        if any(name == s or name.endswith("." + s) for s in skip):
            continue
        if isinstance(m, QuantLinear):  # codes (padding of a ragged last group included), scales, zeros, input_perm
            bits += 8 * sum(t.numel() * t.element_size() for k, t in m.named_buffers(recurse=False)
                            if k != "bias" and t is not None)
            n += m.in_features * m.out_features
        elif isinstance(m, GGUFLinear):
            bits += 8 * m.data.numel()
            n += m.in_features * m.out_features
        elif isinstance(m, nn.Linear):
            bits += m.weight.numel() * m.weight.element_size() * 8
            n += m.weight.numel()
    return bits / n if n else float("nan")
