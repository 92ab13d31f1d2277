"""How each weight group's scale (and zero point) is chosen: min-max, full signed range, MSE clipping search
(unweighted or weighted by the inputs' second moments).

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
  option; Frantar et al.'s GPTQ code ``Quantizer.find_params(mse=True)``);
* ``act_weighted`` (with ``mse``): the same search, but each weight's squared error counts with the importance
  ``E[x_k^2]`` of its input channel ``k`` (llama.cpp's ``--imatrix``: ``make_qx_quants`` with ``quant_weights``):
  ``sum_k E[x_k^2] (w_k - w_hat_k)^2`` is the expected squared output error of one output row when the
  quantization errors of different inputs are uncorrelated, i.e. the diagonal of GPTQ's objective
  ``(w - w_hat)^T H (w - w_hat)``. The least-squares refit is weighted too, and asymmetric candidates also get the
  weighted least-squares fit of ``w ~ s q + m`` for their codes (then ``z = round(-m / s)``, as llama.cpp's
  ``make_qkx2_quants`` refits its min); a candidate is kept only if it lowers the weighted error.
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


def _weighted_affine_fit(wg, q, imp, qmin, qmax):
    """Weighted least-squares ``w ~ s q + m`` for fixed codes ``q`` ``[R, g]`` (weights ``imp``), as ``(s, z)`` of
    the integer zero-point grid (``z = round(-m / s)`` clamped to the code range), and the mask ``ok`` ``[R, 1]`` of
    the rows where the fit is usable (False: all codes equal, no weight, or a non-positive slope)."""
    sw, sq, sw_ = imp.sum(-1, keepdim=True), (imp * q).sum(-1, keepdim=True), (imp * wg).sum(-1, keepdim=True)
    sqq, sqw = (imp * q * q).sum(-1, keepdim=True), (imp * q * wg).sum(-1, keepdim=True)
    det = sw * sqq - sq * sq
    ok = det > 1e-12 * (sw * sqq).clamp(min=1e-30)
    s = (sw * sqw - sq * sw_) / torch.where(ok, det, torch.ones_like(det))
    m = (sqq * sw_ - sq * sqw) / torch.where(ok, det, torch.ones_like(det))
    ok = ok & (s > 0)
    s = torch.where(ok, s, torch.ones_like(s))
    return s, torch.clamp(torch.round(-m / s), qmin, qmax), ok


@torch.no_grad()
def group_qparams(wg: torch.Tensor, cfg, importance: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 scale ``[R]`` and int32 zero point ``[R]`` (None if symmetric) of the groups ``wg`` float ``[R, g]``
    under :class:`qkernels.algorithms.QuantConfig` ``cfg`` (fields ``bits``, ``symmetric``, ``full_range``,
    ``mse``, ``act_weighted``, ``mse_grid``, ``mse_max_shrink``).

    ``importance``: float ``[g]`` or ``[R, g]``, non-negative, the second moment ``E[x_k^2]`` of each column's input
    (required by ``cfg.act_weighted``, ignored otherwise)."""
    wg = wg.float()
    if not cfg.full_range and not cfg.mse:  # the ops' own choice, bit for bit
        s, z = ops.choose_qparams_affine(wg.contiguous(), cfg.bits, wg.shape[-1], cfg.symmetric)
        return s.reshape(-1), None if cfg.symmetric else z.reshape(-1)
    imp = _importance(wg, cfg, importance)
    qmin, qmax = _int_range(cfg.bits)
    one = torch.ones(wg.shape[0], 1, device=wg.device)
    best_s, best_z = _minmax(wg, cfg.bits, cfg.symmetric, cfg.full_range, one)
    if cfg.mse:
        best_err = torch.full_like(one, float("inf"))
        for i in range(cfg.mse_grid):
            p = 1.0 - cfg.mse_max_shrink * i / cfg.mse_grid
            s, z = _minmax(wg, cfg.bits, cfg.symmetric, cfg.full_range, one * p)
            cands = [(s, z)]
            if z is None:  # also the least-squares scale for these codes (then re-rounded: the codes may move)
                q, _ = _round_trip(wg, s, 0.0, qmin, qmax)
                qq = (imp * q * q).sum(-1, keepdim=True)
                ls = (imp * wg * q).sum(-1, keepdim=True) / qq.clamp(min=1e-30)
                cands.append((torch.where((qq > 0) & (ls != 0), ls, s), None))
            elif imp is not _UNIT:  # weighted search: also the weighted affine fit of these codes
                q, _ = _round_trip(wg, s, z, qmin, qmax)
                fs, fz, ok = _weighted_affine_fit(wg, q - qmin, imp, 0, qmax - qmin)
                cands.append((torch.where(ok, fs, s), torch.where(ok, fz + qmin, z)))
            for c, cz in cands:
                _, deq = _round_trip(wg, c, 0.0 if cz is None else cz, qmin, qmax)
                err = (imp * (wg - deq).pow(2)).sum(-1, keepdim=True)
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_s = torch.where(better, c, best_s)
                if cz is not None:
                    best_z = torch.where(better, cz, best_z)
    z = None if best_z is None else best_z.reshape(-1).to(torch.int32)
    return best_s.reshape(-1), z


_UNIT = 1.0  # the unweighted search's "importance" (a sentinel: no weighted affine refit)


def _importance(wg: torch.Tensor, cfg, importance):
    if not getattr(cfg, "act_weighted", False):
        return _UNIT
    if importance is None:
        raise ValueError("QuantConfig(act_weighted=True) needs the inputs' second moments: pass importance "
                         "(float [K], E[x_k^2] per input channel; rtn_quantize_model takes calib_batches for it)")
    imp = importance.to(device=wg.device, dtype=torch.float32)
    if imp.shape not in (wg.shape[-1:], wg.shape):
        raise ValueError(f"importance must have shape [{wg.shape[-1]}] or {list(wg.shape)} (one value per weight "
                         f"column of the group), got {list(imp.shape)}")
    if not torch.isfinite(imp).all() or (imp < 0).any():
        raise ValueError("importance must be finite and non-negative (second moments E[x^2] of the inputs)")
    return imp
