"""The minifloat element formats (fp8, and the 4-bit elements of MXFP4 / NVFP4): the one table of their parameters.

Every other copy is derived from :data:`FORMATS`: the fp8 dtypes and maxima of :mod:`qkernels.reference.float8`,
the fp4 element names of :mod:`qkernels.reference.float4` (and so of the public ops), the Triton encoder constants
and decode tables (qkernels/triton/float_cast.py). The C++ twin is ``QK_MINIFLOATS`` in
csrc/include/qkernels/float8.h (C++ cannot read this file); tests/test_format_tables.py checks that the C++ kernels
decode every code of every format to :meth:`MiniFloat.values` and name exactly these formats in their errors.

A code is: sign bit, then ``ebits`` exponent bits, then ``mbits`` mantissa bits; exponent field 0 is subnormal
(``mant * 2^(1 - bias - mbits)``), otherwise ``(1 + mant / 2^mbits) * 2^(exp - bias)``; the special codes:

* ``has_inf`` (e5m2): exponent all ones is inf (mantissa 0) or NaN, as in IEEE 754;
* ``fnuz`` (AMD/Graphcore e4m3fnuz / e5m2fnuz, MI300): 0x80 is the only NaN, there is no -0 and no inf;
* otherwise with ``has_nan`` (e4m3fn): all-ones magnitude is NaN;
* without NaN (the fp4 elements): every code is a finite value.

Sources: OCP 8-bit Floating Point Specification (OFP8) rev 1.0 (2023) for e4m3fn / e5m2; OCP Microscaling Formats
(MX) Specification v1.0 (2023) sec. 5.3.3 for e2m1; e1m2 is an emulated format (see reference/float4.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MiniFloat:
    """One element format. ``id``: the C++ ``MiniFloatId`` (float8.h), which the CUDA launchers take;
    ``max_code``: magnitude bits of the largest finite value; ``dtype``: torch's dtype, None for the fp4 elements
    (they travel as packed uint8 nibbles)."""

    name: str
    id: int
    ebits: int
    mbits: int
    bias: int
    has_inf: bool
    fnuz: bool
    has_nan: bool
    max_code: int
    dtype: torch.dtype | None = None

    @property
    def bits(self) -> int:
        return 1 + self.ebits + self.mbits

    @property
    def emax(self) -> int:
        """Exponent of the largest finite value (2 for e2m1)."""
        return (self.max_code >> self.mbits) - self.bias

    def value(self, code: int) -> float:
        """The value of ``code`` (as float8.h ``minifloat_to_float``); NaN / +-inf for the special codes (a NaN keeps
        the code's sign bit, except fnuz's 0x80)."""
        nbits = self.ebits + self.mbits
        sign = -1.0 if (code >> nbits) & 1 else 1.0
        mag = code & ((1 << nbits) - 1)
        exp, mant = mag >> self.mbits, mag & ((1 << self.mbits) - 1)
        if self.fnuz:
            if code == 0x80:
                return float("nan")
        elif self.has_inf:
            if exp == (1 << self.ebits) - 1:
                return math.copysign(float("nan"), sign) if mant else sign * float("inf")
        elif self.has_nan and mag == (1 << nbits) - 1:
            return math.copysign(float("nan"), sign)
        if exp == 0:
            return sign * mant * 2.0 ** (1 - self.bias - self.mbits)
        return sign * (1 + mant / 2**self.mbits) * 2.0 ** (exp - self.bias)

    def values(self) -> torch.Tensor:
        """fp32 ``[2^bits]``: the value of every code (a decode table)."""
        return torch.tensor([self.value(c) for c in range(1 << self.bits)], dtype=torch.float32)

    @property
    def max(self) -> float:
        return self.value(self.max_code)


FORMATS = (
    MiniFloat("float8_e4m3fn", 0, 4, 3, 7, False, False, True, 0x7E, torch.float8_e4m3fn),  # max 448
    MiniFloat("float8_e5m2", 1, 5, 2, 15, True, False, True, 0x7B, torch.float8_e5m2),  # max 57344
    MiniFloat("float8_e4m3fnuz", 2, 4, 3, 8, False, True, True, 0x7F, torch.float8_e4m3fnuz),  # max 240
    MiniFloat("float8_e5m2fnuz", 3, 5, 2, 16, False, True, True, 0x7F, torch.float8_e5m2fnuz),  # max 57344
    MiniFloat("e2m1", 4, 2, 1, 1, False, False, False, 0x7),  # max 6
    MiniFloat("e1m2", 5, 1, 2, 0, False, False, False, 0x7),  # max 3.5
)
BY_NAME = {f.name: f for f in FORMATS}
BY_DTYPE = {f.dtype: f for f in FORMATS if f.dtype is not None}
FP8 = tuple(f for f in FORMATS if f.dtype is not None)
FP4_ELEMENTS = tuple(f for f in FORMATS if f.bits == 4)


def fmt(key) -> MiniFloat:
    """The format of a torch fp8 dtype or an element name ("e2m1")."""
    if isinstance(key, torch.dtype):
        if key not in BY_DTYPE:
            raise ValueError(f"dtype must be one of {tuple(BY_DTYPE)}, got {key}")
        return BY_DTYPE[key]
    if key not in BY_NAME:
        raise ValueError(f"format must be one of {tuple(BY_NAME)}, got {key!r}")
    return BY_NAME[key]
