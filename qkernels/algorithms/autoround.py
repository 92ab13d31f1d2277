"""AutoRound-style rounding optimisation: per decoder block, learned rounding offsets (and scale factors) by signed
gradient descent on the block's output error.

Cheng, Zhang, Shen, Luo, Guo, Wang, Lv, "Optimize Weight Rounding via Signed Gradient Descent for the Quantization
of LLMs" (AutoRound), arXiv:2309.05516. For every linear of one decoder block, with the group grid ``(s, z)`` chosen
as RTN would (any :class:`~qkernels.algorithms.QuantConfig` grid; ``act_weighted`` takes ``E[x^2]`` of each
linear's input on this block's calibration inputs):

    ``w_hat = s a (clamp(round(w / (s a) + V) + z, qmin, qmax) - z)``

with ``V`` ``[N, K]`` in ``[-0.5, 0.5]`` (0: round to nearest) and, if ``learn_scale``, one factor ``a`` per group in
``[1 - scale_range, 1 + scale_range]`` (1: the grid's own scale). The paper learns factors of the weights' min / max
in ``[0.5, 1]`` (clipping only); here the start is a searched grid that may have clipped already, so ``a`` may also
widen it. ``V`` and ``a`` minimise ``mean((block_q(x_q) - block(x_f))^2)``: the quantized block on the inputs that
the already quantized blocks produce, against the float block on the float model's inputs (the paper's default,
``enable_quanted_input``), with the straight-through estimator for ``round``; each step moves every parameter by
``lr * sign(grad)`` (lr decays linearly to 0 over ``steps``; default ``lr = 1 / steps`` as in the paper, so a
parameter can travel at most 0.5 in all). One calibration batch per step, in a seeded random order.

Unlike the paper, which keeps the parameters of the lowest minibatch loss seen, the result is checked once on ALL
calibration batches: a block whose optimised loss is not below its starting grid's keeps the starting grid, so
the calibration reconstruction loss of every block never exceeds plain RTN's on the same grid and inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._layers import capture_layer_inputs, check_finite, decoder_layers, layer_forward, one_thread, \
    pad_cols
from .grids import _int_range
from .rtn import INT4_G128, QuantConfig, build_quant_linear, qparams, quantizable_linears, \
    second_moments_of_inputs, set_module

log = logging.getLogger("qkernels.algorithms")


@dataclass(frozen=True)
class AutoRoundConfig:
    """``quant``: the grid that the rounding starts from; ``steps``: signed-gradient steps per decoder block (the
    paper uses 200; each costs one forward and backward of the block on one calibration batch); ``lr``: None ->
    ``1 / steps``; ``learn_scale``: also learn one scale factor per group within ``1 +- scale_range`` (off by
    default: on SmolLM2-135M's layers 0 and 10, 30 steps from the ``-full-wmse`` grid, rounding alone lowered the
    block MSE to 0.46x / 0.41x of the grid's, rounding plus scale only to 0.54x / 0.48x, at the same lr);
    ``seed``: the order of the calibration batches."""

    quant: QuantConfig = INT4_G128
    steps: int = 100
    lr: float | None = None
    learn_scale: bool = False
    scale_range: float = 0.5
    seed: int = 0

    def __post_init__(self):
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be a non-negative int, got {self.steps!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive (or None for 1 / steps), got {self.lr!r}")
        if not 0 <= self.scale_range < 1:
            raise ValueError(f"scale_range must be in [0, 1), got {self.scale_range!r}")

    @property
    def step_lr(self) -> float:
        return self.lr if self.lr is not None else 1.0 / max(self.steps, 1)


class _RoundingLinear(nn.Module):
    """A linear whose weight is the differentiable fake quantization above: frozen ``weight`` fp32 ``[N, K]``,
    grid ``scale`` fp32 ``[N, G]`` and ``zero_point`` ``[N, G]`` (or None), learned ``v`` ``[N, G, g]`` and
    ``factor`` ``[N, G, 1]`` (or None)."""

    def __init__(self, lin: nn.Linear, cfg: AutoRoundConfig, scale, zero_point):
        super().__init__()
        qc = cfg.quant
        self.K, self.g = lin.in_features, qc.group(lin.in_features)
        self.qmin, self.qmax = _int_range(qc.bits)
        w = pad_cols(lin.weight.detach().float(), self.g)
        self.register_buffer("w", w.reshape(w.shape[0], -1, self.g))
        self.register_buffer("s", scale.float().unsqueeze(-1))
        self.register_buffer("z", None if zero_point is None else zero_point.float().unsqueeze(-1))
        self.bias = None if lin.bias is None else lin.bias.detach()
        self.v = nn.Parameter(torch.zeros_like(self.w))
        self.factor = nn.Parameter(torch.ones_like(self.s)) if cfg.learn_scale else None
        self.scale_range = cfg.scale_range

    def codes(self, ste: bool = False):
        """(codes ``[N, G, g]`` fp32 holding integers, effective scale ``[N, G, 1]``)."""
        s = self.s if self.factor is None else self.s * self.factor
        x = self.w / s + self.v
        r = x + (torch.round(x) - x).detach() if ste else torch.round(x)  # straight-through round
        z = 0.0 if self.z is None else self.z
        return torch.clamp(r + z, self.qmin, self.qmax), s

    def weight_hat(self) -> torch.Tensor:
        q, s = self.codes(ste=True)
        z = 0.0 if self.z is None else self.z
        w = s * (q - z)
        return w.reshape(w.shape[0], -1)[:, :self.K]

    def forward(self, x):
        return F.linear(x, self.weight_hat().to(x.dtype), self.bias)

    @torch.no_grad()
    def sign_step(self, lr: float) -> None:
        # signed gradient descent (the paper's optimiser): only the direction of each gradient counts, so one
        # step moves an offset by lr whatever the scale of the loss
        for p in (self.v, self.factor):
            if p is not None and p.grad is not None:
                p.sub_(lr * p.grad.sign())
                p.grad = None
        self.v.clamp_(-0.5, 0.5)
        if self.factor is not None:
            self.factor.clamp_(1 - self.scale_range, 1 + self.scale_range)

    @torch.no_grad()
    def reset(self) -> None:
        self.v.zero_()
        if self.factor is not None:
            self.factor.fill_(1.0)

    @torch.no_grad()
    def quant_linear(self, lin: nn.Linear, qc: QuantConfig):
        q, s = self.codes()
        N = q.shape[0]
        zp = None if self.z is None else self.z[..., 0].to(torch.int32)
        return build_quant_linear(lin, qc, q.reshape(N, -1).to(torch.int8), s[..., 0], zp)


def _block_loss(layer, inps, kws, targets) -> float:
    """Mean squared error of ``layer``'s outputs against ``targets`` over all batches (per element)."""
    with torch.no_grad():
        tot = sum(float(F.mse_loss(layer_forward(layer, x, kw), t, reduction="sum"))
                  for x, kw, t in zip(inps, kws, targets))
    return tot / sum(t.numel() for t in targets)


def autoround_block(layer: nn.Module, inps: list[torch.Tensor], kws: list[dict], targets: list[torch.Tensor],
                    cfg: AutoRoundConfig) -> dict:
    """Optimises the rounding of every ``nn.Linear`` of decoder ``layer`` (in place: they become QuantLinear).

    Args:
        inps: the block's inputs ``[B, L, H]`` as the quantized model computes them; kws: their keyword arguments.
        targets: the float block's outputs ``[B, L, H]`` on the float model's inputs, one per batch.
    Returns ``{"loss_start", "loss_end", "kept"}``: the reconstruction MSE over all batches of the starting grid
    and of the result, and whether the optimised rounding was kept (else the starting grid is).
    """
    if not inps or len(inps) != len(targets) or len(kws) != len(inps):
        raise ValueError(f"inps, kws and targets must be non-empty lists of equal length, got {len(inps)}, "
                         f"{len(kws)}, {len(targets)}")
    qc = cfg.quant
    linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
    if not linears:
        raise ValueError(f"decoder layer {type(layer).__name__} has no nn.Linear to quantize")
    imps = {}
    if qc.act_weighted:  # E[x^2] of each linear's input on this block's (quantized-model) inputs
        imps = second_moments_of_inputs(linears, lambda: [layer_forward(layer, x, kw) for x, kw in zip(inps, kws)])
    wrapped = {}
    with one_thread():  # the grid search is many small ops (see one_thread)
        for n, lin in linears.items():
            scale, zp = qparams(lin.weight.detach().float(), qc, imps.get(n))
            wrapped[n] = _RoundingLinear(lin, cfg, scale, zp)
            set_module(layer, n, wrapped[n])
    frozen = [p for p in layer.parameters() if p.requires_grad and not any(p is w.v or p is w.factor
                                                                            for w in wrapped.values())]
    for p in frozen:
        p.requires_grad_(False)
    try:
        loss_start = _block_loss(layer, inps, kws, targets)
        gen = torch.Generator().manual_seed(cfg.seed)
        order: list[int] = []
        for step in range(cfg.steps):
            if not order:
                order = torch.randperm(len(inps), generator=gen).tolist()
            i = order.pop()
            with torch.enable_grad():
                loss = F.mse_loss(layer_forward(layer, inps[i], kws[i]), targets[i])
                loss.backward()
            lr = cfg.step_lr * (1.0 - step / cfg.steps)
            for w in wrapped.values():
                w.sign_step(lr)
        loss_end = _block_loss(layer, inps, kws, targets) if cfg.steps else loss_start
        kept = loss_end < loss_start
        if not kept:
            for w in wrapped.values():
                w.reset()
            loss_end = loss_start
    finally:
        for p in frozen:
            p.requires_grad_(True)
    for n, lin in linears.items():
        set_module(layer, n, wrapped[n].quant_linear(lin, qc))
    return {"loss_start": loss_start, "loss_end": loss_end, "kept": kept}


def autoround_quantize_model(model: nn.Module, calib_batches: list[torch.Tensor],
                             cfg: AutoRoundConfig = AutoRoundConfig(), progress: bool = True,
                             stats: list | None = None) -> nn.Module:
    """Quantizes every linear of the decoder layers of ``model`` in place, block by block (:func:`autoround_block`);
    returns ``model``.

    Args:
        calib_batches: int64 token ids ``[B, L]`` (at least one batch); each optimisation step uses one of them.
        stats: if given, one ``{"loss_start", "loss_end", "kept"}`` dict per decoder layer is appended to it.
    """
    from tqdm.auto import tqdm

    if not calib_batches:
        raise ValueError("calib_batches must hold at least one [B, L] batch of token ids, got none")
    quantizable_linears(model)  # clear error for a model without linears
    layers = decoder_layers(model)
    with torch.no_grad():
        inps_q, kws = capture_layer_inputs(model, calib_batches)
    inps_f = inps_q
    stats = [] if stats is None else stats
    for li, layer in enumerate(tqdm(layers, desc="AutoRound layers", disable=not progress)):
        with torch.no_grad():
            targets = [layer_forward(layer, x, kw) for x, kw in zip(inps_f, kws)]
        for t in targets:
            check_finite(t, f"the float output of decoder layer {li}")
        st = autoround_block(layer, inps_q, kws, targets, cfg)
        log.debug("AutoRound layer %d: block MSE %.4g -> %.4g%s", li, st["loss_start"], st["loss_end"],
                  "" if st["kept"] else " (no gain: starting grid kept)")
        stats.append(st)
        with torch.no_grad():
            inps_q = [layer_forward(layer, x, kw) for x, kw in zip(inps_q, kws)]
        for o in inps_q:
            check_finite(o, f"the output of quantized decoder layer {li}")
        inps_f = targets
    return model
