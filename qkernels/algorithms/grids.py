"""How each weight group's scale (and zero point) is chosen: min-max, full signed range, MSE clipping search.

All grids are the integer grid of :mod:`qkernels.reference.int_quant`: ``q = clamp(round(w / s) + z, qmin, qmax)``,
``w_hat = s * (q - z)`` with ``qmin, qmax = -2^(b-1), 2^(b-1) - 1``. They differ only in ``s`` and ``z``:

* min-max (default): symmetric ``s = amax / qmax`` (the code ``qmin`` is never used), asymmetric
  ``s = (max - min) / (qmax - qmin)``, ``z = qmin - round(min / s)`` (exactly ``qkernels.choose_qparams_affine``);
* ``full_range`` (symmetric): ``s = x / qmin`` where ``x`` is the group's value of largest magnitude, so ``x`` lands
  on ``qmin`` and the other side reaches ``qmax``: all ``2^b`` levels are used. ``s`` is negative when ``x`` is
  positive. This is llama.cpp's Q4_0 (``d = max / -8``, ggml-quants.c ``quantize_row_q4_0_ref``);
* ``mse``: the range is shrunk by ``p`` on a grid from 1 down to ``1 - mse_max_shrink``; each candidate's codes are
  tried as is and (symmetric) with its scale refitted by least squares for its codes (``s = <w, q> / <q, q>``, as
  llama.cpp's ``make_qx_quants`` does), and the candidate with the smallest squared error per group wins (the
  first candidate is the min-max grid itself, so the error is never larger) (GPTQModel's ``mse``
  option; Frantar et al.'s GPTQ code ``Quantizer.find_params(mse=True)``).
"""

from __future__ import annotations

import torch

from .. import ops


def _int_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _round_trip(w: torch.Tensor, s: torch.Tensor, z, qmin: int, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.clamp(torch.round(w / s) + z, qmin, qmax)
    return q, s * (q - z)


def _minmax(wg: torch.Tensor, bits: int, symmetric: bool, full_range: bool, shrink):
    """scale/zero point ``[R, 1]`` for the rows ``wg`` ``[R, g]``, their range multiplied by ``shrink`` ``[R, 1]``."""
    qmin, qmax = _int_range(bits)
    if full_range:
        idx = wg.abs().argmax(-1, keepdim=True)
        x = wg.gather(-1, idx) * shrink
        s = x / qmin
        return torch.where(s != 0, s, torch.ones_like(s)), None
    lo = wg.amin(-1, keepdim=True).clamp(max=0) * shrink
    hi = wg.amax(-1, keepdim=True).clamp(min=0) * shrink
    if symmetric:
        s = torch.maximum(-lo, hi) / qmax
        return torch.where(s > 0, s, torch.ones_like(s)), None
    s = (hi - lo) / (qmax - qmin)
    s = torch.where(s > 0, s, torch.ones_like(s))
    return s, torch.clamp(qmin - torch.round(lo / s), qmin, qmax)


@torch.no_grad()
def group_qparams(wg: torch.Tensor, cfg) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 scale ``[R]`` and int32 zero point ``[R]`` (None if symmetric) of the groups ``wg`` float ``[R, g]``
    under :class:`qkernels.algorithms.QuantConfig` ``cfg`` (fields ``bits``, ``symmetric``, ``full_range``,
    ``mse``, ``mse_grid``, ``mse_max_shrink``)."""
    wg = wg.float()
    if not cfg.full_range and not cfg.mse:  # the ops' own choice, bit for bit
        s, z = ops.choose_qparams_affine(wg.contiguous(), cfg.bits, wg.shape[-1], cfg.symmetric)
        return s.reshape(-1), None if cfg.symmetric else z.reshape(-1)
    qmin, qmax = _int_range(cfg.bits)
    one = torch.ones(wg.shape[0], 1, device=wg.device)
    best_s, best_z = _minmax(wg, cfg.bits, cfg.symmetric, cfg.full_range, one)
    if cfg.mse:
        best_err = torch.full_like(one, float("inf"))
        for i in range(cfg.mse_grid):
            p = 1.0 - cfg.mse_max_shrink * i / cfg.mse_grid
            s, z = _minmax(wg, cfg.bits, cfg.symmetric, cfg.full_range, one * p)
            cands = [s]
            if z is None:  # also the least-squares scale for these codes (then re-rounded: the codes may move)
                q, _ = _round_trip(wg, s, 0.0, qmin, qmax)
                qq = (q * q).sum(-1, keepdim=True)
                ls = (wg * q).sum(-1, keepdim=True) / qq.clamp(min=1)
                cands.append(torch.where((qq > 0) & (ls != 0), ls, s))
            for c in cands:
                _, deq = _round_trip(wg, c, 0.0 if z is None else z, qmin, qmax)
                err = (wg - deq).pow(2).sum(-1, keepdim=True)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_s = torch.where(better, c, best_s)
                if z is not None:
                    best_z = torch.where(better, z, best_z)
    z = None if best_z is None else best_z.reshape(-1).to(torch.int32)
    return best_s.reshape(-1), z
