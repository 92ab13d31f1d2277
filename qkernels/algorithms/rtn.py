"""Round-to-nearest (RTN) weight quantization, and the quantization grid shared by GPTQ, AWQ and QAT.

The grid is the one of :mod:`qkernels.reference.int_quant` (integer zero-point domain, signed codes):
``q = clamp(round(w / s) + z, -2^(b-1), 2^(b-1) - 1)``, ``w_hat = s * (q - z)``, per group of ``group_size``
consecutive input columns; the range of every group covers 0. A last group shorter than ``group_size`` (K not a
multiple of it) is allowed and padded with zeros, which leave its range unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from .. import ops
from ._layers import one_thread, pad_cols
from .grids import group_qparams
from ..nn.linear import QuantLinear
from ..nn.schemes import Int4WeightOnly, Int8WeightOnly, IntWeightInt8Act, Scheme

log = logging.getLogger("qkernels.algorithms")


@dataclass(frozen=True)
class QuantConfig:
    """Weight quantization scheme: ``bits`` in 2..8, ``group_size`` (-1 = per output channel), symmetric or not,
    and how each group's scale is chosen (:mod:`qkernels.algorithms.grids`):

    * ``full_range`` (symmetric only): ``s = x / -2^(b-1)`` with ``x`` the group's value of largest magnitude (the
      scale carries its sign), so all ``2^b`` levels are used, as llama.cpp's Q4_0; default: ``s = amax / (2^(b-1)-1)``;
    * ``mse``: the group's range shrunk by the factor (on ``mse_grid`` steps from 1 to ``1 - mse_max_shrink``) whose
      codes, with a least-squares scale (symmetric), give the smallest squared weight error;
    * ``act_weighted`` (with ``mse``): that search weighted by the inputs' second moments ``E[x_k^2]`` (llama.cpp's
      importance matrix): RTN collects them from calibration batches, GPTQ takes its Hessian's diagonal.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True
    full_range: bool = False
    mse: bool = False
    act_weighted: bool = False
    mse_grid: int = 40
    mse_max_shrink: float = 0.5

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in [2, 8], got {self.bits!r}")
        if not isinstance(self.group_size, int) or (self.group_size <= 0 and self.group_size != -1):
            raise ValueError(f"group_size must be a positive int or -1 (per channel), got {self.group_size!r}")
        if self.full_range and not self.symmetric:
            raise ValueError("full_range applies to the symmetric grid (an asymmetric grid already uses every "
                             "level); got full_range=True with symmetric=False")
        if self.act_weighted and not self.mse:
            raise ValueError("act_weighted weights the MSE search of the scales: it needs mse=True")
        if isinstance(self.mse_grid, bool) or not isinstance(self.mse_grid, int) or self.mse_grid < 1:
            raise ValueError(f"mse_grid must be a positive int, got {self.mse_grid!r}")
        if not 0 <= self.mse_max_shrink < 1:
            raise ValueError(f"mse_max_shrink must be in [0, 1), got {self.mse_max_shrink!r}")

    def group(self, K: int) -> int:
        return K if self.group_size == -1 else self.group_size

    @property
    def name(self) -> str:
        g = "ch" if self.group_size == -1 else f"g{self.group_size}"
        grid = ("-full" if self.full_range else "") + ("-wmse" if self.act_weighted else "-mse" if self.mse else "")
        return f"int{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}{grid}"


INT8_WEIGHT_ONLY = QuantConfig(8, -1, True)
INT4_G128 = QuantConfig(4, 128, True)


