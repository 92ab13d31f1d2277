"""AWQ: activation-aware weight quantization.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", MLSys 2024, arXiv:2306.00978.

Per decoder layer, for each group of linears that read the same input (the family's mapping:
:mod:`qkernels.algorithms.families`; Llama, Mistral, Qwen2/3, Gemma/Gemma2/Gemma3, Phi-3, StableLM):

1. scale search: ``s = mean|x|^alpha`` per input channel (normalised by ``sqrt(max(s) min(s))``) for alpha on a grid
   in [0, 1); the weights become ``Q(W * s) / s`` and the alpha minimising the MSE of the block output (attention,
   MLP or down projection) against the float block is kept;
2. the chosen ``s`` is folded into the preceding op (norm weight, Gemma's ``1 + w``, previous linear's rows divided
   by ``s``, the linears' columns multiplied by ``s``): the float model computes the same function (up to fp32
   rounding), which is checked on every layer with random scales before it is touched;
3. clipping search: per weight group, the clamp ``[-m, m]`` with ``m = r * max|w|`` (r from 1 down to
   ``1 - max_shrink``) minimising the group's output error on sampled tokens (not for q/k, whose errors the softmax
   amplifies differently);
4. RTN quantization of the scaled, clipped weights. Next layer's inputs come from this layer in float (as in the
   reference implementation).

A family without a mapping, or a layer on which folding is not invariant, is refused (``UnsupportedModel``), or
quantized with RTN and a warning when ``AWQConfig.fallback_rtn`` is set.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from ._layers import UnsupportedModel, capture_layer_inputs, check_finite, decoder_layers, layer_forward, one_thread, \
    pad_cols
from .families import LLAMA, Family, check_invariance, check_layout, family_of, fold
from .rtn import INT4_G128, QuantConfig, fake_quantize, quantizable_linears, rtn_quantize_model, \
    set_module, build_quant_linear

log = logging.getLogger("qkernels.algorithms")


@dataclass(frozen=True)
class AWQConfig:
    quant: QuantConfig = INT4_G128
    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 256
    fallback_rtn: bool = False

    def __post_init__(self):
        if self.n_grid < 1 or self.clip_grid < 1:
            raise ValueError(f"n_grid and clip_grid must be >= 1, got {self.n_grid}, {self.clip_grid}")
        if self.quant.act_weighted:
            raise ValueError("AWQConfig.quant: act_weighted grids are for RTN and GPTQ (AWQ's own scale and clip "
                             "searches measure the output error directly); for AWQ + the weighted grid, fold AWQ's "
                             "scales (quantize=False) and run GPTQ with it (the awq-gptq scheme)")


def _scales(x_mean: torch.Tensor, alpha: float) -> torch.Tensor:
    s = x_mean.pow(alpha).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(linears: list[nn.Linear], x_mean: torch.Tensor, block, ref: list[torch.Tensor],
                 cfg: AWQConfig) -> tuple[torch.Tensor, float]:
    """Grid search of alpha; ``block()`` recomputes the block outputs (list, like ``ref``) with the current weights.
    Returns the best scales ``[K]`` and alpha. The weights are left unchanged."""
    orig = [lin.weight.data.clone() for lin in linears]
    best = (float("inf"), None, 0.0)
    try:
        for i in range(cfg.n_grid):
            alpha = i / cfg.n_grid
            s = _scales(x_mean, alpha)
            with one_thread():  # an MSE grid is many small ops: under shared cores 2 threads cost ~10x the CPU
                for lin, w in zip(linears, orig):
                    lin.weight.data = fake_quantize(w * s, cfg.quant) / s
            out = block()
            err = sum(float((o - r).float().pow(2).sum()) for o, r in zip(out, ref)) / sum(r.numel() for r in ref)
            if err < best[0]:
                best = (err, s, alpha)
    finally:
        for lin, w in zip(linears, orig):
            lin.weight.data = w
    if best[1] is None:
        raise ValueError("AWQ: the block error is NaN for every scale (NaN in the activations?)")
    return best[1], best[2]


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, cfg: AWQConfig) -> torch.Tensor:
    """Per-group clamp bound ``[N, G]`` for ``w`` ``[N, K]`` minimising ``|x_g w_g^T - x_g Q(clamp(w_g))^T|^2``
    over the groups ``g``; ``x`` ``[T, K]`` sampled inputs."""
    qc = cfg.quant
    N, K = w.shape
    g = qc.group(K)
    wp = pad_cols(w.float(), g)
    G = wp.shape[1] // g
    xg = pad_cols(x.float(), g).reshape(-1, G, g)  # [T, G, g]
    best_max = torch.empty(N, G)
    for n0 in range(0, N, 128):
        wg = wp[n0:n0 + 128].reshape(-1, G, g)  # [n, G, g]
        org_max = wg.abs().amax(-1, keepdim=True)
        org_out = torch.einsum("tgk,ngk->ngt", xg, wg)
        best_err = torch.full(org_max.shape[:2], float("inf"))
        best = org_max[..., 0].clone()
        for i in range(int(cfg.clip_max_shrink * cfg.clip_grid)):
            m = org_max * (1 - i / cfg.clip_grid)
            cur = torch.clamp(wg, -m, m)
            q = fake_quantize(cur.reshape(-1, G * g), qc).reshape(cur.shape)
            err = (torch.einsum("tgk,ngk->ngt", xg, q) - org_out).pow(2).mean(-1)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, m[..., 0], best)
        best_max[n0:n0 + 128] = best
    return best_max


def _apply_clip(lin: nn.Linear, max_val: torch.Tensor, g: int) -> None:
    K = lin.in_features
    wp = pad_cols(lin.weight.data.float(), g).reshape(lin.out_features, -1, g)
    m = max_val.unsqueeze(-1)
    lin.weight.data = torch.clamp(wp, -m, m).reshape(lin.out_features, -1)[:, :K].to(lin.weight.dtype)


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """``prev``'s output channels divided by ``s`` (a plain RMSNorm/LayerNorm weight (and bias) or a Linear's rows),
    the following linears' input columns multiplied by ``s``: the composed float function is unchanged. Not for
    Gemma's ``(1 + w)`` norms or fused projections: :func:`qkernels.algorithms.families.fold` handles every family."""
    if isinstance(prev, nn.Linear):
        prev.weight.data.div_(s.view(-1, 1).to(prev.weight.dtype))
        if prev.bias is not None:
            prev.bias.data.div_(s.to(prev.bias.dtype))
    else:
        prev.weight.data.div_(s.to(prev.weight.dtype))
        if getattr(prev, "bias", None) is not None:
            prev.bias.data.div_(s.to(prev.bias.dtype))
    for lin in linears:
        lin.weight.data.mul_(s.view(1, -1).to(lin.weight.dtype))


