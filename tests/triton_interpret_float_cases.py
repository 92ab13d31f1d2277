"""Triton fp8 / fp4 cast kernels (qkernels/triton/float_cast.py) against the reference, bit for bit, on CPU under
TRITON_INTERPRET=1. Run by tests/test_triton.py in the same subprocess as tests/triton_interpret_cases.py (see that
file for why a subprocess); not collected on its own."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - only when someone runs this file by hand
    pytest.skip("run through tests/test_triton.py (needs TRITON_INTERPRET=1 before triton is imported)",
                allow_module_level=True)

pytest.importorskip("triton")

import qkernels  # noqa: E402
from qkernels import reference as ref  # noqa: E402
from qkernels import triton as qtriton  # noqa: E402
from qkernels.triton.int_gemm import INTERPRET_CONFIG  # noqa: E402

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _edge_values() -> torch.Tensor:
    """Random magnitudes across the fp8/fp4 ranges plus ties, overflow thresholds, subnormals, +-0, inf, NaN."""
    special = [0.0, -0.0, 448.0, 464.0, -464.0, 465.0, 240.0, 248.0, 57344.0, 61440.0, -1e9, 2.0**-9, 2.0**-10,
               3 * 2.0**-11, 2.0**-17, -(2.0**-16), 1e-40, -1e-45, 0.25, 0.75, 1.25, 2.5, 5.0, 7.0, 3.25, 3.75,
               float("inf"), float("-inf"), float("nan"), -float("nan")]
    rnd = torch.randn(226) * torch.exp2(torch.randint(-18, 18, (226,)).float())
    return torch.cat([torch.tensor(special), rnd])


def _bits_equal(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.dtype == torch.uint8
                                                                     else a, b)


def _same_float(a, b):
    """Equal values, NaN where the other is NaN (NaN payloads are not specified)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
        torch.nan_to_num(a.double(), nan=0.0), torch.nan_to_num(b.double(), nan=0.0))


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("saturate", [True, False])
def test_fp8_cast_all_edges_bit_exact(dtype, saturate):
    x = _edge_values().reshape(1, -1)
    scale = torch.ones(1, 1)
    q, s = qtriton.get("quantize_fp8")(x, scale, dtype, 1, x.shape[1], saturate)
    q_ref, s_ref = ref.OPS["quantize_fp8"](x, scale, dtype, 1, x.shape[1], saturate)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)


def test_fp8_cast_every_code_round_trips():
    for dtype in FP8:
        vals = torch.arange(256, dtype=torch.uint8).view(dtype).float().reshape(4, 64)
        q, _ = qtriton.get("quantize_fp8")(vals, torch.ones(1, 1), dtype, 4, 64, False)
        assert torch.equal(q, ref.OPS["quantize_fp8"](vals, torch.ones(1, 1), dtype, 4, 64, False)[0]), dtype


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,blocks", [((5, 48), (5, 48)), ((7, 33), (1, 33)), ((6, 64), (1, 16)),
                                          ((8, 48), (4, 16)), ((3, 5), (3, 5))])
def test_quantize_dequantize_fp8_blocks(xdtype, shape, blocks):
    x = (torch.randn(shape) * 30).to(xdtype)
    x[0, 0] = float("nan")
    x[-1, -1] = 1e-39  # an fp32/bf16 subnormal
    if shape[0] > 2:
        x[2] = 0.0  # an all-zero row: scale 1 for row blocks
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2fnuz):
        q, s = qtriton.get("quantize_fp8")(x, None, dtype, *blocks, True)
        q_ref, s_ref = ref.OPS["quantize_fp8"](x, None, dtype, *blocks, True)
        assert torch.equal(s, s_ref) and torch.equal(q, q_ref), dtype
        for out_dtype in OUT_DTYPES:
            got = qtriton.get("dequantize_fp8")(q, s, dtype, *blocks, out_dtype)
            assert _same_float(got, ref.OPS["dequantize_fp8"](q_ref, s_ref, dtype, *blocks, out_dtype)), out_dtype


@pytest.mark.parametrize("element", ["e2m1", "e1m2"])
def test_fp4_encode_decode_bit_exact(element):
    x = _edge_values().reshape(2, -1)
    got = qtriton.get("fp4_encode")(x, element)
    assert torch.equal(got, ref.OPS["fp4_encode"](x, element))
    for out_dtype in OUT_DTYPES:
        assert torch.equal(qtriton.get("fp4_decode")(got, element, out_dtype),
                           ref.OPS["fp4_decode"](got, element, out_dtype)), out_dtype