def qparams(w: torch.Tensor, cfg: QuantConfig, importance: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 scale and int32 zero point (None if symmetric) ``[N, G]`` of ``w`` ``[N, K]`` (ragged last group ok).
    ``importance``: float ``[K]``, ``E[x_k^2]`` of each input (needed by ``cfg.act_weighted``)."""
    g = cfg.group(w.shape[-1])
    wp = pad_cols(w.float(), g)
    imp = None
    if cfg.act_weighted and importance is not None:
        if importance.shape != w.shape[-1:]:
            raise ValueError(f"importance must have shape [K] = [{w.shape[-1]}], got {list(importance.shape)}")
        # the padding columns of a ragged group are zeros: any importance leaves their error at 0
        imp = pad_cols(importance.float().reshape(1, -1), g).expand(w.shape[0], -1).reshape(-1, g)
    scale, zp = group_qparams(wp.reshape(-1, g), cfg, imp)
    N = w.shape[0]
    return scale.reshape(N, -1), None if zp is None else zp.reshape(N, -1)


def quantize_with(w, scale, zero_point, cfg: QuantConfig, group_size: int):
    """Codes (fp32 holding integers) and dequantized values of ``w`` ``[N, k]`` under per-row ``scale``/``zero_point``
    broadcastable to ``w`` (``[N, 1]`` for one column or one group). Same arithmetic as the reference op."""
    qmin, qmax = -(1 << (cfg.bits - 1)), (1 << (cfg.bits - 1)) - 1
    z = 0.0 if zero_point is None else zero_point.float()
    q = torch.clamp(torch.round(w / scale) + z, qmin, qmax)
    return q, scale * (q - z)


def fake_quantize(w: torch.Tensor, cfg: QuantConfig, importance: torch.Tensor | None = None) -> torch.Tensor:
    """``dequant(quant(w))`` for ``w`` ``[N, K]`` in fp32 (bit-identical to the ops' round trip); ``importance``
    float ``[K]`` as in :func:`qparams`."""
    K = w.shape[-1]
    g = cfg.group(K)
    scale, zp = qparams(w, cfg, importance)
    wp = pad_cols(w.float(), g)
    wg = wp.reshape(w.shape[0], -1, g)
    _, deq = quantize_with(wg, scale.unsqueeze(-1), None if zp is None else zp.unsqueeze(-1), cfg, g)
    return deq.reshape(wp.shape)[:, :K]


def quantize_weight(w: torch.Tensor, cfg: QuantConfig, importance: torch.Tensor | None = None):
    """RTN: ``w`` float ``[N, K]`` -> (q int8 ``[N, Kp]``, scale fp32 ``[N, G]``, zero_point int32 ``[N, G]`` | None);
    ``importance`` float ``[K]`` as in :func:`qparams`."""
    if not torch.isfinite(w).all():
        raise ValueError(f"weight of shape {tuple(w.shape)} contains NaN or inf; cannot quantize")
    g = cfg.group(w.shape[-1])
    wp = pad_cols(w.detach().float(), g)
    if not cfg.full_range and not cfg.mse:
        q, scale, zp = ops.quantize_affine(wp, cfg.bits, g, cfg.symmetric)
        return q, scale, None if cfg.symmetric else zp
    scale, zp = qparams(w.detach().float(), cfg, importance)
    N = wp.shape[0]
    q, _ = quantize_with(wp.reshape(N, -1, g), scale.unsqueeze(-1), None if zp is None else zp.unsqueeze(-1), cfg, g)
    return q.reshape(N, -1).to(torch.int8), scale, zp


def scheme_for(cfg: QuantConfig, in_features: int, act_int8_per_token: bool = False) -> Scheme:
    """The :mod:`qkernels.nn` scheme that holds ``cfg``'s codes exactly (K = ``in_features``):

    ========================================  ==========================================================
    weights (``cfg``)                         scheme
    ========================================  ==========================================================
    2..4 bits                                 ``Int4WeightOnly(group_size, symmetric, bits)`` (nibbles)
    8 bits per channel, symmetric             ``Int8WeightOnly()`` (fused W8A16 kernel)
    5..8 bits otherwise                       ``Int8WeightOnly(group_size, symmetric)`` (int8 codes)
    any + int8 per-token activations (QAT)    ``IntWeightInt8Act(bits, group_size, symmetric)``
    ========================================  ==========================================================

    QAT's W8A8 (8-bit per-channel symmetric weights) is not mapped to ``Int8Dynamic``: its int8 x int8 kernel sums
    exactly in int32 where the fake-quantized forward sums in float, and the tiny differences flip some activation
    roundings in later layers (measured on a tiny Llama: logits rel. diff 2e-4); ``IntWeightInt8Act`` reproduces the
    fake-quantized forward exactly. A converted W8A8 layer can be rebuilt as ``Int8Dynamic`` from its codes
    (``QuantLinear.from_codes(layer.codes(), layer.scale[:, 0], None, Int8Dynamic(), ...)``) for the int8 kernel.

    A 2..4-bit layer whose padded width is odd (odd K, one group per row) cannot be nibble-packed and keeps its codes
    in int8 storage (``Int8WeightOnly`` / ``IntWeightInt8Act(bits=8)``): same values, twice the bytes.
    """
    g, sym, bits = cfg.group_size, cfg.symmetric, cfg.bits
    if act_int8_per_token:
        s = IntWeightInt8Act(bits, g, sym)
        return s if s.check_shape(in_features, 1) is None else IntWeightInt8Act(8, g, sym)
    if bits <= 4:
        s = Int4WeightOnly(g, sym, bits)
        if s.check_shape(in_features, 1) is None:
            return s
    return Int8WeightOnly() if (g == -1 and sym) else Int8WeightOnly(g, sym)


def build_quant_linear(linear: nn.Linear, cfg: QuantConfig, q=None, scale=None, zero_point=None, perm=None,
                    act_int8_per_token: bool = False, importance: torch.Tensor | None = None) -> QuantLinear:
    """The :class:`qkernels.nn.QuantLinear` for ``linear`` (RTN unless codes/qparams are given).

    Args:
        q: int8 ``[N, K]`` or ``[N, Kp]`` codes (stored column order; columns past K, the padding of a ragged last
            group, are ignored); scale fp32 ``[N, G]``; zero_point int32 ``[N, G]`` or None; perm int64 ``[K]`` or
            None (stored column j is input feature ``perm[j]``, GPTQ act-order).
        importance: float ``[K]`` input second moments for RTN with ``cfg.act_weighted``.
    """
    if q is None:
        q, scale, zero_point = quantize_weight(linear.weight, cfg, importance)
    K = linear.in_features
    scheme = scheme_for(cfg, K, act_int8_per_token)
    if isinstance(scheme, Int8WeightOnly) and scheme.fused:  # scale [N]
        scale = scale.reshape(-1)
    bias = None if linear.bias is None else linear.bias.detach()
    return QuantLinear.from_codes(q[:, :K].contiguous(), scale, zero_point, scheme, bias, perm)


def quantizable_linears(model: nn.Module, skip=("lm_head",)) -> dict[str, nn.Linear]:
    """All ``nn.Linear`` submodules by qualified name, except the output head (tied to the embedding in most LLMs
    and kept in float, as GPTQ/AWQ do)."""
    found = {n: m for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not any(n == s or n.endswith("." + s) for s in skip)}
    if not found:
        raise ValueError(f"model {type(model).__name__} has no nn.Linear layers to quantize "
                         f"(besides {list(skip)}); nothing to do")
    return found


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def input_second_moments(model: nn.Module, linears: dict[str, nn.Linear], calib_batches: list[torch.Tensor]
                         ) -> dict[str, torch.Tensor]:
    """``E[x_k^2]`` float ``[K]`` of the inputs of each of ``linears`` over the tokens of ``calib_batches`` (int64
    ``[B, L]`` token ids) run through the float ``model`` (llama.cpp's importance matrix)."""
    if not calib_batches:
        raise ValueError("calib_batches must hold at least one [B, L] batch of token ids, got none")

    def run():
        for ids in calib_batches:
            model(input_ids=ids, use_cache=False)

    return second_moments_of_inputs(linears, run)


@torch.no_grad()
def second_moments_of_inputs(linears: dict[str, nn.Linear], run) -> dict[str, torch.Tensor]:
    """``E[x_k^2]`` float ``[K]`` of the inputs each of ``linears`` sees while ``run()`` executes forwards."""
    sums = {n: torch.zeros(m.in_features, device=m.weight.device) for n, m in linears.items()}
    count = dict.fromkeys(linears, 0)

    def make_hook(n):
        def hook(_mod, args, _out):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[n] += x.pow(2).sum(0)
            count[n] += x.shape[0]
        return hook

    hooks = [m.register_forward_hook(make_hook(n)) for n, m in linears.items()]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n, c in count.items() if c == 0]
    if missing:
        raise RuntimeError(f"no calibration input reached the linears {missing[:4]}")
    return {n: sums[n] / count[n] for n in linears}


@torch.no_grad()
def rtn_quantize_model(model: nn.Module, cfg: QuantConfig = INT4_G128,
                       calib_batches: list[torch.Tensor] | None = None) -> nn.Module:
    """Replaces every quantizable linear of ``model`` (in place) by its RTN-quantized :class:`QuantLinear` (scheme:
    :func:`scheme_for`); returns ``model``. ``cfg.act_weighted`` needs ``calib_batches`` (int64 ``[B, L]`` token
    ids): the inputs' second moments are taken on the float model before any layer is replaced."""
    linears = quantizable_linears(model)
    imps = {}
    if cfg.act_weighted:
        if calib_batches is None:
            raise ValueError("QuantConfig(act_weighted=True) needs calib_batches (int64 [B, L] token ids) to "
                             "measure the inputs' second moments")
        imps = input_second_moments(model, linears, calib_batches)
    with one_thread():
        for name, lin in linears.items():
            set_module(model, name, build_quant_linear(lin, cfg, importance=imps.get(name)))
    return model
