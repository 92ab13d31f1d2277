"""QuantLinear: a drop-in replacement for ``nn.Linear`` holding quantized weights.

Storage (all registered buffers, so ``state_dict``/``load_state_dict``/``.to(device)`` work as for nn.Linear):

=========================================  =====================================================================
scheme                                     buffers
=========================================  =====================================================================
``Int4WeightOnly``                         ``qweight`` uint8 ``[N, K/2]`` (:func:`qkernels.pack_int4` of int8 codes
                                           in [-8, 7], element 2i in the low nibble), ``scale`` fp32 ``[N, K/g]``,
                                           ``zero_point`` int32 ``[N, K/g]`` (absent when symmetric)
``Int8WeightOnly()`` / ``Int8Dynamic()``   ``qweight`` int8 ``[N, K]``, ``scale`` fp32 ``[N]``
``Int8WeightOnly(group_size, symmetric)``  ``qweight`` int8 ``[N, K]``, ``scale`` fp32 ``[N, K/g]``,
  (grouped / asymmetric)                   ``zero_point`` int32 ``[N, K/g]`` (absent when symmetric)
any, with ``act_order=True``               ``input_perm`` int64 ``[K]``: the columns of the stored weight are the
                                           input features ``input_perm`` (GPTQ act-order), forward gathers
                                           ``x[..., input_perm]`` so every quantization group is contiguous
=========================================  =====================================================================

The weight is ``W = scale * (q - zero_point)`` per group of ``g`` consecutive stored columns, exactly
:func:`qkernels.dequantize_affine`. ``forward`` calls the public ops, so the dispatch table picks the backend for
the device the buffers are on (``extra_repr`` shows which).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import dispatch
from ..ops import (
    dequantize_affine,
    int4_weight_only_mm,
    int8_dynamic_mm,
    int8_weight_only_mm,
    pack_int4,
    quantize_affine,
    unpack_int4,
)
from .schemes import Int4WeightOnly, Int8Dynamic, Int8WeightOnly, Scheme


def _pending_error(scheme: Scheme) -> NotImplementedError:
    return NotImplementedError(
        f"QuantLinear for {scheme!r} lands with the {scheme.pending} ops (qkernels has no {scheme.pending} "
        "kernels on this branch yet)"
    )


class QuantLinear(nn.Module):
    """``y = x @ W^T + bias`` with a quantized ``W [out_features, in_features]``.

    Build one with :meth:`from_linear` (quantizes an ``nn.Linear``) or :func:`qkernels.quantize_`; the constructor
    allocates empty buffers of the right shapes (for ``load_state_dict``).

    Args:
        in_features, out_features: K and N.
        scheme: an integer scheme from :mod:`qkernels.nn.schemes`.
        bias: whether the layer has a bias (stored in ``bias_dtype``).
        act_order: the stored columns are permuted (``input_perm`` buffer), as in GPTQ ``desc_act`` checkpoints.
    """

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, bias: bool = True, *,
                 act_order: bool = False, bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if not isinstance(scheme, Scheme):
            raise TypeError(f"scheme must be a qkernels.nn scheme (e.g. Int4WeightOnly()), got {type(scheme).__name__}")
        if scheme.pending:
            raise _pending_error(scheme)
        why = scheme.check_shape(in_features, out_features)
        if why:
            raise ValueError(f"{scheme!r} cannot quantize a Linear({in_features}, {out_features}): {why}")
        self.in_features, self.out_features, self.scheme = int(in_features), int(out_features), scheme
        self.act_order = bool(act_order)
        N, K = self.out_features, self.in_features
        kw = {"device": device}
        if self.kind == "int4":
            G = K // self.group_size
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8, **kw))
            self.register_buffer("scale", torch.ones(N, G, dtype=torch.float32, **kw))
            zp = None if scheme.symmetric else torch.zeros(N, G, dtype=torch.int32, **kw)
            self.register_buffer("zero_point", zp)
        elif self.kind == "int8_grouped":
            G = K // self.group_size
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8, **kw))
            self.register_buffer("scale", torch.ones(N, G, dtype=torch.float32, **kw))
            zp = None if scheme.symmetric else torch.zeros(N, G, dtype=torch.int32, **kw)
            self.register_buffer("zero_point", zp)
        else:  # per-channel symmetric int8 (weight-only or dynamic)
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8, **kw))
            self.register_buffer("scale", torch.ones(N, dtype=torch.float32, **kw))
            self.register_buffer("zero_point", None)
        self.register_buffer("bias", torch.zeros(N, dtype=bias_dtype, **kw) if bias else None)
        self.register_buffer("input_perm", torch.arange(K, dtype=torch.int64, **kw) if act_order else None)

    # ---- layout --------------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """The storage layout: "int4", "int8" (per-channel, fused kernels) or "int8_grouped"."""
        s = self.scheme
        if isinstance(s, Int4WeightOnly):
            return "int4"
        if isinstance(s, Int8WeightOnly) and not s.fused:
            return "int8_grouped"
        return "int8"

    @property
    def group_size(self) -> int:
        g = getattr(self.scheme, "group_size", -1)
        return self.in_features if g == -1 else g

    @property
    def op(self) -> str:
        """The qkernels op the forward runs."""
        if isinstance(self.scheme, Int8Dynamic):
            return "int8_dynamic_mm"
        return {"int4": "int4_weight_only_mm", "int8": "int8_weight_only_mm", "int8_grouped": "dequantize_affine"}[
            self.kind]

    def backend(self) -> str:
        """The backend the dispatch table picks for this layer's op on the device its buffers are on."""
        try:
            return dispatch.choose(self.op, self.qweight.device).backend
        except (RuntimeError, ValueError) as e:  # e.g. a forced backend that cannot run here
            return f"unavailable ({e})"

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme) -> "QuantLinear":
        """Quantize ``linear`` (round to nearest with :func:`qkernels.quantize_affine`) on its own device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if not isinstance(scheme, Scheme):
            raise TypeError(f"scheme must be a qkernels.nn scheme (e.g. Int4WeightOnly()), got {type(scheme).__name__}")
        if scheme.pending:
            raise _pending_error(scheme)
        w = linear.weight.detach()
        if w.device.type == "meta":
            raise ValueError("linear.weight is on the meta device; materialize the model before quantizing")
        bias = linear.bias
        mod = cls(linear.in_features, linear.out_features, scheme, bias is not None,
                  bias_dtype=bias.dtype if bias is not None else torch.float32, device=w.device)
        if mod.kind == "int4":
            q, s, zp = quantize_affine(w, 4, mod.group_size, scheme.symmetric)
            mod.set_quantized(q, s, None if scheme.symmetric else zp)
        elif mod.kind == "int8_grouped":
            q, s, zp = quantize_affine(w, 8, mod.group_size, scheme.symmetric)
            mod.set_quantized(q, s, None if scheme.symmetric else zp)
        else:
            q, s, _ = quantize_affine(w, 8, -1, True)
            mod.set_quantized(q, s.reshape(-1), None)
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod

    @classmethod
    def from_codes(cls, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, scheme: Scheme,
                   bias: torch.Tensor | None = None, input_perm: torch.Tensor | None = None) -> "QuantLinear":
        """Build from integer codes (the checkpoint converters in :mod:`qkernels.formats` end here).

        Args:
            q: int8 ``[N, K]`` signed codes (in [-8, 7] for int4 schemes), columns in stored order.
            scale: float ``[N, K/g]`` (``[N]`` accepted for per-channel); zero_point: int32 like scale, or None.
            input_perm: int64 ``[K]`` or None: stored column j holds input feature ``input_perm[j]``.
        """
        if q.dim() != 2 or q.dtype != torch.int8:
            raise ValueError(f"q must be int8 [N, K], got {q.dtype} {tuple(q.shape)}")
        N, K = q.shape
        mod = cls(K, N, scheme, bias is not None, act_order=input_perm is not None,
                  bias_dtype=bias.dtype if bias is not None else torch.float32, device=q.device)
        mod.set_quantized(q, scale, zero_point)
        if bias is not None:
            if tuple(bias.shape) != (N,):
                raise ValueError(f"bias must have shape [N] = [{N}], got {tuple(bias.shape)}")
            mod.bias.copy_(bias)
        if input_perm is not None:
            perm = input_perm.to(torch.int64)
            ok = tuple(perm.shape) == (K,) and torch.equal(torch.sort(perm).values, torch.arange(K, device=perm.device))
            if not ok:
                raise ValueError(f"input_perm must be a permutation of range({K}), got shape {tuple(perm.shape)}")
            mod.input_perm.copy_(perm)
        return mod

    @torch.no_grad()
    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None):
        """Fill the buffers from int8 codes ``q [N, K]``, ``scale`` and ``zero_point`` (shapes checked)."""
        N, K = self.out_features, self.in_features
        if tuple(q.shape) != (N, K) or q.dtype != torch.int8:
            raise ValueError(f"q must be int8 of shape {(N, K)}, got {q.dtype} {tuple(q.shape)}")
        if self.kind == "int4":
            lo, hi = int(q.min()), int(q.max())
            if lo < -8 or hi > 7:
                raise ValueError(f"int4 codes must be in [-8, 7], got [{lo}, {hi}]")
            self.qweight.copy_(pack_int4(q))
        else:
            self.qweight.copy_(q)
        sshape = tuple(self.scale.shape)
        if self.kind == "int8" and scale.dim() == 2 and scale.shape[1] == 1:
            scale = scale.reshape(-1)
        if tuple(scale.shape) != sshape:
            raise ValueError(f"scale must have shape {sshape} for {self.scheme!r} on K={K}, got {tuple(scale.shape)}")
        self.scale.copy_(scale.float())
        if (zero_point is None) != (self.zero_point is None):
            raise ValueError(f"zero_point must be {'None' if self.zero_point is None else 'given'} for {self.scheme!r}")
        if zero_point is not None:
            if tuple(zero_point.shape) != sshape:
                raise ValueError(f"zero_point must have shape {sshape}, got {tuple(zero_point.shape)}")
            self.zero_point.copy_(zero_point.to(torch.int32))

    # ---- compute -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        kind = self.kind
        if kind == "int4":
            out = int4_weight_only_mm(x, self.qweight, self.scale, self.zero_point, self.group_size)
        elif kind == "int8_grouped":
            w = dequantize_affine(self.qweight, self.scale, self.zero_point, self.group_size, out_dtype=x.dtype)
            out = F.linear(x, w)
        elif isinstance(self.scheme, Int8Dynamic):
            out = int8_dynamic_mm(x, self.qweight, self.scale)
        else:
            out = int8_weight_only_mm(x, self.qweight, self.scale)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The int8 codes ``[N, K]`` in stored column order."""
        return unpack_int4(self.qweight) if self.kind == "int4" else self.qweight

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out_features, in_features]`` in the input feature order (``input_perm`` undone)."""
        scale = self.scale if self.scale.dim() == 2 else self.scale.reshape(-1, 1)
        zp = self.zero_point
        w = dequantize_affine(self.codes(), scale, zp, self.group_size, out_dtype=dtype)
        if self.input_perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.input_perm, w)
        return w

    # ---- tensor parallelism --------------------------------------------------------------------------------
    @torch.no_grad()
    def shard(self, rank: int, world_size: int, dim: int) -> "QuantLinear":
        """This rank's shard for tensor parallelism.

        ``dim=0`` (column parallel): rows ``N/world_size`` of the weight and bias; gather the outputs along the last
        dim. ``dim=1`` (row parallel): columns ``K/world_size`` (a whole number of quantization groups); each rank
        takes its slice of x, the partial outputs are summed (all-reduce) and only rank 0 keeps the bias.
        W8A8 (Int8Dynamic) row shards quantize their own slice of x, so their sum differs from the unsharded layer
        by the activation rounding. Act-order layers can be column-sharded only.
        """
        for name, v in (("rank", rank), ("world_size", world_size), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {v!r}")
        if world_size <= 0 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) with world_size > 0, got rank={rank}, "
                             f"world_size={world_size}")
        if dim not in (0, 1):
            raise ValueError(f"dim must be 0 (column parallel, split out_features) or 1 (row parallel, split "
                             f"in_features), got {dim}")
        N, K = self.out_features, self.in_features
        q, scale, zp = self.codes(), self.scale, self.zero_point
        if dim == 0:
            if N % world_size:
                raise ValueError(f"out_features={N} must be divisible by world_size={world_size}")
            n = N // world_size
            rows = slice(rank * n, (rank + 1) * n)
            bias = None if self.bias is None else self.bias[rows]
            return QuantLinear.from_codes(q[rows].contiguous(), scale[rows].contiguous(),
                                          None if zp is None else zp[rows].contiguous(), self.scheme,
                                          bias, self.input_perm)
        if self.input_perm is not None:
            raise NotImplementedError("row-parallel sharding of an act-order (input_perm) layer is not supported: "
                                      "its groups are not contiguous in the input features; shard dim=0 instead")
        if K % world_size:
            raise ValueError(f"in_features={K} must be divisible by world_size={world_size}")
        k = K // world_size
        g = self.group_size
        scheme = self.scheme
        if self.scale.dim() == 2 and g != K:
            if k % g:
                raise ValueError(f"row shards of {k} input features must hold whole groups of {g}")
            gs = slice(rank * k // g, (rank + 1) * k // g)
            scale, zp = scale[:, gs].contiguous(), None if zp is None else zp[:, gs].contiguous()
        elif self.scale.dim() == 2:  # one group per row: each shard keeps the row's scale, as its own group
            scheme = type(scheme)(**{**scheme.__dict__, "group_size": -1})
        cols = slice(rank * k, (rank + 1) * k)
        bias = self.bias if (self.bias is not None and rank == 0) else None
        return QuantLinear.from_codes(q[:, cols].contiguous(), scale, zp, scheme, bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme!r}{', act_order=True' if self.act_order else ''}, op={self.op}, "
                f"backend={self.backend()}")
