"""GPTQ: post-training weight quantization with second-order error compensation.

Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023, arXiv:2210.17323 (Algorithm 1), following the structure of the authors' reference code:

* per linear layer, ``H = 2 X X^T / n`` from the calibration inputs ``X`` ``[K, n]`` of that layer;
* dampening ``H += damp * mean(diag H) * I`` (1% by default), dead inputs (``H_kk = 0``) get ``H_kk = 1``, ``W_:,k = 0``;
* the upper Cholesky factor of ``H^-1`` drives the column-by-column quantization; errors are spread to the
  not-yet-quantized columns lazily, in blocks of 128 columns (``W[:, i2:] -= Err @ Hinv[i1:i2, i2:]``);
* act-order (``desc_act``): columns are processed by decreasing ``H_kk``; groups are then either formed in that
  order (``perm`` + ``g_idx``) or fixed beforehand on the original order (``static_groups``);
* the model is processed decoder layer by decoder layer; each layer sees inputs computed by the already
  quantized previous layers, and (``true_sequential``) its q/k/v, o, gate/up and down projections are quantized in
  execution order, each group's Hessian taken with the earlier groups already quantized.
"""

from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from .families import FAMILIES, LLAMA
from .grids import group_qparams
from ._layers import capture_layer_inputs, check_finite, decoder_layers, layer_forward, one_thread, pad_cols
from .rtn import (INT4_G128, QuantConfig, quantizable_linears, quantize_with, set_module,
                  build_quant_linear)

log = logging.getLogger("qkernels.algorithms")

# quantization order inside a Llama-style decoder layer (names relative to the layer)
LLAMA_SEQUENTIAL = [list(g) for g in LLAMA.sequential]


@dataclass(frozen=True)
class GPTQConfig:
    quant: QuantConfig = INT4_G128
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    true_sequential: bool = True

    def __post_init__(self):
        if not 0 <= self.damp_percent < 1:
            raise ValueError(f"damp_percent must be in [0, 1), got {self.damp_percent}")
        if self.block_size <= 0:
            raise ValueError(f"block_size must be positive, got {self.block_size}")


@dataclass
class GPTQResult:
    """q int8 ``[N, Kp]`` (stored column order), scale fp32 ``[N, G]``, zero_point int32 ``[N, G]`` or None,
    perm int64 ``[K]`` or None (stored column j = input column perm[j]), g_idx int32 ``[K]`` (group of each input
    column, GPTQ checkpoint convention), loss = sum of the per-column objective."""

    q: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    perm: torch.Tensor | None
    g_idx: torch.Tensor
    loss: float = 0.0
    extra: dict = field(default_factory=dict)


def _group_qparams(w: torch.Tensor, cfg: QuantConfig, importance: torch.Tensor | None = None):
    """scale/zero_point ``[N, 1]`` for the columns ``w`` ``[N, k]`` forming one group (``importance`` ``[k]``: their
    inputs' second moments, used by ``cfg.act_weighted``)."""
    s, z = group_qparams(w, cfg, importance)
    return s.unsqueeze(1), None if z is None else z.unsqueeze(1)


