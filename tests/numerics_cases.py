"""Extreme-magnitude, subnormal and inf/NaN inputs for every GEMM op, and the comparison with the reference that the
kernels must pass (finiteness pattern, NaN pattern, infinities with their sign, values): shared by the CPU tests
(tests/test_kernel_numerics.py) and the Triton interpreter cases (tests/triton_interpret_numerics_cases.py).

A scenario scales random activations and weights so that the exact result is finite (fp32 paths must not overflow
or flush on the way), lies in the subnormal range, or overflows; or puts +-inf / NaN into some rows of x.
"""

from __future__ import annotations

import torch

import qkernels

# name -> (x magnitude, weight magnitude, special): the exact results of the first ones are finite
SCENARIOS = {
    "normal": (1.0, 1.0, None),
    "x_tiny_w_huge": (1e-30, 1e30, None),  # x * 2^-E and the weight scales multiplied in fp32 would overflow
    "x_huge": (3e35, 1e-2, None),  # |x| >= ~3e35: fp32 sums of x * code overflow before the scale
    "x_huge_w_tiny": (1e34, 1e-30, None),
    "x_subnormal": (1e-41, 1.0, None),  # x below fp32's normal range: kernels that scale x lose its bits
    "x_subnormal_w_huge": (1e-41, 1e30, None),
    "w_huge": (1.0, 1e34, None),
    "w_tiny": (1.0, 1e-36, None),
    "overflow": (3e37, 1e6, None),  # the exact results overflow fp32: +-inf as in the reference
    "inf": (1.0, 1.0, "inf"),
    "nan": (1.0, 1.0, "nan"),
}


