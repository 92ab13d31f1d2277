"""How a :class:`~qkernels.nn.QuantLinear` stores and runs each weight layout: the per-scheme code of the layer.

A scheme names its layout (:attr:`Scheme.layout`: "int4", "int8", "int8_grouped", "fp8", "fp4") and its op
(:attr:`Scheme.op`); :data:`LAYOUTS` maps the layout to the object below that allocates the buffers, fills them
(from a float weight or from codes), runs the forward, decodes the weight and cuts tensor-parallel shards. QuantLinear
itself holds no per-scheme branch: a new scheme with an existing layout only declares ``layout`` and ``op``; a new
layout adds one class here. The buffer table is in :mod:`qkernels.nn.linear`'s docstring.

The forward is the decode hot path (one call per layer per token): where an unforced call runs a compiled kernel
(:func:`qkernels.ops._call.compiled_op` / ``cpu_op``, decided once per op and device and cached) it calls the
``torch.ops`` ops directly on x as it is and on the buffers, whose shapes and dtypes were checked when they were
filled; the kernels check x and every buffer again (TORCH_CHECK). If a kernel raises (e.g. x of the wrong width or on
another device), the forward runs the public ops, which raise their Python-side errors. Forced backends
(``QKERNELS_BACKEND``), ``mock_device``, torch.compile and, for the fp8 / fp4 layouts, GPUs (whose choice between
torch._scaled_mm and the CUDA kernels reads the call's dtypes and shapes) go through the public ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ops import (
    dequantize_affine,
    dequantize_fp4,
    dequantize_fp8,
    fp4_mm,
    fp4_weight_only_mm,
    fp8_mm,
    fp8_weight_only_mm,
    int4_weight_only_mm,
    int8_dynamic_int4_mm,
    int8_dynamic_mm,
    int8_weight_only_mm,
    pack_int4,
    quantize_affine,
    quantize_fp4,
    quantize_fp8,
    quantize_per_token_int8,
    unpack_int4,
)
from ..ops import autograd
from ..ops._call import compiled_op, cpu_op, is_compiling
from ..ops._validate import FLOAT_DTYPES, check_float_tensor
from ..ops.float4 import SCALE_DTYPES as FP4_SCALE_DTYPES
from ..ops.float4 import unit_scale
from ..reference.float4 import FORMATS as FP4_BLOCK
from .schemes import padded_in_features

FP8_WEIGHT_DTYPE = torch.float8_e4m3fn
# the 1 x 128 activation blocks and 128 x 128 weight blocks of Fp8Dynamic("block") (DeepSeek-V3, arXiv:2412.19437)
FP8_BLOCK = 128
_PUBLIC = {"int4_weight_only_mm": int4_weight_only_mm, "int8_weight_only_mm": int8_weight_only_mm,
           "int8_dynamic_mm": int8_dynamic_mm}


def check_input(x, K: int):
    """A QuantLinear's input: float ``[..., K]`` (TypeError / ValueError naming x otherwise)."""
    check_float_tensor(x, "x")
    if x.dim() == 0:
        raise ValueError(f"x must have shape [..., K] with K={K} (in_features), got a 0-d tensor")
    if x.shape[-1] != K:
        raise ValueError(f"x must have shape [..., K] with K={K} (in_features), got {tuple(x.shape)}, i.e. "
                         f"K={x.shape[-1]}")


def _input_ok(x, K: int) -> bool:
    try:
        return x.dtype in FLOAT_DTYPES and x.shape[-1] == K
    except (AttributeError, IndexError):
        return False


def run_2d(fn, x: torch.Tensor, args: tuple) -> torch.Tensor:
    """``fn(x2, *args)`` for a GEMM op that takes ``x2 = x`` as ``[M, K]``, returned with x's leading dims (a reshape
    only for x other than 2-D)."""
    if x.dim() == 2:
        return fn(x, *args)
    out = fn(x.reshape(-1, x.shape[-1]), *args)
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _round_per_token_int8(x: torch.Tensor) -> torch.Tensor:
    """``x`` (checked) rounded per token to symmetric int8 and decoded in x's dtype, as
    :func:`qkernels.quantize_per_token_int8` then ``q * scale`` (the kernel straight on x where it runs)."""
    fn = compiled_op("quantize_per_token_int8", x.device)
    if fn is not None:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        qx, sx = fn(x2)  # codes of a rounding: the op has no autograd (ops/autograd.py NON_DIFFERENTIABLE)
        # int8 * fp32 promotes to fp32: the product of qx.float() and the scale, in one op
        xr = torch.mul(qx, sx.unsqueeze(1)).to(x.dtype)
        return xr if x2 is x else xr.reshape(x.shape)
    qx, sx = quantize_per_token_int8(x)
    return (qx.float() * sx.unsqueeze(-1)).to(x.dtype)


