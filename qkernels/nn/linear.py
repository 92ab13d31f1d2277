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
zeros to ``Kp``: the padding adds exact zeros and the ops run unchanged on whole groups. Exception: int4 on the CPU,
whose kernel takes ``x`` unpadded (its missing columns count as zeros) and skips the padding columns' work. :meth:`QuantLinear.codes`
and :meth:`QuantLinear.dequantize` return the ``K`` real columns; ``set_quantized`` / ``from_codes`` take them. fp8 schemes: ``W = float(q) * scale`` per channel / tensor / block
(:func:`qkernels.dequantize_fp8`); fp4 schemes: :func:`qkernels.dequantize_fp4`.

The fp8 codes and the fp4 block scales are stored as their uint8 bit patterns, not as torch's float8 dtypes:
``nn.Module.to(dtype)`` / ``.half()`` cast every floating-point buffer, and float8 dtypes count as floating point,
so a ``model.to(torch.bfloat16)`` after quantization would silently turn the codes into bf16. The forward takes a
free ``.view(torch.float8_e4m3fn)``. The dispatch table picks the backend for the device the buffers are on
(``extra_repr`` shows which).

Each layout's storage and compute lives in :mod:`qkernels.nn.layouts` (the scheme names its layout and op); this
class holds no per-scheme code.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import dispatch
from .layouts import FP8_BLOCK, FP8_WEIGHT_DTYPE, LAYOUTS, Fp8Layout  # noqa: F401  (FP8_*: public names of this module)
from .schemes import Scheme, padded_in_features  # noqa: F401


def _check_scheme(scheme):
    if not isinstance(scheme, Scheme):
        raise TypeError(f"scheme must be a qkernels.nn scheme (e.g. Int4WeightOnly()), got {type(scheme).__name__}")