def _cat(xs):
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in xs], 0)


def _first(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _with_first(args, kwargs, x):
    return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})


def _out(o):
    return o[0] if isinstance(o, (tuple, list)) else o


@torch.no_grad()
def awq_scale_layer(layer: nn.Module, inps: list[torch.Tensor], kws: list[dict], cfg: AWQConfig,
                    fam: Family = LLAMA) -> dict:
    """Scale search + folding (+ clip search and clamping) on one float decoder layer of family ``fam``, in place.

    Returns the captured float outputs of the layer (for the next layer) and the chosen alphas."""
    check_layout(layer, fam)
    groups = [g for g in fam.groups if g.applies(layer)]
    lin = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in lin}
    calls: dict[str, list] = {g.block: [] for g in groups}  # each block's (args, kwargs) per batch, to replay it
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: feats[n].append(a[0].detach())) for n, m in lin.items()]
    hooks += [layer.get_submodule(b).register_forward_pre_hook(
        lambda mod, a, kw, b=b: calls[b].append((a, dict(kw))), with_kwargs=True) for b in calls]
    try:
        outs = [layer_forward(layer, x, kw) for x, kw in zip(inps, kws)]
    finally:
        for h in hooks:
            h.remove()
    alphas = {}
    for grp in groups:
        block = layer.get_submodule(grp.block)
        linears = [lin[n] for n in grp.linears]

        def run_block(block=block, b=grp.block):
            return [_out(block(*a, **kw)) for a, kw in calls[b]]

        x_all = _cat(feats[grp.linears[0]])
        check_finite(x_all, f"the input of {grp.linears[0]}")
        ref = run_block()
        s, alpha = search_scale(linears, x_all.abs().float().mean(0), run_block, ref, cfg)
        fold(layer, grp, s)
        for n in grp.linears:  # the inputs those linears (and the block) now see
            feats[n] = [x / s for x in feats[n]]
        calls[grp.block] = [_with_first(a, kw, _first(a, kw) / s) for a, kw in calls[grp.block]]
        alphas[grp.linears[0]] = alpha
    if cfg.clip:
        for n, m in lin.items():
            if n in fam.no_clip:
                continue
            x = _cat(feats[n])
            step = max(1, x.shape[0] // cfg.clip_tokens)
            clip = search_clip(m.weight.data, x[::step][: cfg.clip_tokens], cfg)
            _apply_clip(m, clip, cfg.quant.group(m.in_features))
    return {"outs": outs, "alphas": alphas}


@torch.no_grad()
def awq_quantize_model(model: nn.Module, calib_batches: list[torch.Tensor], cfg: AWQConfig = AWQConfig(),
                       progress: bool = True, quantize: bool = True) -> nn.Module:
    """AWQ on ``model`` in place; ``quantize=False`` only folds the scales / applies the clipping (float model).

    Args:
        calib_batches: int64 token ids ``[B, L]``.
    Raises :class:`qkernels.algorithms.UnsupportedModel` for a family without a mapping
    (:data:`qkernels.algorithms.families.FAMILIES`) or a layer on which folding scales is not invariant (checked
    on every layer before it is scaled); ``cfg.fallback_rtn`` quantizes such a model with RTN instead, with a warning
    (only when the model is refused before any layer was touched)."""
    from tqdm.auto import tqdm

    if not calib_batches:
        raise ValueError("calib_batches must hold at least one [B, L] batch of token ids, got none")
    quantizable_linears(model)
    try:
        fam = family_of(model)
        layers = decoder_layers(model)
        check_layout(layers[0], fam)
        inps, kws = capture_layer_inputs(model, calib_batches)
        for x in inps:
            check_finite(x, "the input of decoder layer 0")
        check_invariance(layers[0], fam, inps[0], kws[0], "decoder layer 0")
    except UnsupportedModel as e:
        if not cfg.fallback_rtn:
            raise
        warnings.warn(f"{e}; falling back to round-to-nearest quantization", stacklevel=2)
        return rtn_quantize_model(model, cfg.quant) if quantize else model
    for li, layer in enumerate(tqdm(layers, desc="AWQ layers", disable=not progress)):
        for x in inps:
            check_finite(x, f"the input of decoder layer {li}")
        if li:
            check_invariance(layer, fam, inps[0], kws[0], f"decoder layer {li}")
        res = awq_scale_layer(layer, inps, kws, cfg, fam)
        log.debug("AWQ layer %d alphas %s", li, res["alphas"])
        inps = res["outs"]
        if quantize:
            with one_thread():
                for n, m in list(layer.named_modules()):
                    if isinstance(m, nn.Linear):
                        set_module(layer, n, build_quant_linear(m, cfg.quant))
    return model
