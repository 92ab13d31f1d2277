"""Quantization-aware training (QAT) with fake-quantized linears and the straight-through estimator.

``prepare(model, scheme)`` swaps every linear (output head excluded) for a :class:`FakeQuantLinear`, whose forward
uses ``dequant(quant(W))`` (and, optionally, per-token int8 fake-quantized activations); rounding passes gradients
straight through (Bengio et al. 2013, arXiv:1308.3432). With ``learnable_scales`` the per-group scales are
parameters too (LSQ, Esser et al. 2019, arXiv:1902.08153). ``finetune`` runs a short training loop (distillation
from the float model by default, as in LLM-QAT, Liu et al. 2023, arXiv:2305.17888); it works under
``torch.distributed`` (DDP). ``convert(model)`` then replaces the fake-quantized linears by real quantized ones whose
outputs equal the fake-quantized forward.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..nn.linear import QuantLinear
from ._layers import pad_cols
from .rtn import INT4_G128, QuantConfig, fake_quantize, qparams, quantizable_linears, quantize_weight, \
    set_module, build_quant_linear

log = logging.getLogger("qkernels.algorithms")


@dataclass(frozen=True)
class QATScheme:
    weight: QuantConfig = INT4_G128
    act_int8_per_token: bool = False
    learnable_scales: bool = False

    def __post_init__(self):
        if self.learnable_scales and self.weight.full_range:
            # the learned scales are kept positive (clamped), which the signed full-range scale is not
            raise ValueError("learnable_scales needs a QuantConfig without full_range (its scales can be negative)")


def _round_ste(v: torch.Tensor) -> torch.Tensor:
    return v + (torch.round(v) - v).detach()


def fake_quant_act_int8(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 round trip of ``x`` (exactly :func:`qkernels.quantize_per_token_int8`), STE."""
    with torch.no_grad():
        q, s = ops.quantize_per_token_int8(x.detach())
        xq = (q.float() * s.unsqueeze(-1)).to(x.dtype)
    return x + (xq - x).detach()


class FakeQuantLinear(nn.Module):
    """``F.linear(x_fq, W_fq, bias)``; shares ``weight``/``bias`` Parameters with the linear it replaces.

    ``scale`` fp32 ``[N, G]`` is a Parameter when the scheme learns scales (initialised from the RTN scales)."""

    def __init__(self, linear: nn.Linear, scheme: QATScheme):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.scheme = scheme
        self.weight = linear.weight
        self.bias = linear.bias
        self.group_size = scheme.weight.group(self.in_features)
        if scheme.learnable_scales:
            s, z = qparams(linear.weight.detach(), scheme.weight)
            self.scale = nn.Parameter(s)
            self.register_buffer("zero_point", z)
        else:
            self.scale = None

    def _codes(self, w):
        """(codes as fp32 in the padded grouped layout [N, G, g], scale [N, G, 1], zero point or 0)."""
        qc = self.scheme.weight
        qmin, qmax = -(1 << (qc.bits - 1)), (1 << (qc.bits - 1)) - 1
        wg = pad_cols(w.float(), self.group_size).reshape(self.out_features, -1, self.group_size)
        s = self.scale.clamp(min=1e-8).unsqueeze(-1)
        z = 0.0 if self.zero_point is None else self.zero_point.float().unsqueeze(-1)
        return torch.clamp(_round_ste(wg / s) + z, qmin, qmax), s, z

    def weight_fq(self) -> torch.Tensor:
        w = self.weight
        if self.scale is None:
            with torch.no_grad():
                wq = fake_quantize(w.detach(), self.scheme.weight).to(w.dtype)
            return w + (wq - w).detach()
        q, s, z = self._codes(w)
        return (s * (q - z)).reshape(self.out_features, -1)[:, : self.in_features].to(w.dtype)

    def forward(self, x):
        if self.scheme.act_int8_per_token:
            x = fake_quant_act_int8(x)
        return F.linear(x, self.weight_fq(), self.bias)

    @torch.no_grad()
    def to_quantized(self) -> QuantLinear:
        """The real :class:`QuantLinear` (scheme: :func:`qkernels.algorithms.rtn.scheme_for`; with int8 per-token
        activations ``IntWeightInt8Act``) holding the codes the fake-quantized forward uses; its outputs equal the
        fake-quantized forward's."""
        qc = self.scheme.weight
        if self.scale is None:
            q, s, z = quantize_weight(self.weight, qc)
        else:
            qf, s3, _ = self._codes(self.weight)
            q, s, z = qf.reshape(self.out_features, -1).to(torch.int8), s3[..., 0].clamp(min=1e-8), self.zero_point
        return build_quant_linear(self, qc, q, s.float(), z, act_int8_per_token=self.scheme.act_int8_per_token)


def prepare(model: nn.Module, scheme: QATScheme = QATScheme()) -> nn.Module:
    """Swaps the linears of ``model`` (output head excluded) for fake-quantized ones, in place; returns ``model``."""
    for name, lin in quantizable_linears(model).items():
        set_module(model, name, FakeQuantLinear(lin, scheme))
    return model


def convert(model: nn.Module) -> nn.Module:
    """Replaces every :class:`FakeQuantLinear` by its real quantized linear, in place; returns ``model``."""
    model = getattr(model, "module", model)  # a DDP wrapper
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    if not found:
        raise ValueError("convert() found no FakeQuantLinear: call qkernels.qat.prepare(model, scheme) first")
    for name, m in found:
        set_module(model, name, m.to_quantized())
    return model


def finetune(model: nn.Module, windows: torch.Tensor, steps: int = 50, lr: float = 2e-5, batch_size: int = 1,
             teacher: nn.Module | None = None, progress: bool = True, seed: int = 0) -> list[float]:
    """A short fine-tune of a prepared model on token windows ``[W, L]`` (int64). With ``teacher`` (the float model)
    the loss is the KL divergence to the teacher's next-token distribution, otherwise cross-entropy on the text.
    Under an initialised ``torch.distributed`` process group the model is wrapped in DDP and each rank takes every
    world_size-th batch. Embeddings/output head are frozen. Returns the loss per step (this rank's)."""
    import torch.distributed as dist
    from tqdm.auto import tqdm

    if steps < 0 or batch_size < 1:
        raise ValueError(f"steps must be >= 0 and batch_size >= 1, got {steps}, {batch_size}")
    if windows.dim() != 2 or windows.shape[0] == 0:
        raise ValueError(f"windows must be a non-empty [W, L] tensor of token ids, got {tuple(windows.shape)}")
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    if not any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise ValueError("finetune() expects a model prepared with qkernels.qat.prepare()")
    for n, p in model.named_parameters():
        p.requires_grad_(not ("embed" in n or "lm_head" in n))
    net = nn.parallel.DistributedDataParallel(model) if ddp else model
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(windows.shape[0], generator=g)
    mine = order[rank::world] if windows.shape[0] >= world else order
    losses = []
    model.train()
    for step in tqdm(range(steps), desc="QAT", disable=not progress or rank != 0):
        idx = mine[torch.arange(step * batch_size, (step + 1) * batch_size) % mine.numel()]
        b = windows[idx]
        logits = net(input_ids=b, use_cache=False).logits[:, :-1].float()
        if teacher is not None:
            with torch.no_grad():
                t = teacher(input_ids=b, use_cache=False).logits[:, :-1].float()
            loss = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), F.log_softmax(t, -1).flatten(0, 1),
                            log_target=True, reduction="batchmean")
        else:
            loss = F.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten())
        if not torch.isfinite(loss):
            raise ValueError(f"QAT: non-finite loss at step {step} (lower the learning rate?)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return losses
