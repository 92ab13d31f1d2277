"""fp8 / fp4 cast kernels (csrc/cuda/float_cast.cu and qkernels/triton/float_cast.py), the emulated fp8 / fp4 GEMMs
on CUDA, native block-wise fp8 on sm90 and the W8A8 CUDA path, against the reference on an NVIDIA GPU. Run by
scripts/gpu_check.sh (``pytest -m gpu``); everything here skips by capability elsewhere.

Casts are compared bit for bit (codes and scales; decoded values equal with NaN where the reference has NaN, NaN
payloads unspecified). The hardware conversions (sm89+ e4m3/e5m2, sm100a e2m1) must agree with the software
conversion the CPU tests check against ml_dtypes. GEMM tolerances (relative error against the fp64 reference):
fp32 output 1e-5 (decode exact, fp32 cuBLAS with TF32 off), bf16 output 8e-3 (one bf16 rounding of the result).
W8A8 on CUDA is bit-identical to the CPU kernel (same per-token quantization, exact int32 sums, same fp32
epilogue).
"""

from __future__ import annotations

import pytest
import torch

import qkernels
from qkernels import reference as ref

from .conftest import cuda_capability, requires_sm
from .test_cuda_kernels import _no_tf32  # noqa: F401  (autouse fixture: fp32 GEMMs without TF32)

pytestmark = [pytest.mark.gpu, requires_sm(8, 0)]
DEV = "cuda"
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _edge_values(n_random=994):
    special = [0.0, -0.0, 448.0, 464.0, -464.0, 465.0, 240.0, 248.0, 57344.0, 61440.0, -1e9, 2.0**-9, 2.0**-10,
               3 * 2.0**-11, 2.0**-17, -(2.0**-16), 1e-40, -1e-45, 0.25, 0.75, 1.25, 2.5, 5.0, 7.0, 3.25, 3.75,
               float("inf"), float("-inf"), float("nan"), -float("nan")]
    rnd = torch.randn(n_random) * torch.exp2(torch.randint(-18, 18, (n_random,)).float())
    return torch.cat([torch.tensor(special), rnd]).to(DEV)


def _same_float(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
        torch.nan_to_num(a.double(), nan=0.0), torch.nan_to_num(b.double(), nan=0.0))


def _op(backend, name):
    if backend == "cuda":
        assert qkernels._ext.has_kernel(name, "CUDA"), f"qkernels._C has no CUDA kernel for {name}"
        return getattr(torch.ops.qkernels, name)
    pytest.importorskip("triton")
    from qkernels import triton as qtriton

    return qtriton.get(name)


