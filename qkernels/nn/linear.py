"""QuantLinear: a drop-in replacement for ``nn.Linear`` holding quantized weights.

Storage (all registered buffers, so ``state_dict``/``load_state_dict``/``.to(device)`` work as for nn.Linear):

=========================================  =====================================================================
scheme                                     buffers
=========================================  =====================================================================
``Int4WeightOnly``                         ``qweight`` uint8 ``[N, Kp/2]`` (:func:`qkernels.pack_int4` of int8 codes
  (``IntWeightInt8Act``, bits <= 4)        in [-2^(bits-1), 2^(bits-1)-1], element 2i in the low nibble),
                                           ``scale`` fp32 ``[N, G]``, ``zero_point`` int32 ``[N, G]`` (absent when
                                           symmetric)
``Int8WeightOnly()`` / ``Int8Dynamic()``   ``qweight`` int8 ``[N, K]``, ``scale`` fp32 ``[N]``
``Int8WeightOnly(group_size, symmetric)``  ``qweight`` int8 ``[N, Kp]``, ``scale`` fp32 ``[N, G]``,
  (grouped / asymmetric; also             ``zero_point`` int32 ``[N, G]`` (absent when symmetric)
  ``IntWeightInt8Act``, bits > 4)
``Fp8WeightOnly()`` /                      ``qweight`` uint8 ``[N, K]`` (the bits of float8_e4m3fn codes), ``scale``
  ``Fp8Dynamic("row")``                    fp32 ``[N, 1]`` (per output channel)
``Fp8Dynamic("tensor")``                   ``qweight`` as above, ``scale`` fp32 ``[]`` (one per tensor)
``Fp8Dynamic("block")``                    ``qweight`` as above, ``scale`` fp32 ``[N/128, K/128]`` (128x128 blocks)
``Fp4("mxfp4")``                           ``qweight`` uint8 ``[N, K/2]`` (e2m1 codes, element 2i in the low nibble),
                                           ``scale`` uint8 ``[N, K/32]`` (the bits of float8_e8m0fnu block scales)
``Fp4("nvfp4")``                           ``qweight`` as above, ``scale`` uint8 ``[N, K/16]`` (the bits of
                                           float8_e4m3fn block scales), ``global_scale`` fp32 ``[]``
                                           (``Fp4(..., weight_only=True)``: the same buffers)
any, with ``act_order=True``               ``input_perm`` int64 ``[K]``: the columns of the stored weight are the
                                           input features ``input_perm`` (GPTQ act-order), forward gathers
                                           ``x[..., input_perm]`` so every quantization group is contiguous
=========================================  =====================================================================

Integer schemes: the weight is ``W = scale * (q - zero_point)`` per group of ``g`` consecutive stored columns, exactly
:func:`qkernels.dequantize_affine`. ``G = ceil(K / g)`` groups and ``Kp = G * g`` stored columns: when K is not a
multiple of ``g`` (e.g. K=576, g=128 in SmolLM2-135M) the last group is ragged, it covers the last ``K % g`` input
features, as GPTQ's ``g_idx = k // g`` does. The stored codes are padded to ``Kp`` columns holding the group's zero
point (0 when symmetric; clamped to the code range), so the padding dequantizes to 0, and the forward pads ``x`` with
zeros to ``Kp``: the padding adds exact zeros and the ops run unchanged on whole groups. :meth:`QuantLinear.codes`
and :meth:`QuantLinear.dequantize` return the ``K`` real columns; ``set_quantized`` / ``from_codes`` take them. fp8 schemes: ``W = float(q) * scale`` per channel / tensor / block
(:func:`qkernels.dequantize_fp8`); fp4 schemes: :func:`qkernels.dequantize_fp4`.

The fp8 codes and the fp4 block scales are stored as their uint8 bit patterns, not as torch's float8 dtypes:
``nn.Module.to(dtype)`` / ``.half()`` cast every floating-point buffer, and float8 dtypes count as floating point,
so a ``model.to(torch.bfloat16)`` after quantization would silently turn the codes into bf16. The forward takes a
free ``.view(torch.float8_e4m3fn)``. ``forward`` calls the public ops, so the dispatch table picks the backend for
the device the buffers are on (``extra_repr`` shows which).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import dispatch
from ..ops import (
    dequantize_affine,
    dequantize_fp4,
    dequantize_fp8,
    fp4_mm,
    fp4_weight_only_mm,
    fp8_mm,
    fp8_weight_only_mm,
    int4_weight_only_mm,
    int8_dynamic_mm,
    int8_weight_only_mm,
    pack_int4,
    quantize_affine,
    quantize_fp4,
    quantize_fp8,
    quantize_per_token_int8,
    unpack_int4,
)
from ..ops._validate import check_float_tensor
from ..ops.float4 import SCALE_DTYPES as FP4_SCALE_DTYPES
from ..reference.float4 import FORMATS as FP4_BLOCK
from .schemes import (Fp4, Fp8Dynamic, Fp8WeightOnly, Int4WeightOnly, Int8Dynamic, Int8WeightOnly, IntWeightInt8Act,
                      Scheme, padded_in_features)

FP8_WEIGHT_DTYPE = torch.float8_e4m3fn
# the 1 x 128 activation blocks and 128 x 128 weight blocks of Fp8Dynamic("block") (DeepSeek-V3, arXiv:2412.19437)
FP8_BLOCK = 128


class QuantLinear(nn.Module):
    """``y = x @ W^T + bias`` with a quantized ``W [out_features, in_features]``.

    Build one with :meth:`from_linear` (quantizes an ``nn.Linear``) or :func:`qkernels.quantize_`; the constructor
    allocates empty buffers of the right shapes (for ``load_state_dict``).

    Args:
        in_features, out_features: K and N.
        scheme: a scheme from :mod:`qkernels.nn.schemes` (integer, fp8 or fp4).
        bias: whether the layer has a bias (stored in ``bias_dtype``).
        act_order: the stored columns are permuted (``input_perm`` buffer), as in GPTQ ``desc_act`` checkpoints
            (integer schemes only).
    """

    def __init__(self, in_features: int, out_features: int, scheme: Scheme, bias: bool = True, *,
                 act_order: bool = False, bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if not isinstance(scheme, Scheme):
            raise TypeError(f"scheme must be a qkernels.nn scheme (e.g. Int4WeightOnly()), got {type(scheme).__name__}")
        why = scheme.check_shape(in_features, out_features)
        if why:
            raise ValueError(f"{scheme!r} cannot quantize a Linear({in_features}, {out_features}): {why}")
        self.in_features, self.out_features, self.scheme = int(in_features), int(out_features), scheme
        self.act_order = bool(act_order)
        N, K = self.out_features, self.in_features
        kw = {"device": device}
        if self.act_order and self.kind in ("fp8", "fp4"):
            raise ValueError(f"act_order (input_perm) is supported by the integer schemes only, got {scheme!r}")
        self.register_buffer("global_scale", None)
        if self.kind == "fp8":
            self.register_buffer("qweight", torch.zeros(N, K, dtype=torch.uint8, **kw))
            self.register_buffer("scale", torch.ones(self._fp8_scale_shape(), dtype=torch.float32, **kw))
            self.register_buffer("zero_point", None)
        elif self.kind == "fp4":
            B = FP4_BLOCK[scheme.format]
            self.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8, **kw))
            self.register_buffer("scale", torch.zeros(N, K // B, dtype=torch.uint8, **kw))
            self.register_buffer("zero_point", None)
            if scheme.format == "nvfp4":
                self.register_buffer("global_scale", torch.ones((), dtype=torch.float32, **kw))
        elif self.kind in ("int4", "int8_grouped"):
            Kp = self.padded_in_features
            G = Kp // self.group_size
            if self.kind == "int4":
                self.register_buffer("qweight", torch.zeros(N, Kp // 2, dtype=torch.uint8, **kw))
            else:
                self.register_buffer("qweight", torch.zeros(N, Kp, dtype=torch.int8, **kw))
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
        """The storage layout: "int4", "int8" (per-channel, fused kernels), "int8_grouped", "fp8" or "fp4"."""
        s = self.scheme
        if isinstance(s, (Fp8WeightOnly, Fp8Dynamic)):
            return "fp8"
        if isinstance(s, Fp4):
            return "fp4"
        if isinstance(s, Int4WeightOnly) or (isinstance(s, IntWeightInt8Act) and s.bits <= 4):
            return "int4"
        if isinstance(s, IntWeightInt8Act) or (isinstance(s, Int8WeightOnly) and not s.fused):
            return "int8_grouped"
        return "int8"

    @property
    def group_size(self) -> int:
        g = getattr(self.scheme, "group_size", -1)
        return self.in_features if g == -1 else g

    @property
    def padded_in_features(self) -> int:
        """Kp: the stored columns of a grouped integer weight (``ceil(K / g) * g``); K for the other layouts."""
        if self.kind in ("int4", "int8_grouped"):
            return padded_in_features(self.in_features, self.group_size)
        return self.in_features

    @property
    def bits(self) -> int:
        """Width of the integer codes (2..8; 8 for the int8 layouts), or of the fp8 / fp4 element."""
        return getattr(self.scheme, "bits", 4 if self.kind == "fp4" else 8)

    @property
    def op(self) -> str:
        """The qkernels op the forward runs."""
        if isinstance(self.scheme, Int8Dynamic):
            return "int8_dynamic_mm"
        if isinstance(self.scheme, Fp8WeightOnly):
            return "fp8_weight_only_mm"
        if isinstance(self.scheme, Fp8Dynamic):
            return "fp8_mm"
        if isinstance(self.scheme, Fp4):
            return "fp4_weight_only_mm" if self.scheme.weight_only else "fp4_mm"
        return {"int4": "int4_weight_only_mm", "int8": "int8_weight_only_mm", "int8_grouped": "dequantize_affine"}[
            self.kind]

    def backend(self) -> str:
        """The backend the dispatch table picks for this layer's op on the device its buffers are on."""
        ctx = {}
        if self.op == "fp8_mm":  # what the forward passes (out_dtype: bf16, the usual activation dtype)
            ctx = dict(a_dtype=FP8_WEIGHT_DTYPE, b_dtype=FP8_WEIGHT_DTYPE, granularity=self._fp8_mm_granularity(),
                       K=self.in_features, N=self.out_features)
        elif self.op == "fp4_mm":
            ctx = dict(format=self.scheme.format, K=self.in_features, N=self.out_features)
        try:
            return dispatch.choose(self.op, self.qweight.device, **ctx).backend
        except (RuntimeError, ValueError) as e:  # e.g. a forced backend that cannot run here
            return f"unavailable ({e})"

    # fp8 granularities: weight (quantize_fp8 args), activations (Fp8Dynamic), and what fp8_mm sees
    def _fp8_weight_args(self) -> tuple[str, object]:
        g = getattr(self.scheme, "granularity", "row")
        return (g, (FP8_BLOCK, FP8_BLOCK)) if g == "block" else (g, None)

    def _fp8_act_args(self) -> tuple[str, object]:
        g = self.scheme.granularity
        return (g, FP8_BLOCK) if g == "block" else (g, None)

    def _fp8_mm_granularity(self) -> str:
        return self.scheme.granularity

    def _fp8_scale_shape(self) -> tuple:
        N, K = self.out_features, self.in_features
        g, _ = self._fp8_weight_args()
        return {"row": (N, 1), "tensor": (), "block": (N // FP8_BLOCK, K // FP8_BLOCK)}[g]

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme) -> "QuantLinear":
        """Quantize ``linear`` (round to nearest with :func:`qkernels.quantize_affine`) on its own device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        if not isinstance(scheme, Scheme):
            raise TypeError(f"scheme must be a qkernels.nn scheme (e.g. Int4WeightOnly()), got {type(scheme).__name__}")
        w = linear.weight.detach()
        if w.device.type == "meta":
            raise ValueError("linear.weight is on the meta device; materialize the model before quantizing")
        bias = linear.bias
        mod = cls(linear.in_features, linear.out_features, scheme, bias is not None,
                  bias_dtype=bias.dtype if bias is not None else torch.float32, device=w.device)
        if mod.kind in ("fp8", "fp4") and not bool(torch.isfinite(w).all()):
            # the fp8/fp4 casts would keep NaN (as a NaN code / NaN block scale): refuse, as quantize_affine does
            raise ValueError(f"linear.weight contains NaN or inf; cannot quantize it to {scheme!r}")
        if mod.kind == "fp8":
            gran, block = mod._fp8_weight_args()
            q, s = quantize_fp8(w, FP8_WEIGHT_DTYPE, gran, block if block is not None else 128)
            mod.set_float_quantized(q, s)
        elif mod.kind == "fp4":
            packed, s, g = quantize_fp4(w, scheme.format)
            mod.set_float_quantized(packed, s, g)
        elif mod.kind in ("int4", "int8_grouped"):
            # zero columns up to whole groups: they leave every group's range (which always covers 0) unchanged
            K, Kp = mod.in_features, mod.padded_in_features
            wp = w if Kp == K else F.pad(w, (0, Kp - K))
            q, s, zp = quantize_affine(wp, mod.bits, mod.group_size, scheme.symmetric)
            mod.set_quantized(q[:, :K], s, None if scheme.symmetric else zp)
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
            q: int8 ``[N, K]`` signed codes (in the scheme's ``bits`` range, [-8, 7] for int4), columns in stored
                order (no padding: a ragged last group is padded here).
            scale: float ``[N, G]``, ``G = ceil(K/g)`` (``[N]`` accepted for per-channel); zero_point: int32 like
                scale, or None.
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

    @classmethod
    def from_float_codes(cls, qweight: torch.Tensor, scale: torch.Tensor, scheme: Scheme,
                         bias: torch.Tensor | None = None, global_scale: torch.Tensor | None = None) -> "QuantLinear":
        """Build an fp8 / fp4 layer from its codes (e.g. a checkpoint's), as :func:`qkernels.quantize_fp8` /
        :func:`qkernels.quantize_fp4` return them.

        Args:
            qweight: fp8 schemes: float8_e4m3fn (or its uint8 bits) ``[N, K]``; fp4 schemes: uint8 ``[N, K/2]``
                packed e2m1 codes, element 2i in the low nibble.
            scale: fp8: float ``[N, 1]`` / ``[N]`` (row), ``[]`` (tensor), ``[N/128, K/128]`` (block); fp4: the block
                scales ``[N, K/B]`` as float8_e8m0fnu (mxfp4) / float8_e4m3fn (nvfp4) or their uint8 bits.
            global_scale: nvfp4 only: the fp32 per-tensor scale (one element).
        """
        if not isinstance(qweight, torch.Tensor) or qweight.dim() != 2:
            raise ValueError(f"qweight must be a 2-D tensor, got {getattr(qweight, 'shape', type(qweight).__name__)}")
        N, K = qweight.shape
        if isinstance(scheme, Fp4):
            K *= 2
        elif not isinstance(scheme, (Fp8WeightOnly, Fp8Dynamic)):
            raise TypeError(f"from_float_codes takes an fp8/fp4 scheme, got {scheme!r} (use from_codes for integers)")
        mod = cls(K, N, scheme, bias is not None, bias_dtype=bias.dtype if bias is not None else torch.float32,
                  device=qweight.device)
        mod.set_float_quantized(qweight, scale, global_scale)
        if bias is not None:
            if tuple(bias.shape) != (N,):
                raise ValueError(f"bias must have shape [N] = [{N}], got {tuple(bias.shape)}")
            mod.bias.copy_(bias)
        return mod

    @torch.no_grad()
    def set_float_quantized(self, qweight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None = None):
        """Fill the buffers of an fp8 / fp4 layer (arguments as for :meth:`from_float_codes`; shapes and dtypes
        checked)."""
        N, K = self.out_features, self.in_features
        kind = self.kind
        if kind not in ("fp8", "fp4"):
            raise TypeError(f"set_float_quantized is for fp8/fp4 schemes, this layer is {self.scheme!r}")
        if kind == "fp8":
            want, wdt = (N, K), (FP8_WEIGHT_DTYPE, torch.uint8)
        else:
            want, wdt = (N, K // 2), (torch.uint8,)
        if tuple(qweight.shape) != want or qweight.dtype not in wdt:
            names = " or ".join(str(d).replace("torch.", "") for d in wdt)
            raise ValueError(f"qweight must be {names} of shape {want} for {self.scheme!r}, got {qweight.dtype} "
                             f"{tuple(qweight.shape)}")
        sshape = tuple(self.scale.shape)
        if kind == "fp8":
            if not scale.dtype.is_floating_point or scale.dtype.itemsize < 2:
                raise TypeError(f"scale must be float32/bfloat16/float16, got {scale.dtype}")
            if sshape == (N, 1) and tuple(scale.shape) == (N,):
                scale = scale.reshape(N, 1)
            if sshape == () and scale.numel() == 1:
                scale = scale.reshape(())
        else:
            sdt = FP4_SCALE_DTYPES[self.scheme.format]
            if scale.dtype not in (sdt, torch.uint8):
                raise TypeError(f"scale must be {str(sdt).replace('torch.', '')} (or its uint8 bits) for "
                                f"{self.scheme!r}, got {scale.dtype}")
            scale = scale.view(torch.uint8)
        if tuple(scale.shape) != sshape:
            raise ValueError(f"scale must have shape {sshape} for {self.scheme!r} on [{N}, {K}], got "
                             f"{tuple(scale.shape)}")
        if (global_scale is None) != (self.global_scale is None):
            raise ValueError(f"global_scale must be {'None' if self.global_scale is None else 'given'} for "
                             f"{self.scheme!r}")
        self.qweight.copy_(qweight.view(torch.uint8))
        self.scale.copy_(scale if kind == "fp4" else scale.float())
        if global_scale is not None:
            if global_scale.numel() != 1 or not global_scale.dtype.is_floating_point:
                raise ValueError(f"global_scale must be one float, got {global_scale.dtype} "
                                 f"{tuple(global_scale.shape)}")
            self.global_scale.copy_(global_scale.float().reshape(()))

    @torch.no_grad()
    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None):
        """Fill the buffers from int8 codes ``q [N, K]``, ``scale`` and ``zero_point`` (shapes checked; a ragged last
        group is padded with its zero point)."""
        if self.kind in ("fp8", "fp4"):
            raise TypeError(f"set_quantized takes integer codes; use set_float_quantized for {self.scheme!r}")
        N, K = self.out_features, self.in_features
        if tuple(q.shape) != (N, K) or q.dtype != torch.int8:
            raise ValueError(f"q must be int8 of shape {(N, K)}, got {q.dtype} {tuple(q.shape)}")
        bits = self.bits
        if bits < 8 and q.numel():
            lo, hi = int(q.min()), int(q.max())
            qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            if lo < qmin or hi > qmax:
                raise ValueError(f"int{bits} codes must be in [{qmin}, {qmax}], got [{lo}, {hi}]")
        sshape = tuple(self.scale.shape)
        if self.kind == "int8" and scale.dim() == 2 and scale.shape[1] == 1:
            scale = scale.reshape(-1)
        if tuple(scale.shape) != sshape:
            raise ValueError(f"scale must have shape {sshape} for {self.scheme!r} on K={K}, got {tuple(scale.shape)}")
        if (zero_point is None) != (self.zero_point is None):
            raise ValueError(f"zero_point must be {'None' if self.zero_point is None else 'given'} for {self.scheme!r}")
        if zero_point is not None and tuple(zero_point.shape) != sshape:
            raise ValueError(f"zero_point must have shape {sshape}, got {tuple(zero_point.shape)}")
        Kp = self.padded_in_features
        if Kp != K:
            # the padding columns of the ragged last group hold its zero point: they dequantize to exactly 0
            lo, hi = (-8, 7) if self.kind == "int4" else (-128, 127)
            fill = torch.zeros(N, 1, dtype=torch.int8, device=q.device) if zero_point is None else \
                zero_point[:, -1:].clamp(lo, hi).to(device=q.device, dtype=torch.int8)
            q = torch.cat([q, fill.expand(N, Kp - K)], 1)
        self.qweight.copy_(pack_int4(q) if self.kind == "int4" else q)
        self.scale.copy_(scale.float())
        if zero_point is not None:
            self.zero_point.copy_(zero_point.to(torch.int32))

    # ---- compute -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.scheme, IntWeightInt8Act):
            # W{bits}A8 as QAT simulates it: x rounded per token to int8 and decoded (qkernels.qat.fake_quant_act_int8)
            check_float_tensor(x, "x")
            qx, sx = quantize_per_token_int8(x)
            x = (qx.float() * sx.unsqueeze(-1)).to(x.dtype)
        if self.input_perm is not None:
            x = x.index_select(-1, self.input_perm)
        kind = self.kind
        if kind in ("fp8", "fp4"):
            return self._float_forward(x)
        K, Kp = self.in_features, self.padded_in_features
        if Kp != K:  # a ragged last group: zero inputs meet the padding codes
            if x.dim() == 0 or x.shape[-1] != K:
                raise ValueError(f"x must have shape [..., K] with K={K} (in_features), got {tuple(x.shape)}")
            x = F.pad(x, (0, Kp - K))
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

    def _float_forward(self, x: torch.Tensor) -> torch.Tensor:
        check_float_tensor(x, "x")
        K = self.in_features
        if x.dim() == 0 or x.shape[-1] != K:
            raise ValueError(f"x must have shape [..., K] with K={K} (in_features), got {tuple(x.shape)}")
        scheme = self.scheme
        if x.numel() == 0:  # no tokens: fp8_mm / fp4_mm reject empty operands (their scale grids cannot tile 0 rows)
            return x.new_zeros(*x.shape[:-1], self.out_features)
        if isinstance(scheme, Fp8WeightOnly):
            # x stays float; the weight is decoded inside the GEMM (CPU) or by the cast kernel for cuBLAS (GPU)
            return fp8_weight_only_mm(x, self.qweight.view(FP8_WEIGHT_DTYPE), self.scale, self.bias)
        if isinstance(scheme, Fp8Dynamic):
            gran, block = self._fp8_act_args()
            a_q, a_scale = quantize_fp8(x, FP8_WEIGHT_DTYPE, gran, block if block is not None else 128)
            return fp8_mm(a_q, a_scale, self.qweight.view(FP8_WEIGHT_DTYPE), self.scale, x.dtype, self.bias)
        fmt = scheme.format
        if scheme.weight_only:
            return fp4_weight_only_mm(x, self.qweight, self.scale, self.bias, format=fmt,
                                      w_global_scale=self.global_scale)
        a_p, a_s, a_g = quantize_fp4(x, fmt)  # activations in the weight's format, nvfp4: per-call global scale
        return fp4_mm(a_p, a_s, self.qweight, self.scale, x.dtype, self.bias, format=fmt, a_global_scale=a_g,
                      b_global_scale=self.global_scale)

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The codes ``[N, K]`` in stored column order: int8 for the integer schemes, float8_e4m3fn for fp8; fp4
        layers return their packed uint8 ``[N, K/2]``."""
        if self.kind == "fp8":
            return self.qweight.view(FP8_WEIGHT_DTYPE)
        if self.kind == "fp4":
            return self.qweight
        return self._stored_codes()[:, :self.in_features]

    def _stored_codes(self) -> torch.Tensor:
        """Integer codes ``[N, Kp]``, ragged-group padding included."""
        return unpack_int4(self.qweight) if self.kind == "int4" else self.qweight

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out_features, in_features]`` in the input feature order (``input_perm`` undone)."""
        if self.kind == "fp8":
            gran, block = self._fp8_weight_args()
            return dequantize_fp8(self.codes(), self.scale, dtype, gran, block)
        if self.kind == "fp4":
            return dequantize_fp4(self.qweight, self.scale, self.global_scale, self.scheme.format, out_dtype=dtype)
        scale = self.scale if self.scale.dim() == 2 else self.scale.reshape(-1, 1)
        zp = self.zero_point
        w = dequantize_affine(self._stored_codes(), scale, zp, self.group_size, out_dtype=dtype)[:, :self.in_features]
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
        if self.kind in ("fp8", "fp4"):
            return self._float_shard(rank, world_size, dim)
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

    def _float_shard(self, rank: int, world_size: int, dim: int) -> "QuantLinear":
        """fp8/fp4 shards: whole scale blocks per rank (per-tensor scales and the nvfp4 global scale are shared)."""
        N, K = self.out_features, self.in_features
        size = N if dim == 0 else K
        if size % world_size:
            name = "out_features" if dim == 0 else "in_features"
            raise ValueError(f"{name}={size} must be divisible by world_size={world_size}")
        n = size // world_size
        if self.kind == "fp8":
            gran, _ = self._fp8_weight_args()
            if gran == "block" and n % FP8_BLOCK:
                raise ValueError(f"shards of {n} must hold whole {FP8_BLOCK}x{FP8_BLOCK} scale blocks")
            q = self.codes()
            sl = slice(rank * n, (rank + 1) * n)
            q = q[sl] if dim == 0 else q[:, sl]
            s = self.scale
            if gran == "block":
                bs = slice(rank * n // FP8_BLOCK, (rank + 1) * n // FP8_BLOCK)
                s = s[bs] if dim == 0 else s[:, bs]
            elif gran == "row" and dim == 0:
                s = s[sl]
        else:
            B = FP4_BLOCK[self.scheme.format]
            if dim == 1 and n % B:
                raise ValueError(f"row shards of {n} input features must hold whole {self.scheme.format} blocks "
                                 f"of {B}")
            if dim == 0:
                sl = slice(rank * n, (rank + 1) * n)
                q, s = self.qweight[sl], self.scale[sl]
            else:
                q = self.qweight[:, rank * n // 2:(rank + 1) * n // 2]
                s = self.scale[:, rank * n // B:(rank + 1) * n // B]
        if dim == 0:
            bias = None if self.bias is None else self.bias[rank * n:(rank + 1) * n]
        else:
            bias = self.bias if (self.bias is not None and rank == 0) else None
        return QuantLinear.from_float_codes(q.contiguous(), s.contiguous(), self.scheme, bias, self.global_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme!r}{', act_order=True' if self.act_order else ''}, op={self.op}, "
                f"backend={self.backend()}")
