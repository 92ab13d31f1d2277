"""Quantization schemes: small frozen dataclasses that say how a ``Linear`` is quantized.

A scheme is a recipe (what to quantize, to which format, at which granularity), validated at construction with a
``ValueError`` naming the field, what was expected and what came. :meth:`Scheme.check_shape` says whether a layer of
a given shape can take the scheme (``quantize_`` skips, with a logged reason, the layers that cannot).

Integer schemes run on the integer ops (:func:`qkernels.int4_weight_only_mm`, :func:`qkernels.int8_weight_only_mm`,
:func:`qkernels.int8_dynamic_mm`, :func:`qkernels.int8_dynamic_int4_mm`); the fp8 / fp4 schemes on :func:`qkernels.fp8_weight_only_mm`, :func:`qkernels.fp8_mm`,
:func:`qkernels.fp4_weight_only_mm` and :func:`qkernels.fp4_mm` (see docs/float_formats.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar


def _check_int(name: str, cls: str, value, *, allow_minus_one: bool = False):
    ok = not isinstance(value, bool) and isinstance(value, int) and (value > 0 or (allow_minus_one and value == -1))
    if not ok:
        exp = "a positive int or -1 (per channel)" if allow_minus_one else "a positive int"
        raise ValueError(f"{cls}.{name} must be {exp}, got {value!r}")


def _check_bool(name: str, cls: str, value):
    if not isinstance(value, bool):
        raise ValueError(f"{cls}.{name} must be a bool, got {value!r}")


def _check_choice(name: str, cls: str, value, choices: tuple):
    if value not in choices:
        raise ValueError(f"{cls}.{name} must be one of {choices}, got {value!r}")


@dataclass(frozen=True)
class Scheme:
    """Base class. ``name`` identifies the scheme in saved quantization configs."""

    name: ClassVar[str] = "scheme"
    # Capabilities (what QuantLinear, qkernels.nn.layouts and the algorithms read instead of testing scheme types):
    # act_int8: activations rounded per token to int8 before the weight-only GEMM (a QAT simulation)
    act_int8: ClassVar[bool] = False

    @property
    def layout(self) -> str:
        """How a QuantLinear stores the weight: "int4", "int8" (per-channel, fused kernels), "int8_grouped", "fp8"
        or "fp4" (a key of :data:`qkernels.nn.layouts.LAYOUTS`)."""
        raise NotImplementedError(f"{type(self).__name__} does not name its layout")

    @property
    def op(self) -> str:
        """The qkernels op a QuantLinear's forward runs."""
        raise NotImplementedError(f"{type(self).__name__} does not name its op")

    @property
    def float_codes(self) -> bool:
        """True for fp8 / fp4 codes (QuantLinear.from_float_codes), False for integer codes (from_codes)."""
        return self.layout in ("fp8", "fp4")

    def check_shape(self, in_features: int, out_features: int) -> str | None:
        """None if a Linear ``[out_features, in_features]`` can take this scheme, else the reason it cannot."""
        if in_features <= 0 or out_features <= 0:
            return f"empty layer (in_features={in_features}, out_features={out_features})"
        return None

    def to_dict(self) -> dict:
        return {"scheme": self.name, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(d: dict) -> "Scheme":
        """Inverse of :meth:`to_dict`; unknown scheme names or fields raise ValueError."""
        if not isinstance(d, dict) or "scheme" not in d:
            raise ValueError(f"a scheme dict must have a 'scheme' key naming one of {sorted(SCHEMES)}, got {d!r}")
        d = dict(d)
        name = d.pop("scheme")
        if name not in SCHEMES:
            raise ValueError(f"scheme must be one of {sorted(SCHEMES)}, got {name!r}")
        cls = SCHEMES[name]
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ValueError(f"{cls.__name__} has no field(s) {unknown}; its fields are {sorted(fields)}")
        return cls(**d)


def padded_in_features(in_features: int, group_size: int) -> int:
    """``G * group_size`` with ``G = ceil(in_features / group_size)`` (``group_size=-1``: ``in_features``): the stored
    width of a grouped integer weight whose last group is ragged (see :class:`qkernels.nn.QuantLinear`)."""
    g = in_features if group_size == -1 else group_size
    return -(-in_features // g) * g


def _check_nibble_shape(in_features: int, group_size: int) -> str | None:
    """Grouped integer weights take any K (a last group of ``K % group_size`` columns is stored padded), but int4
    packs two values per byte, so the padded width must be even."""
    Kp = padded_in_features(in_features, group_size)
    if Kp % 2:
        what = f"in_features={in_features}" if Kp == in_features else \
            f"in_features={in_features} padded to whole groups of {group_size} ({Kp})"
        return f"{what} is odd (int4 packs two values per byte along K)"
    return None


@dataclass(frozen=True)
class Int4WeightOnly(Scheme):
    """W4A16: int4 weights in groups of ``group_size`` along K with fp32 scales (and int32 zero points when not
    ``symmetric``); activations stay float. Runs :func:`qkernels.int4_weight_only_mm`.

    group_size: positive int or -1 for one group per row. K need not be a multiple of it: the last group then
        covers ``K % group_size`` columns (GPTQ's ``g_idx = k // group_size``); the padded width must be even.
    bits: 2, 3 or 4: the codes lie in ``[-2^(bits-1), 2^(bits-1) - 1]``. 2- and 3-bit codes are a subset of int4,
        so they are stored in nibbles and run by the same kernel; ``bits`` records the grid (e.g. for a 3-bit GPTQ
        export and for the range check of the codes).
    """

    group_size: int = 128
    symmetric: bool = False
    bits: int = 4
    name: ClassVar[str] = "int4_weight_only"

    def __post_init__(self):
        _check_int("group_size", "Int4WeightOnly", self.group_size, allow_minus_one=True)
        _check_bool("symmetric", "Int4WeightOnly", self.symmetric)
        _check_choice("bits", "Int4WeightOnly", self.bits, (2, 3, 4))

    layout = property(lambda self: "int4", doc=Scheme.layout.__doc__)
    op = property(lambda self: "int4_weight_only_mm", doc=Scheme.op.__doc__)

    def __repr__(self):  # bits only when it is not the default, so reprs of 4-bit schemes stay as they were
        extra = "" if self.bits == 4 else f", bits={self.bits}"
        return f"Int4WeightOnly(group_size={self.group_size}, symmetric={self.symmetric}{extra})"

    def check_shape(self, in_features, out_features):
        return super().check_shape(in_features, out_features) or \
            _check_nibble_shape(in_features, self.group_size)


@dataclass(frozen=True)
class Int8DynamicInt4Weight(Scheme):
    """W4A8 ("8da4w"): the int4 weight of :class:`Int4WeightOnly` (same storage, same quantizers, same checkpoints'
    codes), with the activations rounded at run time to int8 per token and per weight group (symmetric, one scale
    per ``group_size`` columns), and exact integer products inside each group. Runs
    :func:`qkernels.int8_dynamic_int4_mm`: on AVX2 CPUs at decode sizes a u8 x s8 kernel that needs about half the
    instructions per weight of the W4A16 one (llama.cpp's Q4_0 x Q8_0 numerics, with one x scale per weight group
    instead of per 32). The cost: x loses precision (relative error up to ~1/254 of a group's largest |x|), which
    ``qkernels eval`` measures; W4A16 keeps x in float.
    """

    group_size: int = 128
    symmetric: bool = False
    bits: ClassVar[int] = 4
    name: ClassVar[str] = "int8_dynamic_int4_weight"

    def __post_init__(self):
        _check_int("group_size", "Int8DynamicInt4Weight", self.group_size, allow_minus_one=True)
        _check_bool("symmetric", "Int8DynamicInt4Weight", self.symmetric)

    layout = property(lambda self: "int4", doc=Scheme.layout.__doc__)
    op = property(lambda self: "int8_dynamic_int4_mm", doc=Scheme.op.__doc__)

    def check_shape(self, in_features, out_features):
        return super().check_shape(in_features, out_features) or \
            _check_nibble_shape(in_features, self.group_size)


@dataclass(frozen=True)
class Int8WeightOnly(Scheme):
    """W8A16: int8 weights, activations stay float.

    Default (``group_size=-1, symmetric=True``): per-output-channel symmetric scales, run by
    :func:`qkernels.int8_weight_only_mm`. Groups along K or zero points (as in 8-bit GPTQ checkpoints) are kept as
    int8 codes and run as :func:`qkernels.dequantize_affine` + ``F.linear`` (exact, but not a fused kernel).
    With groups, K need not be a multiple of ``group_size`` (the last group is ragged, as for :class:`Int4WeightOnly`).
    """

    group_size: int = -1
    symmetric: bool = True
    name: ClassVar[str] = "int8_weight_only"

    def __post_init__(self):
        _check_int("group_size", "Int8WeightOnly", self.group_size, allow_minus_one=True)
        _check_bool("symmetric", "Int8WeightOnly", self.symmetric)

    @property
    def fused(self) -> bool:
        """True when the fused W8A16 kernel runs it (per-channel symmetric)."""
        return self.group_size == -1 and self.symmetric

    layout = property(lambda self: "int8" if self.fused else "int8_grouped", doc=Scheme.layout.__doc__)
    op = property(lambda self: "int8_weight_only_mm" if self.fused else "dequantize_affine", doc=Scheme.op.__doc__)


@dataclass(frozen=True)
class Int8Dynamic(Scheme):
    """W8A8: per-channel symmetric int8 weights, activations quantized per token at run time (int32 accumulation).
    Runs :func:`qkernels.int8_dynamic_mm`."""

    name: ClassVar[str] = "int8_dynamic"
    layout = property(lambda self: "int8", doc=Scheme.layout.__doc__)
    op = property(lambda self: "int8_dynamic_mm", doc=Scheme.op.__doc__)


@dataclass(frozen=True)
class IntWeightInt8Act(Scheme):
    """W{bits}A8 as quantization-aware training simulates it (:func:`qkernels.qat.convert` of a scheme with
    ``act_int8_per_token``): ``bits``-bit integer weights in groups of ``group_size`` along K (ragged last group
    allowed, zero points unless ``symmetric``); at run time the activations are rounded per token to symmetric int8
    (:func:`qkernels.quantize_per_token_int8`) and decoded, then the weight-only GEMM runs on the same codes:
    :func:`qkernels.int4_weight_only_mm` for ``bits <= 4`` (stored as :class:`Int4WeightOnly`), int8 codes +
    :func:`qkernels.dequantize_affine` otherwise (stored as grouped :class:`Int8WeightOnly`). The outputs are those
    of the fake-quantized training forward exactly; it is a simulation (no integer W4A8 kernel). Per-channel symmetric
    8-bit weights with int8 activations can also run as :class:`Int8Dynamic` (the int8 x int8 kernel), whose outputs
    differ from the fake-quantized ones by float summation order.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    name: ClassVar[str] = "int_weight_int8_act"
    act_int8: ClassVar[bool] = True
    layout = property(lambda self: "int4" if self.bits <= 4 else "int8_grouped", doc=Scheme.layout.__doc__)
    op = property(lambda self: "int4_weight_only_mm" if self.bits <= 4 else "dequantize_affine", doc=Scheme.op.__doc__)

    def __post_init__(self):
        _check_choice("bits", "IntWeightInt8Act", self.bits, tuple(range(2, 9)))
        _check_int("group_size", "IntWeightInt8Act", self.group_size, allow_minus_one=True)
        _check_bool("symmetric", "IntWeightInt8Act", self.symmetric)

    def check_shape(self, in_features, out_features):
        why = super().check_shape(in_features, out_features)
        return why or (_check_nibble_shape(in_features, self.group_size) if self.bits <= 4 else None)


@dataclass(frozen=True)
class Fp8WeightOnly(Scheme):
    """W8A16 with fp8 e4m3fn weights and fp32 per-output-channel scales; activations stay float. Runs
    :func:`qkernels.fp8_weight_only_mm` (CPU: the weight decoded inside the GEMM; GPU: decoded to x's dtype for
    cuBLAS)."""

    name: ClassVar[str] = "fp8_weight_only"
    layout = property(lambda self: "fp8", doc=Scheme.layout.__doc__)
    op = property(lambda self: "fp8_weight_only_mm", doc=Scheme.op.__doc__)


@dataclass(frozen=True)
class Fp8Dynamic(Scheme):
    """W8A8 fp8 e4m3fn: fp32 weight scales per ``granularity`` ("row": per output channel, "tensor", "block": 128x128
    blocks as in DeepSeek-V3, arXiv:2412.19437); activations quantized at run time per token / per tensor / per 1x128
    block to match. Runs :func:`qkernels.fp8_mm` (``torch._scaled_mm`` where the GPU has fp8, see
    ``qkernels.explain("fp8_mm", device)``)."""

    granularity: str = "row"
    name: ClassVar[str] = "fp8_dynamic"
    layout = property(lambda self: "fp8", doc=Scheme.layout.__doc__)
    op = property(lambda self: "fp8_mm", doc=Scheme.op.__doc__)

    def __post_init__(self):
        _check_choice("granularity", "Fp8Dynamic", self.granularity, ("row", "tensor", "block"))

    def check_shape(self, in_features, out_features):
        why = super().check_shape(in_features, out_features)
        if why:
            return why
        if self.granularity == "block" and (in_features % 128 or out_features % 128):
            return f"block granularity needs in/out features divisible by 128, got {in_features}x{out_features}"
        return None


@dataclass(frozen=True)
class Fp4(Scheme):
    """W4A4 fp4 e2m1: ``mxfp4`` (OCP MX v1.0: 32-element blocks, e8m0 scales) or ``nvfp4`` (16-element blocks,
    e4m3fn scales + an fp32 tensor scale) weights; activations quantized at run time to the same format (nvfp4: with
    a per-call tensor scale). Runs :func:`qkernels.fp4_mm` (block-scaled ``torch._scaled_mm`` on sm100).

    ``weight_only=True`` (W4A16, e.g. llm-compressor's NVFP4A16 / MXFP4A16): activations stay float; runs
    :func:`qkernels.fp4_weight_only_mm`."""

    format: str = "nvfp4"
    weight_only: bool = False
    name: ClassVar[str] = "fp4"
    layout = property(lambda self: "fp4", doc=Scheme.layout.__doc__)
    op = property(lambda self: "fp4_weight_only_mm" if self.weight_only else "fp4_mm", doc=Scheme.op.__doc__)

    def __post_init__(self):
        _check_choice("format", "Fp4", self.format, ("mxfp4", "nvfp4"))
        _check_bool("weight_only", "Fp4", self.weight_only)

    def check_shape(self, in_features, out_features):
        why = super().check_shape(in_features, out_features)
        if why:
            return why
        block = 32 if self.format == "mxfp4" else 16
        if in_features % block:
            return f"in_features={in_features} is not divisible by the {self.format} block size {block}"
        return None


SCHEMES: dict[str, type[Scheme]] = {
    c.name: c for c in (Int4WeightOnly, Int8DynamicInt4Weight, Int8WeightOnly, Int8Dynamic, IntWeightInt8Act,
                        Fp8WeightOnly, Fp8Dynamic, Fp4)
}
