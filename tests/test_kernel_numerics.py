"""Every CPU GEMM path against the reference on extreme magnitudes, subnormals and inf/NaN (issue: fast paths must
not overflow, lose subnormal bits or turn +-inf into NaN where the reference does not; csrc/cpu/row_guard.h).

Paths: the AVX2 register kernels (M = 1 and 3; int16 activations for bf16 x, and with QKERNELS_CPU_I16=0 the fp32
kernels on bf16 x; the 32-k int4 decode with QKERNELS_CPU_W4_K64=0), the dequantize + sgemm path (M = 40, above
every small-M threshold) and the portable loops (QKERNELS_CPU_ISA=scalar). Scenarios: tests/numerics_cases.py.
"""

from __future__ import annotations

import pytest
import torch

import qkernels
from hypothesis import given, settings
from hypothesis import strategies as st

from .conftest import GEMM_RTOL_TABLE
from .numerics_cases import SCENARIOS, assert_like_reference, make_x, op_pair, weight_magnitude

# (op, variant kwargs, tolerance family)
OPS = [
    ("int4_weight_only_mm", dict(signed=True, zp=True), "int"),
    ("int4_weight_only_mm", dict(signed=False, zp=False), "int"),
    ("int4_weight_only_mm", dict(signed=True, zp=False, group=32), "int"),
    ("int8_weight_only_mm", {}, "int"),
    ("int8_dynamic_mm", {}, "int"),
    ("fp8_weight_only_mm", dict(gran="tensor"), "float"),
    ("fp8_weight_only_mm", dict(gran="row", dtype=torch.float8_e5m2), "float"),
    ("fp8_weight_only_mm", dict(gran="block"), "float"),
    ("fp4_weight_only_mm", dict(format="mxfp4"), "float"),
    ("fp4_weight_only_mm", dict(format="nvfp4"), "float"),
    ("fp8_mm", {}, "float"),
    ("fp4_mm", dict(format="nvfp4"), "float"),
    ("fp4_mm", dict(format="mxfp4"), "float"),
    ("gguf_mm", dict(type="Q8_0"), "int"),
    ("gguf_mm", dict(type="Q4_K"), "int"),
]
OP_IDS = [op + "-" + "-".join(f"{v}" for v in kw.values()) for op, kw, _ in OPS]

# name -> (environment, M)
PATHS = {
    "avx2-m1": ({}, 1),
    "avx2-m3": ({}, 3),
    "avx2-fp32-kernels": ({"QKERNELS_CPU_I16": "0"}, 3),
    "avx2-int4-k32": ({"QKERNELS_CPU_W4_K64": "0"}, 3),
    "sgemm-m40": ({}, 40),
    "scalar": ({"QKERNELS_CPU_ISA": "scalar"}, 3),
}
K = 256