def make_x(M: int, K: int, scenario: str, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    xm, _, special = SCENARIOS[scenario]
    x = torch.randn(M, K, generator=gen, dtype=torch.float64) * xm
    if special == "inf":
        x[0, 3] = float("inf")  # row 0: one +inf (zero weights in its column make NaN, the reference too)
        if M > 1:
            x[1, 5], x[1, 6] = float("-inf"), float("-inf")
        if M > 2:
            x[2, 1], x[2, 2] = float("inf"), float("-inf")  # inf - inf: NaN
    elif special == "nan":
        x[0, 2] = float("nan")
    return x.to(dtype)


def weight_magnitude(scenario: str) -> float:
    return SCENARIOS[scenario][1]


# ---- the ops, as (kernel call, reference call) pairs on one set of operands ----------------------------------------


def int4_operands(N, K, group, signed, zp, wm, gen):
    lo, hi, dt = (-8, 8, torch.int8) if signed else (0, 16, torch.uint8)
    q = torch.randint(lo, hi, (N, K), generator=gen).to(dt)
    scale = (torch.rand(N, K // group, generator=gen) + 0.5) * wm
    z = torch.randint(-3, 4, (N, K // group), generator=gen, dtype=torch.int32) if zp else None
    return qkernels.pack_int4(q), scale, z


def int8_operands(N, K, wm, gen):
    q = torch.randint(-127, 128, (N, K), generator=gen).to(torch.int8)
    return q, (torch.rand(N, generator=gen) + 0.5) * wm / 127


def float_weight(N, K, wm, gen):
    return torch.randn(N, K, generator=gen) * wm


def op_pair(op: str, x: torch.Tensor, wm: float, gen: torch.Generator, **kw):
    """(fn(backend) -> output of ``op`` on x and operands drawn with weight magnitude wm). kw picks variants."""
    N, K = kw.get("N", 16), x.shape[1]
    if op == "int4_weight_only_mm":
        group, signed, zp = kw.get("group", 64), kw.get("signed", True), kw.get("zp", True)
        pw, s, z = int4_operands(N, K, group, signed, zp, wm, gen)
        return lambda b: qkernels.int4_weight_only_mm(x, pw, s, z, group, signed=signed, backend=b)
    if op == "int8_weight_only_mm":
        q, s = int8_operands(N, K, wm, gen)
        return lambda b: qkernels.int8_weight_only_mm(x, q, s, backend=b)
    if op == "int8_dynamic_mm":
        q, s = int8_operands(N, K, wm, gen)
        return lambda b: qkernels.int8_dynamic_mm(x, q, s, backend=b)
    if op == "fp8_weight_only_mm":
        wq, ws = qkernels.quantize_fp8(float_weight(N, K, wm, gen), kw.get("dtype", torch.float8_e4m3fn),
                                       kw.get("gran", "row"), 64)
        return lambda b: qkernels.fp8_weight_only_mm(x, wq, ws, backend=b)
    if op == "fp4_weight_only_mm":
        fmt = kw.get("format", "mxfp4")
        wp, ws, g = qkernels.quantize_fp4(float_weight(N, K, wm, gen), fmt)
        return lambda b: qkernels.fp4_weight_only_mm(x, wp, ws, format=fmt, w_global_scale=g, backend=b)
    if op == "fp8_mm":
        # x quantized per row (inf / NaN rows: NaN scales, so NaN rows in both), the weight per row
        aq, as_ = qkernels.quantize_fp8(x.float(), torch.float8_e4m3fn, "row")
        wq, ws = qkernels.quantize_fp8(float_weight(N, K, wm, gen), torch.float8_e5m2, "row")
        return lambda b: qkernels.fp8_mm(aq, as_, wq, ws, torch.float32, backend=b)
    if op == "fp4_mm":
        fmt = kw.get("format", "nvfp4")
        ap, as_, ag = qkernels.quantize_fp4(x.float(), fmt)
        wp, ws, wg = qkernels.quantize_fp4(float_weight(N, K, wm, gen), fmt)
        return lambda b: qkernels.fp4_mm(ap, as_, wp, ws, torch.float32, format=fmt, a_global_scale=ag,
                                         b_global_scale=wg, backend=b)
    if op == "gguf_mm":
        t = kw.get("type", "Q8_0")
        data = qkernels.gguf.quantize(float_weight(N, K, min(wm, 1e4), gen), t)
        return lambda b: qkernels.gguf_mm(x, data, t, N, K, backend=b)
    raise ValueError(op)


def tiny(dtype: torch.dtype) -> float:
    """The smallest subnormal of dtype: outputs in the subnormal range may differ by a few of these (the kernels
    round to fp32 first, then to dtype)."""
    return {torch.float32: 2.0**-149, torch.bfloat16: 2.0**-133, torch.float16: 2.0**-24}[dtype]


def assert_like_reference(out: torch.Tensor, ref: torch.Tensor, rtol: float, what: str = "", abs_terms=None):
    """Same NaN pattern, same infinities (with sign), and finite values within rtol relative to the norm of the finite
    reference entries, plus a few subnormal ulps. Where the reference overflows somewhere, the terms of the sums are
    near fp32's largest number, and a finite entry next to them may be what is left after cancellation: its fp32
    error is relative to the terms (rtol * FLT_MAX per entry), not to itself. ``abs_terms`` (``|x| @ |W|^T`` in
    fp64, same shape as ref), where given, bounds that error instead: the terms can exceed FLT_MAX (the kernels
    rescale such rows of x), and fp32 accumulation is accurate relative to the sum of the terms' magnitudes."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, what
    assert torch.equal(torch.isnan(out), torch.isnan(ref)), (
        f"{what}: NaN pattern differs at {torch.nonzero(torch.isnan(out) != torch.isnan(ref))[:8].tolist()}")
    inf = torch.isinf(ref)
    assert torch.equal(torch.isinf(out), inf), (
        f"{what}: inf pattern differs at {torch.nonzero(torch.isinf(out) != inf)[:8].tolist()}")
    assert torch.equal(out[inf], ref[inf]), f"{what}: infinities of the other sign"
    fin = torch.isfinite(ref)
    if fin.any():
        o, r = out[fin].double(), ref[fin].double()
        err = (o - r).abs()
        bound = rtol * r.norm() + 4 * tiny(ref.dtype)
        if abs_terms is not None:
            bound = bound + rtol * abs_terms[fin].double().norm()
        elif torch.isinf(ref).any():
            bound = bound + rtol * torch.finfo(torch.float32).max * fin.sum().item() ** 0.5
        assert err.norm() <= bound, f"{what}: ||out - ref|| = {err.norm():.3g} > {bound:.3g} (||ref|| {r.norm():.3g})"