class Hessian:
    """Accumulates ``H = 2/n * sum x x^T`` over the rows ``x`` of a layer's inputs ``[..., K]``."""

    def __init__(self, K: int, device=None):
        self.H = torch.zeros(K, K, dtype=torch.float32, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        check_finite(x, "a GPTQ layer input")
        self.H.addmm_(x.t(), x)
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        if self.n == 0:
            raise RuntimeError("no calibration inputs reached this layer")
        return self.H * (2.0 / self.n)


def _inverse_cholesky(H: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``; raises the dampening 10x (up to 3 times) if H is not PD."""
    diag = torch.arange(H.shape[0], device=H.device)
    damp = damp_percent * torch.mean(torch.diag(H))
    for attempt in range(4):
        Hd = H.double().clone()
        Hd[diag, diag] += damp
        L, info = torch.linalg.cholesky_ex(Hd)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if info == 0:
                return U.float()
        log.warning("GPTQ: Hessian not positive definite with damp=%.3g, retrying with 10x", float(damp))
        damp = damp * 10 if damp > 0 else 1e-6 * torch.mean(torch.diag(H)).clamp(min=1e-8)
    raise RuntimeError("GPTQ: Hessian is not positive definite even with 1000x dampening")


@torch.no_grad()
def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig = GPTQConfig()) -> GPTQResult:
    """Quantizes one weight ``W`` float ``[N, K]`` given its input Hessian ``H`` fp32 ``[K, K]``."""
    if W.device.type == "cpu":
        with one_thread():
            return _gptq_quantize_weight(W, H, cfg)
    return _gptq_quantize_weight(W, H, cfg)


def prepare_hessian(W: torch.Tensor, H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked fp32 copies of ``W [N, K]`` and ``H [K, K]`` with dead inputs handled (``H_kk = 0`` -> ``H_kk = 1``,
    ``W_:,k = 0``: an input that is always zero carries no information, and its weight cannot matter)."""
    W = W.detach().float().clone()
    N, K = W.shape
    if H.shape != (K, K):
        raise ValueError(f"H must have shape [K, K] = {(K, K)}, got {tuple(H.shape)}")
    if not torch.isfinite(W).all() or not torch.isfinite(H).all():
        raise ValueError("GPTQ: NaN or inf in the weight or the Hessian")
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    return W, H


class ColumnGrid(abc.ABC):
    """The quantization grid that GPTQ's column loop rounds to (subclass it for other formats).

    ``block``: columns (in processing order) that share quantization parameters, or None when the parameters are
    fixed beforehand. The loop calls ``start(col, w)`` at every ``col % block == 0`` with the CURRENT (error-updated)
    values ``w [N, n]`` of the block's columns ``col .. col + n - 1``, then ``quantize(col, w)`` for every column
    ``w [N]``, which records the codes and returns the dequantized column ``[N]``.
    """

    block: int | None = None

    def start(self, col: int, w: torch.Tensor) -> None:
        pass

    @abc.abstractmethod
    def quantize(self, col: int, w: torch.Tensor) -> torch.Tensor:
        """Round column ``col`` (values ``w [N]``), record its codes, return the dequantized column."""


def _pending_columns(W, W1, Err1, Hinv, i1, i2, i, stop):
    """Current values of columns ``[i1 + i, stop)``: those inside the lazy block come from W1; those beyond it are
    W plus the updates the lazy block's already quantized columns will apply at its end (exact, not stale)."""
    inner = W1[:, i:min(stop, i2) - i1]
    if stop <= i2:
        return inner
    outer = W[:, i2:stop]
    if i:
        outer = outer - Err1[:, :i] @ Hinv[i1:i1 + i, i2:stop]
    return torch.cat([inner, outer], 1)


def gptq_column_loop(W: torch.Tensor, Hinv: torch.Tensor, grid: ColumnGrid, block_size: int = 128) -> float:
    """GPTQ's column-by-column quantization (arXiv:2210.17323, Algorithm 1) with lazy batch updates.

    Args:
        W: fp32 ``[N, K]`` in processing order; overwritten (its columns end up error-updated, not quantized).
        Hinv: fp32 ``[K, K]`` upper Cholesky factor of the inverse (dampened) Hessian, same column order.
        grid: rounds each column (see :class:`ColumnGrid`) and keeps the codes.
    Returns the GPTQ objective, sum over columns of ``|w - q|^2 / (2 Hinv_kk^2)``.
    """
    K = W.shape[1]
    loss = 0.0
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if grid.block is not None and col % grid.block == 0:
                grid.start(col, _pending_columns(W, W1, Err1, Hinv, i1, i2, i, min(col + grid.block, K)))
            w = W1[:, i]
            d = Hinv1[i, i]
            deq = grid.quantize(col, w)
            err = (w - deq) / d
            loss += float((err * err).sum()) / 2
            W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return loss


class _IntGroupGrid(ColumnGrid):
    """The integer grid of qkernels.ops.int_quant: groups of g columns, scale/zero point from the group's current
    values (or fixed beforehand per original column group: ``static``). ``importance`` ``[K]`` (processing order):
    the Hessian's diagonal, which weights the activation-weighted scale search (``QuantConfig.act_weighted``)."""

    def __init__(self, qc: QuantConfig, g: int, N: int, K: int, device, static=None, perm=None, importance=None):
        self.qc, self.g, self.static, self.perm, self.importance = qc, g, static, perm, importance
        self.block = None if static is not None else g
        self.Q = torch.zeros(N, K, device=device)
        self.scales, self.zeros = [], []
        self.s = self.z = None

    def start(self, col, w):
        imp = None if self.importance is None else self.importance[col:col + w.shape[1]]
        self.s, self.z = _group_qparams(w, self.qc, imp)
        self.scales.append(self.s)
        self.zeros.append(self.z)

    def quantize(self, col, w):
        if self.static is not None:
            self.s, self.z = self.static[int(self.perm[col] if self.perm is not None else col) // self.g]
        q, deq = quantize_with(w.unsqueeze(1), self.s, self.z, self.qc, self.g)
        self.Q[:, col] = q[:, 0]
        return deq[:, 0]


def _gptq_quantize_weight(W, H, cfg):
    qc = cfg.quant
    W, H = prepare_hessian(W, H)
    N, K = W.shape
    g = qc.group(K)

    # the scales' search weights each column by E[x_k^2] = H_kk / 2 (the factor does not change the argmin)
    imp = torch.diag(H).clone() if qc.act_weighted else None
    static = None
    if cfg.static_groups and qc.group_size != -1:
        static = [_group_qparams(W[:, i:i + g], qc, None if imp is None else imp[i:i + g]) for i in range(0, K, g)]
    perm = None
    if cfg.act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    Hinv = _inverse_cholesky(H, cfg.damp_percent)

    grid = _IntGroupGrid(qc, g, N, K, W.device, static, perm, None if imp is None else imp[perm] if perm is not None
                         else imp)
    loss = gptq_column_loop(W, Hinv, grid, cfg.block_size)
    Q = grid.Q

    ar = torch.arange(K, device=W.device)
    if static is not None:
        scale = torch.cat([p[0] for p in static], 1)
        zp = None if qc.symmetric else torch.cat([p[1] for p in static], 1)
        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        perm, g_idx = None, ar // g
    else:
        scale = torch.cat(grid.scales, 1)
        zp = None if qc.symmetric else torch.cat(grid.zeros, 1)
        g_idx = ar // g
        if perm is not None and qc.group_size == -1:  # one group per row: the order does not matter at run time
            Q, perm = Q[:, torch.argsort(perm)], None
        if perm is not None:
            g_idx = torch.empty_like(ar)
            g_idx[perm] = ar // g
    q = pad_cols(Q, g).to(torch.int8)
    return GPTQResult(q, scale, zp, perm, g_idx.to(torch.int32), loss)


def collect_hessians(layer: nn.Module, linears: dict[str, nn.Linear], inps: list[torch.Tensor],
                     kws: list[dict]) -> dict[str, Hessian]:
    """Runs decoder ``layer`` on its calibration inputs (``[B, L, H]`` hidden states with their keyword arguments)
    and accumulates the input Hessian of each of ``linears`` ({name: module inside layer})."""
    hess = {n: Hessian(m.in_features, m.weight.device) for n, m in linears.items()}
    shared: dict[int, tuple] = {}  # q/k/v (gate/up) read the same input: one X^T X for all of them

    def make_hook(n):
        def hook(_mod, args, _out):
            x = args[0]
            key = id(x)
            if key not in shared:
                h = Hessian(x.shape[-1], x.device)
                h.add(x)
                shared[key] = (x, h.H)
            hess[n].H += shared[key][1]
            hess[n].n += x.reshape(-1, x.shape[-1]).shape[0]
        return hook

    hooks = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
    try:
        for x, kw in zip(inps, kws):
            layer_forward(layer, x, kw)
            shared.clear()
    finally:
        for h in hooks:
            h.remove()
    return hess


def _sequential_groups(layer: nn.Module, names: list[str], true_sequential: bool) -> list[list[str]]:
    """The groups of ``names`` in execution order (the first family layout that names them all), else one group."""
    if true_sequential:
        for seq in dict.fromkeys(f.sequential for f in FAMILIES.values()):
            if all(n in names for grp in seq for n in grp):
                rest = [n for n in names if not any(n in grp for grp in seq)]
                return [list(g) for g in seq] + ([rest] if rest else [])
    return [names]


@torch.no_grad()
def gptq_quantize_model(model: nn.Module, calib_batches: list[torch.Tensor], cfg: GPTQConfig = GPTQConfig(),
                        progress: bool = True) -> nn.Module:
    """Quantizes every linear of the decoder layers of ``model`` in place with GPTQ; returns ``model``.

    Args:
        calib_batches: int64 token ids ``[B, L]`` (at least one batch).
    """
    from tqdm.auto import tqdm

    if not calib_batches:
        raise ValueError("calib_batches must hold at least one [B, L] batch of token ids, got none")
    quantizable_linears(model)  # clear error for a model without linears
    layers = decoder_layers(model)
    inps, kws = capture_layer_inputs(model, calib_batches)
    for li, layer in enumerate(tqdm(layers, desc="GPTQ layers", disable=not progress)):
        for x in inps:
            check_finite(x, f"the input of decoder layer {li}")
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        for names in _sequential_groups(layer, list(linears), cfg.true_sequential):
            hess = collect_hessians(layer, {n: linears[n] for n in names}, inps, kws)
            for n in names:
                res = gptq_quantize_weight(linears[n].weight, hess[n].value(), cfg)
                log.debug("GPTQ layer %d %s: loss %.4g", li, n, res.loss)
                set_module(layer, n, build_quant_linear(linears[n], cfg.quant, res.q, res.scale, res.zero_point,
                                                     res.perm))
        outs = [layer_forward(layer, x, kw) for x, kw in zip(inps, kws)]
        for o in outs:
            check_finite(o, f"the output of quantized decoder layer {li}")
        inps = outs
    return model


def export_gptq_tensors(res: GPTQResult, bits: int, bias: torch.Tensor | None = None,
                        v2: bool = False) -> dict[str, torch.Tensor]:
    """One layer in the published GPTQ checkpoint layout (AutoGPTQ / GPTQModel, 2/3/4/8 bits, sym or asym;
    :func:`qkernels.formats.gptq.pack_layer`):

    * ``qweight`` int32 ``[K * bits / 32, N]``: unsigned codes ``u = q + 2^(bits-1)`` packed along K as one
      little-endian bit stream per column (element ``k`` at stream bit ``bits * k``; 3-bit values cross words);
    * ``qzeros`` int32 ``[G, N * bits / 32]``: ``zero - 1`` (v1's historical off-by-one; ``v2``: ``zero``) packed
      along N;
    * ``scales`` fp16 ``[G, N]``; ``g_idx`` int32 ``[K]``: the group of each input column (original order; the last
      group is ragged when K is not a multiple of the group size).
    Dequantization: ``W[n, k] = scales[g_idx[k], n] * (u[k, n] - zero[g_idx[k], n])``.
    """
    from ..formats.gptq import pack_layer

    K = res.g_idx.numel()
    gs = int((res.g_idx == 0).sum())  # the first group is always whole (G = 1: all of K)
    return pack_layer(res.q[:, :K], res.scale, res.zero_point, bits, gs, res.perm, bias, v2)