def _check_bias(mod: "QuantLinear", bias):
    if bias is not None:
        N = mod.out_features
        if tuple(bias.shape) != (N,):
            raise ValueError(f"bias must have shape [N] = [{N}], got {tuple(bias.shape)}")
        mod.bias.copy_(bias)


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
        _check_scheme(scheme)
        why = scheme.check_shape(in_features, out_features)
        if why:
            raise ValueError(f"{scheme!r} cannot quantize a Linear({in_features}, {out_features}): {why}")
        self.in_features, self.out_features, self.scheme = int(in_features), int(out_features), scheme
        self.act_order = bool(act_order)
        self._layout = LAYOUTS[scheme.layout]
        if self.act_order and self._layout.family != "integer":
            raise ValueError(f"act_order (input_perm) is supported by the integer schemes only, got {scheme!r}")
        # fixed by the scheme and shape: computed once, read by the forward (the decode hot path)
        self._op = scheme.op
        self._group = self.group_size
        self._pad = self.padded_in_features - self.in_features
        self._direct = self._layout.runs_direct(self)
        self._bias_cast = None  # the bias in the last activation dtype: see layouts.add_bias
        self.register_buffer("global_scale", None)
        self._layout.init_buffers(self, device)
        N, K = self.out_features, self.in_features
        self.register_buffer("bias", torch.zeros(N, dtype=bias_dtype, device=device) if bias else None)
        self.register_buffer("input_perm", torch.arange(K, dtype=torch.int64, device=device) if act_order else None)

    # ---- layout --------------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        """The storage layout: "int4", "int8" (per-channel, fused kernels), "int8_grouped", "fp8" or "fp4"."""
        return self.scheme.layout

    @property
    def group_size(self) -> int:
        g = getattr(self.scheme, "group_size", -1)
        return self.in_features if g == -1 else g

    @property
    def padded_in_features(self) -> int:
        """Kp: the stored columns of a grouped integer weight (``ceil(K / g) * g``); K for the other layouts."""
        return self._layout.padded_in_features(self)

    @property
    def bits(self) -> int:
        """Width of the integer codes (2..8; 8 for the int8 layouts), or of the fp8 / fp4 element."""
        return getattr(self.scheme, "bits", 4 if self.kind == "fp4" else 8)

    @property
    def op(self) -> str:
        """The qkernels op the forward runs."""
        return self.scheme.op

    def backend(self) -> str:
        """The backend the dispatch table picks for this layer's op on the device its buffers are on."""
        try:
            return dispatch.choose(self.op, self.qweight.device, **self._layout.backend_ctx(self)).backend
        except (RuntimeError, ValueError) as e:  # e.g. a forced backend that cannot run here
            return f"unavailable ({e})"

    # fp8 granularities: weight (quantize_fp8 args), activations (Fp8Dynamic), and what fp8_mm sees
    def _fp8_weight_args(self) -> tuple[str, object]:
        return Fp8Layout.weight_args(self.scheme)

    def _fp8_act_args(self) -> tuple[str, object]:
        return Fp8Layout.act_args(self.scheme)

    def _fp8_mm_granularity(self) -> str:
        return self.scheme.granularity

    # ---- construction --------------------------------------------------------------------------------------
    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: Scheme) -> "QuantLinear":
        """Quantize ``linear`` (round to nearest with :func:`qkernels.quantize_affine`) on its own device."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        _check_scheme(scheme)
        w = linear.weight.detach()
        if w.device.type == "meta":
            raise ValueError("linear.weight is on the meta device; materialize the model before quantizing")
        bias = linear.bias
        mod = cls(linear.in_features, linear.out_features, scheme, bias is not None,
                  bias_dtype=bias.dtype if bias is not None else torch.float32, device=w.device)
        with torch.no_grad():
            if mod._layout.family == "float":
                mod._layout.quantize_checked(mod, w)
            else:
                mod._layout.quantize(mod, w)
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
        with torch.no_grad():
            _check_bias(mod, bias)
            if input_perm is not None:
                perm = input_perm.to(torch.int64)
                ok = tuple(perm.shape) == (K,) and torch.equal(torch.sort(perm).values,
                                                                torch.arange(K, device=perm.device))
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
        _check_scheme(scheme)
        if not scheme.float_codes:
            raise TypeError(f"from_float_codes takes an fp8/fp4 scheme, got {scheme!r} (use from_codes for integers)")
        N, K = qweight.shape[0], LAYOUTS[scheme.layout].in_features_of(qweight)
        mod = cls(K, N, scheme, bias is not None, bias_dtype=bias.dtype if bias is not None else torch.float32,
                  device=qweight.device)
        mod.set_float_quantized(qweight, scale, global_scale)
        with torch.no_grad():
            _check_bias(mod, bias)
        return mod

    @torch.no_grad()
    def set_float_quantized(self, qweight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None = None):
        """Fill the buffers of an fp8 / fp4 layer (arguments as for :meth:`from_float_codes`; shapes and dtypes
        checked)."""
        if self._layout.family != "float":
            raise TypeError(f"set_float_quantized is for fp8/fp4 schemes, this layer is {self.scheme!r}")
        self._layout.set_codes(self, qweight, scale, global_scale)

    @torch.no_grad()
    def set_quantized(self, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None):
        """Fill the buffers from int8 codes ``q [N, K]``, ``scale`` and ``zero_point`` (shapes checked; a ragged last
        group is padded with its zero point)."""
        if self._layout.family != "integer":
            raise TypeError(f"set_quantized takes integer codes; use set_float_quantized for {self.scheme!r}")
        self._layout.set_codes(self, q, scale, zero_point)

    # ---- compute -------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._layout.forward(self, x)

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """The codes ``[N, K]`` in stored column order: int8 for the integer schemes, float8_e4m3fn for fp8; fp4
        layers return their packed uint8 ``[N, K/2]``."""
        return self._layout.codes(self)

    def _stored_codes(self) -> torch.Tensor:
        """Integer codes ``[N, Kp]``, ragged-group padding included."""
        return self._layout.stored_codes(self)

    @torch.no_grad()
    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight ``[out_features, in_features]`` in the input feature order (``input_perm`` undone)."""
        return self._layout.dequantize(self, dtype)

    # ---- tensor parallelism --------------------------------------------------------------------------------
    @torch.no_grad()
    def shard(self, rank: int, world_size: int, dim: int) -> "QuantLinear":
        """This rank's shard for tensor parallelism.

        ``dim=0`` (column parallel): rows ``N/world_size`` of the weight and bias; gather the outputs along the last
        dim. ``dim=1`` (row parallel): columns ``K/world_size`` (a whole number of quantization groups); each rank
        takes its slice of x, the partial outputs are summed (all-reduce) and only rank 0 keeps the bias.
        W8A8 (Int8Dynamic) row shards quantize their own slice of x, so their sum differs from the unsharded layer
        by the activation rounding. Act-order layers can be column-sharded only. fp8 / fp4 shards hold whole scale
        blocks (per-tensor scales and the nvfp4 global scale are shared).
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
        return self._layout.shard(self, rank, world_size, dim)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scheme={self.scheme!r}{', act_order=True' if self.act_order else ''}, op={self.op}, "
                f"backend={self.backend()}")