def _run_path(monkeypatch, path):
    env, M = PATHS[path]
    for k in ("QKERNELS_CPU_ISA", "QKERNELS_CPU_I16", "QKERNELS_CPU_W4_K64"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    want = "scalar" if env.get("QKERNELS_CPU_ISA") == "scalar" else "avx2"
    assert torch.ops.qkernels.cpu_isa() == want, f"path {path} needs an AVX2 CPU"
    return M


def _check(op, kw, family, scenario, dtype, M, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = make_x(M, K, scenario, dtype, gen)
    fn = op_pair(op, x, weight_magnitude(scenario), gen, **kw)
    out_dtype = torch.float32 if op in ("fp8_mm", "fp4_mm") else dtype
    rtol = GEMM_RTOL_TABLE[family][out_dtype]
    assert_like_reference(fn("cpu"), fn("reference"), rtol, f"{op} {kw} {scenario} {dtype} M={M}")


def _paths(op, dtype):
    """The paths that run different code for this op and x dtype."""
    if op == "gguf_mm":
        return ["avx2-m3", "sgemm-m40"]  # dequantize + sgemm at every M and ISA
    if op == "int8_dynamic_mm":
        return ["avx2-m1", "avx2-m3", "scalar"]
    paths = ["avx2-m1", "avx2-m3", "sgemm-m40", "scalar"]
    if dtype != torch.float32 and op in ("int4_weight_only_mm", "int8_weight_only_mm", "fp4_weight_only_mm"):
        paths.append("avx2-fp32-kernels")  # bf16 x: the int16-activation kernels by default, these with I16=0
    if op == "int4_weight_only_mm":
        paths.append("avx2-int4-k32")
    return paths


def _params(dtypes, scenarios, ops=OPS):
    out = []
    for dtype in dtypes:
        for (op, kw, family), oid in zip(ops, OP_IDS):
            if op in ("fp8_mm", "fp4_mm") and dtype != torch.float32:
                continue  # x is quantized first: one activation dtype covers them
            for path in _paths(op, dtype):
                for sc in scenarios:
                    out.append(pytest.param(op, kw, family, path, sc, dtype,
                                            id=f"{oid}-{path}-{sc}-{str(dtype)[6:]}"))
    return out


@pytest.mark.parametrize("op,kw,family,path,scenario,dtype", _params([torch.float32, torch.bfloat16], SCENARIOS))
def test_gemm_matches_reference_on_extremes(monkeypatch, op, kw, family, path, scenario, dtype):
    _check(op, kw, family, scenario, dtype, _run_path(monkeypatch, path))


# fp16 x: no extreme magnitudes (its range ends at 65504), but inf / NaN rows go through the same guard
@pytest.mark.parametrize("op,kw,family,path,scenario,dtype", _params([torch.float16], ["normal", "inf", "nan"]))
def test_gemm_fp16_specials_match_reference(monkeypatch, op, kw, family, path, scenario, dtype):
    _check(op, kw, family, scenario, dtype, _run_path(monkeypatch, path))


def test_int4_issue_example_huge_weights_tiny_x():
    # the issue's example: weights ~1e38 (scale huge), x ~1e-30; finite exact result
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 256, generator=gen) * 1e-30
    q = torch.randint(-8, 8, (8, 256), generator=gen).to(torch.int8)
    pw, s = qkernels.pack_int4(q), torch.full((8, 2), 1e38 / 8)
    out = qkernels.int4_weight_only_mm(x, pw, s, None, 128, backend="cpu")
    ref = qkernels.int4_weight_only_mm(x, pw, s, None, 128, backend="reference")
    assert torch.isfinite(ref).all()
    assert_like_reference(out, ref, GEMM_RTOL_TABLE["int"][torch.float32])


@settings(max_examples=40, deadline=None)
@given(op_i=st.integers(0, len(OPS) - 1), xe=st.integers(-44, 37), we=st.integers(-36, 34),
       special=st.sampled_from([None, "inf", "nan"]), m=st.sampled_from([1, 2, 5, 33]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_gemm_fuzz_magnitudes(op_i, xe, we, special, m, dtype, seed):
    # random exponents of x and of the weights (AVX2 default paths; M picks register kernel or sgemm)
    op, kw, family = OPS[op_i]
    if op in ("fp8_mm", "fp4_mm"):
        dtype = torch.float32
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, K, generator=gen, dtype=torch.float64) * 10.0**xe).to(dtype)
    if special:
        x[0, seed % K] = float(special)
    fn = op_pair(op, x, 10.0**we, gen, **kw)
    out_dtype = torch.float32 if op in ("fp8_mm", "fp4_mm") else dtype
    abs_terms = None
    if op.endswith("weight_only_mm"):
        # the same weights (same generator draws after x's) applied to the identity give W^T exactly (one product
        # per output); |x| @ |W|^T in fp64 is the scale of fp32 accumulation's error where a sum cancels
        gen2 = torch.Generator().manual_seed(seed)
        torch.randn(m, K, generator=gen2, dtype=torch.float64)
        wt = op_pair(op, torch.eye(K), 10.0**we, gen2, **kw)("reference").double()
        abs_terms = x.double().abs().nan_to_num(posinf=0.0) @ wt.abs().nan_to_num(posinf=0.0)
    assert_like_reference(fn("cpu"), fn("reference"), GEMM_RTOL_TABLE[family][out_dtype],
                          f"{op} {kw} x~1e{xe} w~1e{we} {special} M={m} {dtype}", abs_terms)