def _check_presence(name: str, value, layer):
    """An optional argument must be given exactly when the layer has that buffer."""
    buf = getattr(layer, name)
    if (value is None) != (buf is None):
        raise ValueError(f"{name} must be {'None' if buf is None else 'given'} for {layer.scheme!r}")


def add_bias(layer, out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``out + bias.to(out.dtype)`` (the same rounding), without the two temporaries on the hot path: the bias is
    kept cast to the last activation dtype (``layer._bias_cast``: recast when the buffer is replaced, moved, or changed
    in place: its version counter moves; a bias made under inference_mode has none and is cast per call), and added
    in place to the fresh kernel output unless autograd tracks it."""
    if bias is not None and is_compiling():  # traced: no data pointers or version counters; the graph fuses it
        return out + bias.to(out.dtype)
    return add_bias_eager(layer, out, bias)


def add_bias_eager(layer, out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`add_bias` outside torch.compile (the fast paths, which already know that: one call less per token)."""
    if bias is None:
        return out
    dt = out.dtype
    if bias.dtype is not dt:
        c = layer._bias_cast
        # (an inference-mode bias is never cached, so `c[0] is not bias` comes before its missing version counter)
        if c is None or c[0] is not bias or c[1] is not dt or c[2] != bias._version or c[3] != bias.data_ptr():
            if bias.is_inference():
                return out.add_(bias.to(dt)) if not out.requires_grad else out + bias.to(dt)
            c = layer._bias_cast = (bias, dt, bias._version, bias.data_ptr(), bias.to(dt))
        bias = c[4]
    return out + bias if out.requires_grad else out.add_(bias)


class Layout:
    """The storage and compute of one weight layout (stateless: one shared instance per layout)."""

    name = "?"
    family = "integer"  # "integer" (set_quantized / from_codes) or "float" (set_float_quantized / from_float_codes)

    def init_buffers(self, layer, device):
        raise NotImplementedError

    def padded_in_features(self, layer) -> int:
        return layer.in_features

    def runs_direct(self, layer) -> bool:
        """Whether the forward may hand x to the scheme's op as it is (no rounding, permutation or padding of x
        first): QuantLinear stores it as ``_direct``."""
        return False

    def backend_ctx(self, layer) -> dict:
        """What the forward passes to the dispatch table (for :meth:`QuantLinear.backend`)."""
        return {}

    def quantize(self, layer, w: torch.Tensor):
        """Fill the buffers from the float weight ``w [N, K]`` (round to nearest)."""
        raise NotImplementedError

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def codes(self, layer) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self, layer, dtype) -> torch.Tensor:
        raise NotImplementedError

    def shard(self, layer, rank: int, world_size: int, dim: int):
        raise NotImplementedError


