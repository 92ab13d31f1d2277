"""AWQ: activation-aware weight quantization.

Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han, "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", MLSys 2024, arXiv:2306.00978.

Per decoder layer (HF Llama layout), for each group of linears that read the same input:

1. scale search: ``s = mean|x|^alpha`` per input channel (normalised by ``sqrt(max(s) min(s))``) for alpha on a grid
   in [0, 1); the weights become ``Q(W * s) / s`` and the alpha minimising the MSE of the block output (attention,
   MLP or down projection) against the float block is kept;
2. the chosen ``s`` is folded into the preceding op (RMSNorm weight / previous linear's rows divided by ``s``, the
   linears' columns multiplied by ``s``): the float model computes the same function (up to fp32 rounding);
3. clipping search: per weight group, the clamp ``[-m, m]`` with ``m = r * max|w|`` (r from 1 down to
   ``1 - max_shrink``) minimising the group's output error on sampled tokens (not for q/k, whose errors the softmax
   amplifies differently);
4. RTN quantization of the scaled, clipped weights. Next layer's inputs come from this layer in float (as in the
   reference implementation).

A model without the Llama layer layout falls back to RTN with a logged message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from ._layers import UnsupportedModel, capture_layer_inputs, check_finite, decoder_layers, layer_forward
from .rtn import INT4_G128, QuantConfig, _one_thread, _pad_cols, fake_quantize, quantizable_linears, rtn_quantize_model, \
    set_module, build_quant_linear

log = logging.getLogger("qkernels.algorithms")

_LLAMA_NAMES = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass(frozen=True)
class AWQConfig:
    quant: QuantConfig = INT4_G128
    n_grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    clip_max_shrink: float = 0.5
    clip_tokens: int = 256

    def __post_init__(self):
        if self.n_grid < 1 or self.clip_grid < 1:
            raise ValueError(f"n_grid and clip_grid must be >= 1, got {self.n_grid}, {self.clip_grid}")


def _check_layout(layer: nn.Module) -> None:
    names = {n for n, _ in layer.named_modules()}
    missing = [n for n in _LLAMA_NAMES if n not in names]
    if missing:
        raise UnsupportedModel(f"decoder layer {type(layer).__name__} lacks {missing} (AWQ supports the Llama layout)")


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
    wp = _pad_cols(w.float(), g)
    G = wp.shape[1] // g
    xg = _pad_cols(x.float(), g).reshape(-1, G, g)  # [T, G, g]
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
    wp = _pad_cols(lin.weight.data.float(), g).reshape(lin.out_features, -1, g)
    m = max_val.unsqueeze(-1)
    lin.weight.data = torch.clamp(wp, -m, m).reshape(lin.out_features, -1)[:, :K].to(lin.weight.dtype)


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """``prev``'s output channels divided by ``s`` (an RMSNorm/LayerNorm weight or a Linear's rows), the following
    linears' input columns multiplied by ``s``: the composed float function is unchanged."""
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


@torch.no_grad()
def awq_scale_layer(layer: nn.Module, inps: list[torch.Tensor], kws: list[dict], cfg: AWQConfig) -> dict:
    """Scale search + folding (+ clip search and clamping) on one float decoder layer, in place.

    Returns the captured float outputs of the layer (for the next layer) and the per-linear inputs."""
    _check_layout(layer)
    lin = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    feats: dict[str, list[torch.Tensor]] = {n: [] for n in lin}
    hooks = [m.register_forward_hook(lambda mod, a, o, n=n: feats[n].append(a[0].detach())) for n, m in lin.items()]
    try:
        outs = [layer_forward(layer, x, kw) for x, kw in zip(inps, kws)]
    finally:
        for h in hooks:
            h.remove()
    at, mlp = layer.self_attn, layer.mlp
    attn_in = feats["self_attn.q_proj"]

    def attn_block():
        return [at(hidden_states=x, **kw)[0] for x, kw in zip(attn_in, kws)]

    mlp_in = feats["mlp.gate_proj"]
    down_in = feats["mlp.down_proj"]
    plans = [
        (layer.input_layernorm, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], attn_block),
        (layer.post_attention_layernorm, ["mlp.gate_proj", "mlp.up_proj"], lambda: [mlp(x) for x in mlp_in]),
        (lin["mlp.up_proj"], ["mlp.down_proj"], lambda: [lin["mlp.down_proj"](x) for x in down_in]),
    ]
    if lin["self_attn.v_proj"].weight.shape == lin["self_attn.o_proj"].weight.shape:  # no GQA: v -> o can fold
        o_in = feats["self_attn.o_proj"]
        plans.insert(1, (lin["self_attn.v_proj"], ["self_attn.o_proj"],
                         lambda: [lin["self_attn.o_proj"](x) for x in o_in]))
    alphas = {}
    for prev, names, block in plans:
        x_all = _cat(feats[names[0]])
        check_finite(x_all, f"the input of {names[0]}")
        ref = block()
        s, alpha = search_scale([lin[n] for n in names], x_all.abs().float().mean(0), block, ref, cfg)
        fold_scales(prev, [lin[n] for n in names], s)
        for n in names:  # the inputs those linears now see
            feats[n] = [x / s for x in feats[n]]
        alphas[names[0]] = alpha
    if cfg.clip:
        for n, m in lin.items():
            if n.endswith(("q_proj", "k_proj")):
                continue
            x = _cat(feats[n])
            step = max(1, x.shape[0] // cfg.clip_tokens)
            _apply_clip(m, search_clip(m.weight.data, x[::step][: cfg.clip_tokens], cfg), cfg.quant.group(m.in_features))
    return {"outs": outs, "alphas": alphas}


@torch.no_grad()
def awq_quantize_model(model: nn.Module, calib_batches: list[torch.Tensor], cfg: AWQConfig = AWQConfig(),
                       progress: bool = True, quantize: bool = True) -> nn.Module:
    """AWQ on ``model`` in place; ``quantize=False`` only folds the scales / applies the clipping (float model).

    Args:
        calib_batches: int64 token ids ``[B, L]``.
    Unsupported layouts fall back to RTN (logged)."""
    from tqdm.auto import tqdm

    if not calib_batches:
        raise ValueError("calib_batches must hold at least one [B, L] batch of token ids, got none")
    quantizable_linears(model)
    try:
        layers = decoder_layers(model)
        _check_layout(layers[0])
    except UnsupportedModel as e:
        log.warning("AWQ: %s; falling back to round-to-nearest quantization", e)
        return rtn_quantize_model(model, cfg.quant) if quantize else model
    inps, kws = capture_layer_inputs(model, calib_batches)
    for li, layer in enumerate(tqdm(layers, desc="AWQ layers", disable=not progress)):
        for x in inps:
            check_finite(x, f"the input of decoder layer {li}")
        res = awq_scale_layer(layer, inps, kws, cfg)
        log.debug("AWQ layer %d alphas %s", li, res["alphas"])
        inps = res["outs"]
        if quantize:
            with _one_thread():
                for n, m in list(layer.named_modules()):
                    if isinstance(m, nn.Linear):
                        set_module(layer, n, build_quant_linear(m, cfg.quant))
    return model