BACKENDS = ["cuda", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("saturate", [True, False])
def test_fp8_cast_edges_bit_exact(backend, dtype, saturate):
    x = _edge_values().reshape(1, -1)  # 1024 values: the vectorized CUDA path
    s = torch.ones(1, 1, device=DEV)
    for cols in (1024, 8, 7):  # vector path, 8-wide blocks, scalar path
        xb = x[:, : (1024 // cols) * cols]
        grid = torch.ones(1, xb.shape[1] // cols, device=DEV)
        q, _ = _op(backend, "quantize_fp8")(xb, grid, dtype, 1, cols, saturate)
        assert torch.equal(q, ref.OPS["quantize_fp8"](xb, grid, dtype, 1, cols, saturate)[0]), cols
    codes = torch.arange(256, dtype=torch.uint8, device=DEV).view(dtype).float().reshape(1, 256)
    q, _ = _op(backend, "quantize_fp8")(codes, s, dtype, 1, 256, saturate)
    assert torch.equal(q, ref.OPS["quantize_fp8"](codes, s, dtype, 1, 256, saturate)[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,blocks", [((256, 1024), (256, 1024)), ((33, 96), (1, 96)), ((64, 384), (1, 128)),
                                          ((256, 384), (128, 128)), ((7, 33), (7, 11)), ((4096, 4096), (1, 4096))])
def test_fp8_quantize_dequantize_blocks(backend, xdtype, shape, blocks):
    x = (torch.randn(shape, device=DEV) * 30).to(xdtype)
    x[0, 0] = float("nan")
    x[-1, -1] = float("inf")
    x[1, :] = 0.0
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz):
        q, s = _op(backend, "quantize_fp8")(x, None, dtype, *blocks, True)
        q_ref, s_ref = ref.OPS["quantize_fp8"](x, None, dtype, *blocks, True)
        assert torch.equal(s, s_ref) and torch.equal(q, q_ref), dtype
        for out_dtype in OUT_DTYPES:
            got = _op(backend, "dequantize_fp8")(q, s, dtype, *blocks, out_dtype)
            assert _same_float(got, ref.OPS["dequantize_fp8"](q_ref, s_ref, dtype, *blocks, out_dtype)), out_dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("element", ["e2m1", "e1m2"])
def test_fp4_encode_decode_bit_exact(backend, element):
    x = _edge_values().reshape(4, -1)
    p = _op(backend, "fp4_encode")(x, element)
    assert torch.equal(p, ref.OPS["fp4_encode"](x, element))
    for out_dtype in OUT_DTYPES:
        assert torch.equal(_op(backend, "fp4_decode")(p, element, out_dtype),
                           ref.OPS["fp4_decode"](p, element, out_dtype)), out_dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("format", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("element", ["e2m1", "e1m2"])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp4_quantize_dequantize_bit_exact(backend, format, element, xdtype):
    B = ref.float4.FORMATS[format]
    x = (torch.randn(67, 8 * B, device=DEV) * torch.exp2(torch.randint(-20, 20, (67, 1), device=DEV).float()))
    x = x.to(xdtype)
    x[1, :B] = 0.0
    x[2, 3] = float("inf")
    x[3, B + 1] = float("nan")
    x[4, :B] = 1e-30
    for g in (None, torch.tensor(0.37, device=DEV)):
        got = _op(backend, "quantize_fp4")(x, format, element, g)
        want = ref.OPS["quantize_fp4"](x, format, element, g)
        for a, b in zip(got, want):
            assert torch.equal(a, b)
        for out_dtype in OUT_DTYPES:
            d = _op(backend, "dequantize_fp4")(*got, format, element, out_dtype)
            assert _same_float(d, ref.OPS["dequantize_fp4"](*want, format, element, out_dtype)), out_dtype


# ---- emulated GEMMs on CUDA (forced: on sm89+ the table prefers torch._scaled_mm) -------------------------------
TOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3}


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,a_block,b_block", [(1, 64, 256, 256, (64, 256)), (33, 200, 384, 128, (8, 128)),
                                                   (300, 256, 512, 128, (128, 128))])
def test_fp8_mm_cuda_emulation(out_dtype, M, N, K, a_block, b_block):
    a_q, a_s = qkernels.quantize_fp8(torch.randn(M, K, device=DEV), granularity="block", block_size=a_block)
    b_q, b_s = qkernels.quantize_fp8(torch.randn(N, K, device=DEV), torch.float8_e5m2, granularity="block",
                                     block_size=b_block)
    bias = torch.randn(N, device=DEV)
    out = qkernels.fp8_mm(a_q, a_s, b_q, b_s, out_dtype=out_dtype, bias=bias, backend="cuda", b_block_size=b_block)
    want = ref.OPS["fp8_mm"](a_q.view(torch.uint8), a_s, a_q.dtype, b_q.view(torch.uint8), b_s.reshape(
        N // b_block[0], -1), b_q.dtype, bias, torch.float64)
    assert out.dtype == out_dtype
    assert ((out.double() - want).norm() / want.norm()).item() < TOL[out_dtype]


@pytest.mark.parametrize("format", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("M", [1, 17, 256])
def test_fp4_mm_cuda_emulation(format, M):
    N, K = 96, 512
    a = qkernels.quantize_fp4(torch.randn(M, K, device=DEV), format)
    b = qkernels.quantize_fp4(torch.randn(N, K, device=DEV), format)
    # the public API converts quantize_fp4's outputs (fp8-typed scales, no global scale for mxfp4) to the op's
    # arguments; the forced backends are the CUDA emulation and the reference
    kw = dict(format=format, a_global_scale=a[2], b_global_scale=b[2])
    out = qkernels.fp4_mm(a[0], a[1], b[0], b[1], out_dtype=torch.float32, backend="cuda", **kw)
    want = qkernels.fp4_mm(a[0], a[1], b[0], b[1], out_dtype=torch.float64, backend="reference", **kw)
    assert ((out.double() - want).norm() / want.norm()).item() < TOL[torch.float32]


# weight-only: CUDA decodes the weight to x's dtype with the cast kernel, then cuBLAS; Triton decodes it inside its
# GEMM (bf16 x: one more bf16 rounding of each weight than the fp64 reference, inside the bf16 output tolerance)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 33])
def test_weight_only_mm_cuda(x_dtype, M, backend):
    N, K = 96, 256
    x = torch.randn(M, K, device=DEV).to(x_dtype)
    bias = torch.randn(N, device=DEV)
    wq, ws = qkernels.quantize_fp8(torch.randn(N, K, device=DEV), granularity="block", block_size=(32, 128))
    assert qkernels.explain("fp8_weight_only_mm", DEV).backend == "cuda"
    out = qkernels.fp8_weight_only_mm(x, wq, ws, bias, backend=backend, w_block_size=(32, 128))
    want = ref.OPS["fp8_weight_only_mm"](x.double(), wq.view(torch.uint8), ws, wq.dtype, bias)
    assert out.dtype == x_dtype and ((out.double() - want).norm() / want.norm()).item() < TOL[x_dtype]
    for fmt in ("mxfp4", "nvfp4"):
        p, sc, g = qkernels.quantize_fp4(torch.randn(N, K, device=DEV), fmt)
        gs = g if fmt == "nvfp4" else None
        out = qkernels.fp4_weight_only_mm(x, p, sc, bias, format=fmt, w_global_scale=gs, backend=backend)
        g_op = g if g is not None else torch.ones((), device=DEV)  # the op's global scale (1 for mxfp4)
        want = ref.OPS["fp4_weight_only_mm"](x.double(), p, sc.view(torch.uint8), g_op, fmt, "e2m1", bias)
        assert out.dtype == x_dtype and ((out.double() - want).norm() / want.norm()).item() < TOL[x_dtype], fmt


@pytest.mark.skipif(cuda_capability() != (9, 0), reason="native block-wise fp8 is wired for sm90 only")
@pytest.mark.parametrize("weight_block", [(128, 128), 128])
def test_fp8_mm_native_blockwise_sm90(weight_block):
    M, N, K = 64, 512, 1024
    a_q, a_s = qkernels.quantize_fp8(torch.randn(M, K, device=DEV), granularity="block", block_size=128)
    b_q, b_s = qkernels.quantize_fp8(torch.randn(N, K, device=DEV), granularity="block", block_size=weight_block)
    assert qkernels.explain("fp8_mm", DEV, granularity="block", a_blocks=(1, 128),
                            b_blocks=(1, 128) if weight_block == 128 else weight_block, K=K, N=N,
                            a_dtype=a_q.dtype, b_dtype=b_q.dtype, out_dtype=torch.bfloat16).backend == "native"
    out = qkernels.fp8_mm(a_q, a_s, b_q, b_s, out_dtype=torch.bfloat16)
    want = ref.OPS["fp8_mm"](a_q.view(torch.uint8), a_s, a_q.dtype, b_q.view(torch.uint8), b_s.reshape(
        b_s.shape[0], -1), b_q.dtype, None, torch.float64)
    assert ((out.double() - want).norm() / want.norm()).item() < TOL[torch.bfloat16]


# ---- W8A8 -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K", [(1, 40, 64), (16, 44, 100), (17, 64, 256), (300, 256, 1024)])
def test_int8_dynamic_mm_cuda_matches_cpu_kernel(xdtype, M, N, K):
    x = (torch.randn(M, K, device=DEV) * 3).to(xdtype)
    x[0, 1] = 0.0
    q_w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEV)
    w_s = torch.rand(N, device=DEV) * 0.01 + 1e-3
    q, s = torch.ops.qkernels.quantize_per_token_int8(x)
    q_ref, s_ref = ref.OPS["quantize_per_token_int8"](x)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    out = torch.ops.qkernels.int8_dynamic_mm(x, q_w, w_s)
    cpu = torch.ops.qkernels.int8_dynamic_mm(x.cpu(), q_w.cpu(), w_s.cpu())
    assert out.dtype == xdtype and torch.equal(out.cpu(), cpu)
    assert qkernels.explain("int8_dynamic_mm", DEV).backend == "cuda"


@pytest.mark.parametrize("M,N,K", [(1, 40, 64), (17, 64, 100), (300, 256, 1024)])
def test_int8_dynamic_mm_triton_matches_cpu_kernel(M, N, K):
    x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
    q_w = torch.randint(-127, 128, (N, K), dtype=torch.int8, device=DEV)
    w_s = torch.rand(N, device=DEV) * 0.01 + 1e-3
    out = _op("triton", "int8_dynamic_mm")(x, q_w, w_s)
    assert torch.equal(out.cpu(), torch.ops.qkernels.int8_dynamic_mm(x.cpu(), q_w.cpu(), w_s.cpu()))


def test_w8a8_nan_row():
    x = torch.randn(20, 64, device=DEV)
    x[3, 5] = float("nan")
    q, s = torch.ops.qkernels.quantize_per_token_int8(x)
    assert torch.isnan(s[3]) and not torch.isnan(s[4]) and int(q[3].abs().sum()) == 0