# ---- integer layouts ---------------------------------------------------------------------------------------------
class _IntLayout(Layout):
    gemm = True  # the scheme's op is a GEMM of x with the codes (op_args); False: the layout's own mm
    # the op takes x unpadded where the codes are stored padded to whole groups (a ragged last group), on the CPU:
    # int4_weight_only_mm's C++ kernel treats x's missing columns as zeros and skips their work
    ragged_x_on_cpu = False

    def runs_direct(self, layer):
        return (self.gemm and not layer.scheme.act_int8 and not layer.act_order
                and (layer._pad == 0 or self.ragged_x_on_cpu))

    def set_codes(self, layer, q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None):
        """QuantLinear.set_quantized: int8 codes ``q [N, K]`` (ragged last group padded with its zero point)."""
        N, K = layer.out_features, layer.in_features
        if tuple(q.shape) != (N, K) or q.dtype != torch.int8:
            raise ValueError(f"q must be int8 of shape {(N, K)}, got {q.dtype} {tuple(q.shape)}")
        bits = layer.bits
        if bits < 8 and q.numel():
            lo, hi = int(q.min()), int(q.max())
            qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
            if lo < qmin or hi > qmax:
                raise ValueError(f"int{bits} codes must be in [{qmin}, {qmax}], got [{lo}, {hi}]")
        sshape = tuple(layer.scale.shape)
        if self.name == "int8" and scale.dim() == 2 and scale.shape[1] == 1:
            scale = scale.reshape(-1)
        if tuple(scale.shape) != sshape:
            raise ValueError(f"scale must have shape {sshape} for {layer.scheme!r} on K={K}, got "
                             f"{tuple(scale.shape)}")
        _check_presence("zero_point", zero_point, layer)
        if zero_point is not None and tuple(zero_point.shape) != sshape:
            raise ValueError(f"zero_point must have shape {sshape}, got {tuple(zero_point.shape)}")
        Kp = layer.padded_in_features
        if Kp != K:
            # the padding columns of the ragged last group hold its zero point: they dequantize to exactly 0
            lo, hi = (-8, 7) if self.name == "int4" else (-128, 127)
            fill = torch.zeros(N, 1, dtype=torch.int8, device=q.device) if zero_point is None else \
                zero_point[:, -1:].clamp(lo, hi).to(device=q.device, dtype=torch.int8)
            q = torch.cat([q, fill.expand(N, Kp - K)], 1)
        layer.qweight.copy_(pack_int4(q) if self.name == "int4" else q)
        layer.scale.copy_(scale.float())
        if zero_point is not None:
            layer.zero_point.copy_(zero_point.to(torch.int32))

    def stored_codes(self, layer) -> torch.Tensor:
        """Integer codes ``[N, Kp]``, ragged-group padding included."""
        return self.unpack(layer.qweight)

    def unpack(self, qweight: torch.Tensor) -> torch.Tensor:
        """Rows of the ``qweight`` buffer as integer codes ``[n, Kp]``."""
        return qweight

    def codes(self, layer):
        return self.stored_codes(layer)[:, :layer.in_features]

    def dequantize(self, layer, dtype):
        return self._dequantize(layer, self.stored_codes(layer), layer.scale, layer.zero_point, dtype)

    def dequantize_rows(self, layer, rows: torch.Tensor, dtype) -> torch.Tensor:
        """``dequantize(layer, dtype)[rows]`` without dequantizing the other rows (``rows``: int64 ``[n]``): the lookup
        of an input embedding that shares the output head's codes (:class:`qkernels.nn.QuantEmbedding`)."""
        zp = layer.zero_point
        return self._dequantize(layer, self.unpack(layer.qweight.index_select(0, rows)),
                                layer.scale.index_select(0, rows), None if zp is None else zp.index_select(0, rows),
                                dtype)

    def _dequantize(self, layer, codes, scale, zero_point, dtype):
        scale = scale if scale.dim() == 2 else scale.reshape(-1, 1)
        w = dequantize_affine(codes, scale, zero_point, layer.group_size, out_dtype=dtype)[:, :layer.in_features]
        if layer.input_perm is not None:
            w = torch.empty_like(w).index_copy_(1, layer.input_perm, w)
        return w

    def forward(self, layer, x):
        b = layer._buffers
        # a padded layer's kernel also takes x as wide as the stored codes (or any width within the last group),
        # so its in_features is checked here
        if layer._direct and (not layer._pad or (x.is_cpu and x.dim() and x.shape[-1] == layer.in_features)):
            # the decode hot path: x goes to the kernel as it is, and the kernel checks it (and every buffer)
            try:
                fn = compiled_op(layer._op, x.device)
                if fn is not None:
                    args = self.op_args(layer, b)
                    return add_bias_eager(layer, fn(x, *args) if x.dim() == 2 else run_2d(fn, x, args), b["bias"])
            except Exception:  # noqa: BLE001  (the checked path below raises the Python-side error)
                pass
        K = layer.in_features
        if not _input_ok(x, K):
            check_input(x, K)
        if layer.scheme.act_int8:
            # W{bits}A8 as QAT simulates it: x rounded per token to int8 and decoded (qkernels.qat.fake_quant_act_int8)
            # (straight-through gradient: the rounding has zero derivative almost everywhere, QAT's estimator)
            x = autograd.straight_through(x, _round_per_token_int8(x))
        perm = b["input_perm"]
        if perm is not None:
            x = x.index_select(-1, perm)
        pad = layer._pad
        if pad and not (self.ragged_x_on_cpu and x.is_cpu):  # a ragged last group: zero inputs meet the padding codes
            x = F.pad(x, (0, pad))
        return add_bias(layer, self.mm(layer, b, x), b["bias"])

    def mm(self, layer, b: dict, x: torch.Tensor) -> torch.Tensor:
        """``x [..., Kp] @ W^T`` without bias, on the op the scheme names (x [..., K] on the CPU where
        ``ragged_x_on_cpu``)."""
        fn = compiled_op(layer._op, x.device)
        if fn is not None:
            try:
                return run_2d(fn, x, self.op_args(layer, b))
            except Exception:  # noqa: BLE001  (the public op raises its Python-side error, or runs where it can)
                pass
        return self.public_mm(layer, b, x)

    def op_args(self, layer, b: dict) -> tuple:
        raise NotImplementedError

    def public_mm(self, layer, b: dict, x):
        return _PUBLIC[layer._op](x, b["qweight"], b["scale"])

    def shard(self, layer, rank, world_size, dim):
        N, K = layer.out_features, layer.in_features
        q, scale, zp = layer.codes(), layer.scale, layer.zero_point
        cls = type(layer)
        if dim == 0:
            if N % world_size:
                raise ValueError(f"out_features={N} must be divisible by world_size={world_size}")
            n = N // world_size
            rows = slice(rank * n, (rank + 1) * n)
            bias = None if layer.bias is None else layer.bias[rows]
            return cls.from_codes(q[rows].contiguous(), scale[rows].contiguous(),
                                  None if zp is None else zp[rows].contiguous(), layer.scheme, bias, layer.input_perm)
        if layer.input_perm is not None:
            raise NotImplementedError("row-parallel sharding of an act-order (input_perm) layer is not supported: "
                                      "its groups are not contiguous in the input features; shard dim=0 instead")
        if K % world_size:
            raise ValueError(f"in_features={K} must be divisible by world_size={world_size}")
        k = K // world_size
        g = layer.group_size
        scheme = layer.scheme
        if layer.scale.dim() == 2 and g != K:
            if k % g:
                raise ValueError(f"row shards of {k} input features must hold whole groups of {g}")
            gs = slice(rank * k // g, (rank + 1) * k // g)
            scale, zp = scale[:, gs].contiguous(), None if zp is None else zp[:, gs].contiguous()
        elif layer.scale.dim() == 2:  # one group per row: each shard keeps the row's scale, as its own group
            scheme = type(scheme)(**{**scheme.__dict__, "group_size": -1})
        cols = slice(rank * k, (rank + 1) * k)
        bias = layer.bias if (layer.bias is not None and rank == 0) else None
        return cls.from_codes(q[:, cols].contiguous(), scale, zp, scheme, bias)


class _GroupedLayout(_IntLayout):
    """Codes in groups of ``group_size`` along K, padded to whole groups; fp32 scales and int32 zero points."""

    def padded_in_features(self, layer):
        return padded_in_features(layer.in_features, layer.group_size)

    def init_buffers(self, layer, device):
        N, Kp = layer.out_features, layer.padded_in_features
        G = Kp // layer.group_size
        layer.register_buffer("qweight", self.codes_buffer(N, Kp, device))
        layer.register_buffer("scale", torch.ones(N, G, dtype=torch.float32, device=device))
        zp = None if layer.scheme.symmetric else torch.zeros(N, G, dtype=torch.int32, device=device)
        layer.register_buffer("zero_point", zp)

    def quantize(self, layer, w):
        # zero columns up to whole groups: they leave every group's range (which always covers 0) unchanged
        K, Kp = layer.in_features, layer.padded_in_features
        wp = w if Kp == K else F.pad(w, (0, Kp - K))
        sym = layer.scheme.symmetric
        q, s, zp = quantize_affine(wp, layer.bits, layer.group_size, sym)
        self.set_codes(layer, q[:, :K], s, None if sym else zp)


class Int4Layout(_GroupedLayout):
    """uint8 ``[N, Kp/2]`` nibbles (pack_int4), run by int4_weight_only_mm (or int8_dynamic_int4_mm)."""

    name = "int4"
    ragged_x_on_cpu = True

    def codes_buffer(self, N, Kp, device):
        return torch.zeros(N, Kp // 2, dtype=torch.uint8, device=device)

    def unpack(self, qweight):
        return unpack_int4(qweight)

    def op_args(self, layer, b):
        return b["qweight"], b["scale"], b["zero_point"], layer._group, True

    def public_mm(self, layer, b, x):
        # Int4WeightOnly (W4A16) or Int8DynamicInt4Weight (W4A8): the same arguments
        fn = int8_dynamic_int4_mm if layer._op == "int8_dynamic_int4_mm" else int4_weight_only_mm
        return fn(x, b["qweight"], b["scale"], b["zero_point"], layer._group)


class Int8GroupedLayout(_GroupedLayout):
    """int8 ``[N, Kp]`` codes with groups / zero points: dequantize_affine + F.linear (exact, no fused kernel)."""

    name = "int8_grouped"
    gemm = False

    def codes_buffer(self, N, Kp, device):
        return torch.zeros(N, Kp, dtype=torch.int8, device=device)

    def mm(self, layer, b, x):
        # the buffers were checked when filled: the kernel straight on them where it runs, else the public op
        fn = compiled_op("dequantize_affine", x.device)
        w = None
        if fn is not None:
            try:
                w = fn(b["qweight"], b["scale"], b["zero_point"], layer._group, False, x.dtype)
            except Exception:  # noqa: BLE001  (dequantize_affine raises its Python-side error)
                w = None
        if w is None:
            w = dequantize_affine(b["qweight"], b["scale"], b["zero_point"], layer._group, out_dtype=x.dtype)
        return F.linear(x, w)


class Int8Layout(_IntLayout):
    """Per-channel symmetric int8 ``[N, K]`` with fp32 scales ``[N]``: int8_weight_only_mm / int8_dynamic_mm."""

    name = "int8"

    def init_buffers(self, layer, device):
        N, K = layer.out_features, layer.in_features
        layer.register_buffer("qweight", torch.zeros(N, K, dtype=torch.int8, device=device))
        layer.register_buffer("scale", torch.ones(N, dtype=torch.float32, device=device))
        layer.register_buffer("zero_point", None)

    def quantize(self, layer, w):
        q, s, _ = quantize_affine(w, 8, -1, True)
        self.set_codes(layer, q, s.reshape(-1), None)

    def op_args(self, layer, b):
        return b["qweight"], b["scale"]


# ---- fp8 / fp4 layouts -------------------------------------------------------------------------------------------
class _FloatLayout(Layout):
    family = "float"

    def quantize_checked(self, layer, w):
        if not bool(torch.isfinite(w).all()):
            # the fp8/fp4 casts would keep NaN (as a NaN code / NaN block scale): refuse, as quantize_affine does
            raise ValueError(f"linear.weight contains NaN or inf; cannot quantize it to {layer.scheme!r}")
        self.quantize(layer, w)

    def forward(self, layer, x):
        b = layer._buffers
        try:
            y = self.kernels(layer, b, x)
        except Exception:  # noqa: BLE001  (the checked path below raises the Python-side error)
            y = None
        if y is not None:
            return y
        K = layer.in_features
        if not _input_ok(x, K):
            check_input(x, K)
        if x.numel() == 0:  # no tokens: fp8_mm / fp4_mm reject empty operands (their scale grids cannot tile 0 rows)
            return x.new_zeros(*x.shape[:-1], layer.out_features)
        return self.mm(layer, b, x)

    def kernels(self, layer, b: dict, x: torch.Tensor):
        """The decode hot path: the forward as direct calls of the CPU kernels (:func:`qkernels.ops._call.cpu_op`)
        on x as it is and the buffers, checked when they were filled (the kernels check x and every buffer again,
        TORCH_CHECK; if one raises, the forward runs :meth:`mm`, whose public functions raise the Python-side
        error). None where the public functions must run: not on the CPU, a forced backend, torch.compile, or
        scales that ``.to(dtype)`` cast away from fp32."""
        raise NotImplementedError

    def mm(self, layer, b: dict, x: torch.Tensor) -> torch.Tensor:
        """The forward through the public functions (x checked, not empty)."""
        raise NotImplementedError

    def set_codes(self, layer, qweight, scale, global_scale):
        """QuantLinear.set_float_quantized (shapes and dtypes checked)."""
        N, K = layer.out_features, layer.in_features
        want, wdt = self.qweight_spec(N, K)
        if tuple(qweight.shape) != want or qweight.dtype not in wdt:
            names = " or ".join(str(d).replace("torch.", "") for d in wdt)
            raise ValueError(f"qweight must be {names} of shape {want} for {layer.scheme!r}, got {qweight.dtype} "
                             f"{tuple(qweight.shape)}")
        sshape = tuple(layer.scale.shape)
        scale = self.scale_codes(layer, scale, sshape)
        if tuple(scale.shape) != sshape:
            raise ValueError(f"scale must have shape {sshape} for {layer.scheme!r} on [{N}, {K}], got "
                             f"{tuple(scale.shape)}")
        _check_presence("global_scale", global_scale, layer)
        layer.qweight.copy_(qweight.view(torch.uint8))
        layer.scale.copy_(scale)
        if global_scale is not None:
            if global_scale.numel() != 1 or not global_scale.dtype.is_floating_point:
                raise ValueError(f"global_scale must be one float, got {global_scale.dtype} "
                                 f"{tuple(global_scale.shape)}")
            layer.global_scale.copy_(global_scale.float().reshape(()))

    def shard(self, layer, rank, world_size, dim):
        """Whole scale blocks per rank (per-tensor scales and the nvfp4 global scale are shared)."""
        N, K = layer.out_features, layer.in_features
        size = N if dim == 0 else K
        if size % world_size:
            name = "out_features" if dim == 0 else "in_features"
            raise ValueError(f"{name}={size} must be divisible by world_size={world_size}")
        n = size // world_size
        q, s = self.shard_codes(layer, rank, n, dim)
        if dim == 0:
            bias = None if layer.bias is None else layer.bias[rank * n:(rank + 1) * n]
        else:
            bias = layer.bias if (layer.bias is not None and rank == 0) else None
        return type(layer).from_float_codes(q.contiguous(), s.contiguous(), layer.scheme, bias, layer.global_scale)


class Fp8Layout(_FloatLayout):
    """uint8 ``[N, K]`` (float8_e4m3fn bits) with fp32 scales per channel / tensor / 128x128 block."""

    name = "fp8"

    @staticmethod
    def weight_args(scheme) -> tuple[str, object]:
        """quantize_fp8's granularity and block for the weight."""
        g = getattr(scheme, "granularity", "row")
        return (g, (FP8_BLOCK, FP8_BLOCK)) if g == "block" else (g, None)

    @staticmethod
    def act_args(scheme) -> tuple[str, object]:
        """quantize_fp8's granularity and block for the activations (Fp8Dynamic)."""
        g = scheme.granularity
        return (g, FP8_BLOCK) if g == "block" else (g, None)

    def init_buffers(self, layer, device):
        N, K = layer.out_features, layer.in_features
        g, _ = self.weight_args(layer.scheme)
        sshape = {"row": (N, 1), "tensor": (), "block": (N // FP8_BLOCK, K // FP8_BLOCK)}[g]
        layer.register_buffer("qweight", torch.zeros(N, K, dtype=torch.uint8, device=device))
        layer.register_buffer("scale", torch.ones(sshape, dtype=torch.float32, device=device))
        layer.register_buffer("zero_point", None)

    def backend_ctx(self, layer):
        if layer.op != "fp8_mm":
            return {}
        # what the forward passes (out_dtype: bf16, the usual activation dtype)
        return dict(a_dtype=FP8_WEIGHT_DTYPE, b_dtype=FP8_WEIGHT_DTYPE, granularity=layer.scheme.granularity,
                    K=layer.in_features, N=layer.out_features)

    def quantize(self, layer, w):
        gran, block = self.weight_args(layer.scheme)
        q, s = quantize_fp8(w, FP8_WEIGHT_DTYPE, gran, block if block is not None else 128)
        self.set_codes(layer, q, s, None)

    def qweight_spec(self, N, K):
        return (N, K), (FP8_WEIGHT_DTYPE, torch.uint8)

    def in_features_of(self, qweight):
        return qweight.shape[1]

    def scale_codes(self, layer, scale, sshape):
        N = layer.out_features
        if not scale.dtype.is_floating_point or scale.dtype.itemsize < 2:
            raise TypeError(f"scale must be float32/bfloat16/float16, got {scale.dtype}")
        if sshape == (N, 1) and tuple(scale.shape) == (N,):
            scale = scale.reshape(N, 1)
        if sshape == () and scale.numel() == 1:
            scale = scale.reshape(())
        return scale.float()

    def kernels(self, layer, b, x):
        scale, dev = b["scale"], x.device
        if scale.dtype is not torch.float32:
            return None
        if layer._op == "fp8_weight_only_mm":
            # x stays float; the weight is decoded inside the GEMM
            fn = cpu_op("fp8_weight_only_mm", dev)
            if fn is None:
                return None
            args = (b["qweight"], scale, FP8_WEIGHT_DTYPE, b["bias"])
            return fn(x, *args) if x.dim() == 2 else run_2d(fn, x, args)
        quant, mm = cpu_op("quantize_fp8", dev), cpu_op("fp8_mm", dev)
        if quant is None or mm is None:
            return None
        K = layer.in_features
        x2 = x if x.dim() == 2 else x.reshape(-1, K)
        gran = layer.scheme.granularity
        # quantize_fp8(x, granularity)'s activation blocks: a row, 1 x 128, or all of x (one amax)
        br, bc = (1, K) if gran == "row" else (1, FP8_BLOCK) if gran == "block" else (x2.shape[0], K)
        a_q, a_scale = quant(x2, None, FP8_WEIGHT_DTYPE, br, bc, True)
        y = mm(a_q, a_scale, FP8_WEIGHT_DTYPE, b["qweight"], scale if scale.dim() == 2 else scale.view(1, 1),
               FP8_WEIGHT_DTYPE, b["bias"], x.dtype)
        if x2 is not x:
            y = y.reshape(*x.shape[:-1], y.shape[-1])
        # W8A8: straight-through gradient for x through the rounding (decodes the weight in backward only)
        return autograd.activation_ste(x, y, lambda: self.dequantize(layer, torch.float32))

    def mm(self, layer, b, x):
        w, scale, bias = b["qweight"].view(FP8_WEIGHT_DTYPE), b["scale"], b["bias"]
        if layer._op == "fp8_weight_only_mm":
            # x stays float; the weight is decoded inside the GEMM (CPU) or by the cast kernel for cuBLAS (GPU)
            return fp8_weight_only_mm(x, w, scale, bias)
        gran, block = self.act_args(layer.scheme)
        a_q, a_scale = quantize_fp8(x, FP8_WEIGHT_DTYPE, gran, block if block is not None else 128)
        y = fp8_mm(a_q, a_scale, w, scale, x.dtype, bias)
        return autograd.activation_ste(x, y, lambda: self.dequantize(layer, torch.float32))

    def codes(self, layer):
        return layer.qweight.view(FP8_WEIGHT_DTYPE)

    def dequantize(self, layer, dtype):
        gran, block = self.weight_args(layer.scheme)
        return dequantize_fp8(self.codes(layer), layer.scale, dtype, gran, block)

    def shard_codes(self, layer, rank, n, dim):
        gran, _ = self.weight_args(layer.scheme)
        if gran == "block" and n % FP8_BLOCK:
            raise ValueError(f"shards of {n} must hold whole {FP8_BLOCK}x{FP8_BLOCK} scale blocks")
        q = self.codes(layer)
        sl = slice(rank * n, (rank + 1) * n)
        q = q[sl] if dim == 0 else q[:, sl]
        s = layer.scale
        if gran == "block":
            bs = slice(rank * n // FP8_BLOCK, (rank + 1) * n // FP8_BLOCK)
            s = s[bs] if dim == 0 else s[:, bs]
        elif gran == "row" and dim == 0:
            s = s[sl]
        return q, s


class Fp4Layout(_FloatLayout):
    """uint8 ``[N, K/2]`` e2m1 nibbles with uint8 block scales ``[N, K/B]`` (+ nvfp4's fp32 global scale)."""

    name = "fp4"

    def init_buffers(self, layer, device):
        N, K = layer.out_features, layer.in_features
        fmt = layer.scheme.format
        layer.register_buffer("qweight", torch.zeros(N, K // 2, dtype=torch.uint8, device=device))
        layer.register_buffer("scale", torch.zeros(N, K // FP4_BLOCK[fmt], dtype=torch.uint8, device=device))
        layer.register_buffer("zero_point", None)
        if fmt == "nvfp4":
            layer.register_buffer("global_scale", torch.ones((), dtype=torch.float32, device=device))

    def backend_ctx(self, layer):
        if layer.op != "fp4_mm":
            return {}
        return dict(format=layer.scheme.format, K=layer.in_features, N=layer.out_features)

    def quantize(self, layer, w):
        packed, s, g = quantize_fp4(w, layer.scheme.format)
        self.set_codes(layer, packed, s, g)

    def qweight_spec(self, N, K):
        return (N, K // 2), (torch.uint8,)

    def in_features_of(self, qweight):
        return 2 * qweight.shape[1]  # two e2m1 codes per byte

    def scale_codes(self, layer, scale, sshape):
        sdt = FP4_SCALE_DTYPES[layer.scheme.format]
        if scale.dtype not in (sdt, torch.uint8):
            raise TypeError(f"scale must be {str(sdt).replace('torch.', '')} (or its uint8 bits) for "
                            f"{layer.scheme!r}, got {scale.dtype}")
        return scale.view(torch.uint8)

    def kernels(self, layer, b, x):
        g, dev = b["global_scale"], x.device
        # the kernels' global scale: nvfp4's buffer (fp32 unless .to(dtype) cast it); mxfp4 has none: 1
        if g is None:
            g = unit_scale(dev)
        elif g.dtype is not torch.float32:
            return None
        fmt = layer.scheme.format
        if layer._op == "fp4_weight_only_mm":
            fn = cpu_op("fp4_weight_only_mm", dev)
            if fn is None:
                return None
            args = (b["qweight"], b["scale"], g, fmt, "e2m1", b["bias"])
            return fn(x, *args) if x.dim() == 2 else run_2d(fn, x, args)
        quant, mm = cpu_op("quantize_fp4", dev), cpu_op("fp4_mm", dev)
        if quant is None or mm is None:
            return None
        x2 = x if x.dim() == 2 else x.reshape(-1, layer.in_features)
        a_p, a_s, a_g = quant(x2, fmt, "e2m1", None)  # a_g: nvfp4's per-call tensor scale (1 for mxfp4)
        y = mm(a_p, a_s, a_g, b["qweight"], b["scale"], g, fmt, "e2m1", b["bias"], x.dtype)
        if x2 is not x:
            y = y.reshape(*x.shape[:-1], y.shape[-1])
        # W4A4: straight-through gradient for x through the rounding (decodes the weight in backward only)
        return autograd.activation_ste(x, y, lambda: self.dequantize(layer, torch.float32))

    def mm(self, layer, b, x):
        fmt = layer.scheme.format
        w, scale, g, bias = b["qweight"], b["scale"], b["global_scale"], b["bias"]
        if layer._op == "fp4_weight_only_mm":
            return fp4_weight_only_mm(x, w, scale, bias, format=fmt, w_global_scale=g)
        a_p, a_s, a_g = quantize_fp4(x, fmt)  # activations in the weight's format, nvfp4: per-call global scale
        y = fp4_mm(a_p, a_s, w, scale, x.dtype, bias, format=fmt, a_global_scale=a_g, b_global_scale=g)
        return autograd.activation_ste(x, y, lambda: self.dequantize(layer, torch.float32))

    def codes(self, layer):
        return layer.qweight

    def dequantize(self, layer, dtype):
        return dequantize_fp4(layer.qweight, layer.scale, layer.global_scale, layer.scheme.format, out_dtype=dtype)

    def shard_codes(self, layer, rank, n, dim):
        fmt = layer.scheme.format
        B = FP4_BLOCK[fmt]
        if dim == 1 and n % B:
            raise ValueError(f"row shards of {n} input features must hold whole {fmt} blocks of {B}")
        if dim == 0:
            sl = slice(rank * n, (rank + 1) * n)
            return layer.qweight[sl], layer.scale[sl]
        return layer.qweight[:, rank * n // 2:(rank + 1) * n // 2], layer.scale[:, rank * n // B:(rank + 1) * n // B]


LAYOUTS: dict[str, Layout] = {c.name: c() for c in (Int4Layout, Int8GroupedLayout, Int8Layout, Fp8Layout, Fp4Layout)}
