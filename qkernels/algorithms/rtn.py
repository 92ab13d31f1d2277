"""Round-to-nearest (RTN) weight quantization, and the quantization grid shared by GPTQ, AWQ and QAT.

The grid is the one of :mod:`qkernels.reference.int_quant` (integer zero-point domain, signed codes):
``q = clamp(round(w / s) + z, -2^(b-1), 2^(b-1) - 1)``, ``w_hat = s * (q - z)``, per group of ``group_size``
consecutive input columns; the range of every group covers 0. A last group shorter than ``group_size`` (K not a
multiple of it) is allowed and padded with zeros, which leave its range unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ._qlinear import QuantizedWeightLinear

log = logging.getLogger("qkernels.algorithms")


@dataclass(frozen=True)
class QuantConfig:
    """Weight quantization scheme: ``bits`` in 2..8, ``group_size`` (-1 = per output channel), symmetric or not."""

    bits: int = 4
    group_size: int = 128
    symmetric: bool = True

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits must be an int in [2, 8], got {self.bits!r}")
        if not isinstance(self.group_size, int) or (self.group_size <= 0 and self.group_size != -1):
            raise ValueError(f"group_size must be a positive int or -1 (per channel), got {self.group_size!r}")

    def group(self, K: int) -> int:
        return K if self.group_size == -1 else self.group_size

    @property
    def name(self) -> str:
        g = "ch" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.bits}-{g}-{'sym' if self.symmetric else 'asym'}"


INT8_WEIGHT_ONLY = QuantConfig(8, -1, True)
INT4_G128 = QuantConfig(4, 128, True)


@contextlib.contextmanager
def _one_thread():
    """For loops of many small ops on CPU (GPTQ's columns, per-layer RTN): one thread avoids an OpenMP barrier per
    op, which costs milliseconds whenever the cores are shared with other processes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _pad_cols(w: torch.Tensor, g: int) -> torch.Tensor:
    K = w.shape[-1]
    Kp = -(-K // g) * g
    return w if Kp == K else F.pad(w, (0, Kp - K))


def qparams(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 scale and int32 zero point (None if symmetric) ``[N, G]`` of ``w`` ``[N, K]`` (ragged last group ok)."""
    g = cfg.group(w.shape[-1])
    scale, zp = ops.choose_qparams_affine(_pad_cols(w.float(), g), cfg.bits, g, cfg.symmetric)
    return scale, None if cfg.symmetric else zp


def quantize_with(w, scale, zero_point, cfg: QuantConfig, group_size: int):
    """Codes (fp32 holding integers) and dequantized values of ``w`` ``[N, k]`` under per-row ``scale``/``zero_point``
    broadcastable to ``w`` (``[N, 1]`` for one column or one group). Same arithmetic as the reference op."""
    qmin, qmax = -(1 << (cfg.bits - 1)), (1 << (cfg.bits - 1)) - 1
    z = 0.0 if zero_point is None else zero_point.float()
    q = torch.clamp(torch.round(w / scale) + z, qmin, qmax)
    return q, scale * (q - z)


def fake_quantize(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """``dequant(quant(w))`` for ``w`` ``[N, K]`` in fp32 (bit-identical to the ops' round trip)."""
    K = w.shape[-1]
    g = cfg.group(K)
    scale, zp = qparams(w, cfg)
    wp = _pad_cols(w.float(), g)
    wg = wp.reshape(w.shape[0], -1, g)
    _, deq = quantize_with(wg, scale.unsqueeze(-1), None if zp is None else zp.unsqueeze(-1), cfg, g)
    return deq.reshape(wp.shape)[:, :K]


def quantize_weight(w: torch.Tensor, cfg: QuantConfig):
    """RTN: ``w`` float ``[N, K]`` -> (q int8 ``[N, Kp]``, scale fp32 ``[N, G]``, zero_point int32 ``[N, G]`` | None)."""
    if not torch.isfinite(w).all():
        raise ValueError(f"weight of shape {tuple(w.shape)} contains NaN or inf; cannot quantize")
    g = cfg.group(w.shape[-1])
    wp = _pad_cols(w.detach().float(), g)
    q, scale, zp = ops.quantize_affine(wp, cfg.bits, g, cfg.symmetric)
    return q, scale, None if cfg.symmetric else zp


def to_quantized_linear(linear: nn.Linear, cfg: QuantConfig, q=None, scale=None, zero_point=None, perm=None,
                        act_quant=None) -> QuantizedWeightLinear:
    """Builds the quantized module for ``linear`` (RTN unless codes/qparams are given)."""
    if q is None:
        q, scale, zero_point = quantize_weight(linear.weight, cfg)
    return QuantizedWeightLinear(linear.in_features, q, scale, zero_point, cfg.bits, cfg.group(linear.in_features),
                                 perm=perm, bias=linear.bias, act_quant=act_quant)


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
def rtn_quantize_model(model: nn.Module, cfg: QuantConfig = INT4_G128) -> nn.Module:
    """Replaces every quantizable linear of ``model`` (in place) by its RTN-quantized version; returns ``model``."""
    with _one_thread():
        for name, lin in quantizable_linears(model).items():
            set_module(model, name, to_quantized_linear(lin, cfg))
    return model