def test_fp4_encode_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    import numpy as np

    x = _edge_values()
    x = x[torch.isfinite(x)][:64]
    codes = np.asarray(x.numpy().astype(ml_dtypes.float4_e2m1fn).view(np.uint8)) & 0xF
    got = qtriton.get("fp4_encode")(x, "e2m1")
    want = torch.from_numpy(codes[0::2] | (codes[1::2] << 4))
    assert torch.equal(got, want)


@pytest.mark.parametrize("format", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("element", ["e2m1", "e1m2"])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_quantize_dequantize_fp4_blocks(format, element, xdtype):
    B = ref.float4.FORMATS[format]
    x = (torch.randn(9, 4 * B) * torch.exp2(torch.randint(-20, 20, (9, 1)).float())).to(xdtype)
    x[1, :B] = 0.0  # all-zero block
    x[2, 3] = float("inf")  # non-finite block -> NaN scale, zero codes
    x[3, B + 1] = float("nan")
    x[4, :B] = 1e-30  # tiny block: NVFP4 scale rounds to 0
    x[5, 2 * B:3 * B] = 1e-39  # fp32 subnormal amax
    for g in (None, torch.tensor(0.37)):
        got = qtriton.get("quantize_fp4")(x, format, element, g)
        want = ref.OPS["quantize_fp4"](x, format, element, g)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        for out_dtype in OUT_DTYPES:
            d = qtriton.get("dequantize_fp4")(*got, format, element, out_dtype)
            assert _same_float(d, ref.OPS["dequantize_fp4"](*want, format, element, out_dtype)), out_dtype


def test_public_api_forced_triton_casts():
    x = torch.randn(4, 2, 64)[:, 1, :]  # non-contiguous
    q, s = qkernels.quantize_fp8(x, granularity="row", backend="triton")
    q_ref, s_ref = qkernels.quantize_fp8(x, granularity="row", backend="reference")
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    assert torch.equal(qkernels.dequantize_fp8(q, s, backend="triton"), qkernels.dequantize_fp8(q, s))
    p, sc, g = qkernels.quantize_fp4(x, "nvfp4", backend="triton")
    p_ref, sc_ref, g_ref = qkernels.quantize_fp4(x, "nvfp4", backend="reference")
    assert torch.equal(p, p_ref) and torch.equal(sc, sc_ref) and torch.equal(g, g_ref)
    assert qkernels.explain("quantize_fp4", "cpu", backend="triton").backend == "triton"


# ---- W8A8 (qkernels/triton/int8_dynamic.py): bit-identical to the C++ CPU kernel -----------------------------------


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 24, 64), (19, 70, 100)])
def test_w8a8_matches_cpu_kernel(xdtype, M, N, K):
    x = (torch.randn(M, K) * 3).to(xdtype)
    x[0, :] = 0.0  # all-zero row: scale 1
    if M > 2:
        x[2, 7] = float("inf")  # non-finite row: NaN scale, zero codes, NaN outputs
        x[1, 3] = 1e-39
    q_w = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    w_s = torch.rand(N) * 0.01 + 1e-3
    q, s = qtriton.get("quantize_per_token_int8")(x)
    q_ref, s_ref = ref.OPS["quantize_per_token_int8"](x)
    assert torch.equal(q, q_ref) and torch.equal(torch.isnan(s), torch.isnan(s_ref))
    assert torch.equal(torch.nan_to_num(s), torch.nan_to_num(s_ref))
    out = qtriton.get("int8_dynamic_mm")(x, q_w, w_s)
    assert out.dtype == xdtype
    if qkernels._ext.has_kernel("int8_dynamic_mm", "CPU"):
        cpu = torch.ops.qkernels.int8_dynamic_mm(x, q_w, w_s)
        assert torch.equal(torch.isnan(out), torch.isnan(cpu)) and torch.equal(torch.nan_to_num(out),
                                                                              torch.nan_to_num(cpu))
    want = ref.OPS["int8_dynamic_mm"](x, q_w, w_s)
    finite = torch.isfinite(want)
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert rel_err(out[finite], want[finite]) < {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[xdtype]


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,g", [(1, 24, 128, 64), (5, 18, 256, 128)])
def test_w4a8_composite_matches_reference(xdtype, M, N, K, g):
    """int8_dynamic_int4_mm's Triton path: the per-group int8 codes of the reference exactly, then the W4A16 kernel
    on the dequantized codes (fp32)."""
    x = (torch.randn(M, K) * 3).to(xdtype)
    x[0, g:] = 0.0  # an all-zero group: scale 1
    if M > 2:
        x[2, 7] = float("inf")  # a non-finite row: NaN scales, zero codes, NaN outputs
    from qkernels.reference.int_gemm import quantize_per_group_int8 as quantize_ref
    from qkernels.triton.int8_dynamic import quantize_per_group_int8

    q, s = quantize_per_group_int8(x, g)
    q_ref, s_ref = quantize_ref(x, g)
    assert torch.equal(q, q_ref) and torch.equal(torch.isnan(s), torch.isnan(s_ref))
    assert torch.equal(torch.nan_to_num(s), torch.nan_to_num(s_ref))
    packed = ref.OPS["pack_int4"](torch.randint(-8, 8, (N, K), dtype=torch.int8))
    scale = torch.rand(N, K // g) * 0.1 + 0.01
    zp = torch.randint(-8, 17, (N, K // g), dtype=torch.int32)
    out = qtriton.get("int8_dynamic_int4_mm")(x, packed, scale, zp, g, True)
    want = ref.OPS["int8_dynamic_int4_mm"](x, packed, scale, zp, g, True)
    assert out.dtype == xdtype and torch.equal(torch.isnan(out), torch.isnan(want))
    finite = torch.isfinite(want)
    assert rel_err(out[finite], want[finite]) < {torch.float32: 1e-5, torch.bfloat16: 8e-3}[xdtype]


from tests.conftest import rel_err  # noqa: E402


# ---- weight-only GEMMs (qkernels/triton/float_gemm.py) ------------------------------------------------------------
INTERPRET_SPLIT1 = dict(INTERPRET_CONFIG, SPLIT_K=1)
WO_RTOL = {torch.float32: 1e-5, torch.float16: 4e-3}  # fp16: the weight is rounded to x's dtype for the dot, then
# the result once more


# bf16 x runs on GPUs only: the interpreter's dot does not take bf16 operands (as for the integer kernels)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,N,K,blocks", [(1, 40, 64, (40, 64)), (3, 24, 96, (1, 96)), (5, 32, 64, (8, 32)),
                                          (17, 20, 48, (4, 16))])
def test_fp8_weight_only_mm(xdtype, M, N, K, blocks):
    x = torch.randn(M, K).to(xdtype)
    w = torch.randn(N, K) * 0.1
    bias = torch.randn(N)
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2fnuz):
        q, s = ref.OPS["quantize_fp8"](w, None, dtype, *blocks, True)
        want = ref.OPS["fp8_weight_only_mm"](x.double(), q, s, dtype, bias)
        for config in (None, dict(INTERPRET_SPLIT1)):  # split-K (atomics) and one program per output tile
            out = qtriton.get("fp8_weight_only_mm")(x, q, s, dtype, bias, config=config)
            assert out.dtype == xdtype and out.shape == (M, N)
            assert rel_err(out, want) < WO_RTOL[xdtype], (dtype, config)


@pytest.mark.parametrize("xdtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("format,element", [("mxfp4", "e2m1"), ("nvfp4", "e2m1"), ("nvfp4", "e1m2")])
@pytest.mark.parametrize("M,N,K", [(1, 24, 64), (6, 40, 96)])
def test_fp4_weight_only_mm(xdtype, format, element, M, N, K):
    x = torch.randn(M, K).to(xdtype)
    w = torch.randn(N, K) * 0.1
    w[3, 5] = float("nan")  # a NaN block: its row of the output is NaN
    p, sc, g = ref.OPS["quantize_fp4"](w, format, element, None)
    bias = torch.randn(N)
    want = ref.OPS["fp4_weight_only_mm"](x.double(), p, sc, g, format, element, bias)
    out = qtriton.get("fp4_weight_only_mm")(x, p, sc, g, format, element, bias)
    assert torch.equal(out.isnan(), want.isnan()) and out[:, 3].isnan().all()
    ok = ~want.isnan().any(0)
    assert rel_err(out[:, ok], want[:, ok]) < WO_RTOL[xdtype]


def test_weight_only_public_api_forced_triton():
    x = torch.randn(2, 3, 64)
    wq, ws = qkernels.quantize_fp8(torch.randn(16, 64), torch.float8_e4m3fn, "row")
    out = qkernels.fp8_weight_only_mm(x, wq, ws, backend="triton")
    assert rel_err(out, qkernels.fp8_weight_only_mm(x.double().float(), wq, ws, backend="reference").double()) < 1e-5
    p, sc, _ = qkernels.quantize_fp4(torch.randn(16, 64), "mxfp4")
    out = qkernels.fp4_weight_only_mm(x, p, sc, backend="triton")
    assert rel_err(out, qkernels.fp4_weight_only_mm(x, p, sc, backend="reference").double()) < 1e-5
