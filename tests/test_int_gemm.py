"""W4A16 / W8A16 / W8A8 CPU kernels against the fp64 reference (relative error bounds in conftest.GEMM_RTOL)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkernels
from qkernels.reference import int_gemm as ref
from qkernels.reference import int_quant as qref

from .conftest import FLOAT_DTYPES, GEMM_RTOL, rel_err


def _int4_weight(N, K, group_size, symmetric, signed, dtype=torch.float32):
    w = torch.randn(N, K, dtype=dtype)
    q, s, z = qkernels.quantize_affine(w, 4, group_size, symmetric, signed=signed)
    return qkernels.pack_int4(q), s, (None if symmetric and signed else z)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 16, 33, 128])
@pytest.mark.parametrize("N,K,group_size", [(24, 256, 32), (40, 512, 128), (8, 96, 32), (17, 192, 64),
                                            (16, 96, 96), (12, 80, 40), (5, 64, 64)])
@pytest.mark.parametrize("symmetric,signed", [(True, True), (False, True), (False, False), (True, False)])
def test_int4_weight_only_mm(dtype, M, N, K, group_size, symmetric, signed):
    x = torch.randn(M, K).to(dtype)
    p, s, z = _int4_weight(N, K, group_size, symmetric, signed)
    out = qkernels.int4_weight_only_mm(x, p, s, z, group_size, signed=signed)
    assert out.dtype == dtype and out.shape == (M, N)
    want = ref.int4_weight_only_mm(x.double(), p, s, z, group_size, signed)
    assert rel_err(out, want) < GEMM_RTOL[dtype]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 3, 4, 7, 8, 9, 64])
@pytest.mark.parametrize("N,K", [(24, 256), (33, 96), (8, 40), (3, 1024)])
def test_int8_weight_only_mm(dtype, M, N, K):
    x = torch.randn(M, K).to(dtype)
    q, s, _ = qkernels.quantize_affine(torch.randn(N, K), 8, -1, True)
    s = s.reshape(N)
    out = qkernels.int8_weight_only_mm(x, q, s)
    assert out.dtype == dtype and out.shape == (M, N)
    assert rel_err(out, ref.int8_weight_only_mm(x.double(), q, s)) < GEMM_RTOL[dtype]


# The AVX2 decode kernels (csrc/cpu/int_gemm_avx2.cpp, taken for M <= 24, K % 32 == 0 and group_size % 32 == 0 for
# int4, K % 16 == 0 for int8) work on blocks of 4 weight rows and tiles of 1, 2 or 4 x rows, with a prefetch of the
# next block and one contiguous row range per thread: these shapes hit every row tail (N % 4), every M tail and the
# two-thread split (N * K large enough), for every group size up to per-channel.
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 3, 6, 9, 24])
@pytest.mark.parametrize("N,K,group_size", [(1, 64, 32), (7, 128, 64), (13, 512, 256), (301, 1024, 128),
                                            (66, 256, 256), (9, 96, 96), (5, 1088, 64)])
@pytest.mark.parametrize("symmetric,signed", [(True, True), (False, True), (False, False)])
@pytest.mark.parametrize("k64", ["1", "0"])  # "0": the 32-k decode kernel also where the 64-k one would run
def test_int4_register_kernel_tails(dtype, M, N, K, group_size, symmetric, signed, k64, monkeypatch):
    monkeypatch.setenv("QKERNELS_CPU_W4_K64", k64)
    monkeypatch.setenv("QKERNELS_CPU_I16", "0")  # bf16/fp16 x through the fp32 kernels too (next test: int16)
    x = torch.randn(M, K).to(dtype)
    p, s, z = _int4_weight(N, K, group_size, symmetric, signed)
    out = qkernels.int4_weight_only_mm(x, p, s, z, group_size, signed=signed)
    want = ref.int4_weight_only_mm(x.double(), p, s, z, group_size, signed)
    assert rel_err(out, want) < GEMM_RTOL[dtype]


# The int16-activation kernel (bf16/fp16 x, K % 64 == 0 and group_size % 64 == 0, M <= 24; the default there, set
# explicitly here): its 4x1 tile with two accumulators and its 2x2 / 2x4 / 1xMT tiles with one, every row tail, M
# tail, thread split and x-scale block (F = 64, 128 and 256 = per-channel K 1024 and group 256).
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 2, 3, 6, 9, 24])
@pytest.mark.parametrize("N,K,group_size", [(7, 128, 64), (13, 512, 256), (301, 1024, 128), (66, 256, 256),
                                            (5, 1088, 64), (6, 192, 192), (9, 1024, 1024), (3, 4096, 4096)])
@pytest.mark.parametrize("symmetric,signed", [(True, True), (False, True), (False, False)])
def test_int4_int16_activation_kernel_tails(dtype, M, N, K, group_size, symmetric, signed, monkeypatch):
    monkeypatch.setenv("QKERNELS_CPU_I16", "1")
    x = torch.randn(M, K).to(dtype)
    p, s, z = _int4_weight(N, K, group_size, symmetric, signed)
    out = qkernels.int4_weight_only_mm(x, p, s, z, group_size, signed=signed)
    want = ref.int4_weight_only_mm(x.double(), p, s, z, group_size, signed)
    assert rel_err(out, want) < GEMM_RTOL[dtype]


def _i16_emulated(x, p, s, z, group_size, signed):
    """The int16-activation kernel's arithmetic in fp64: x rounded per F-block to 2^(e - 14) steps (e = exponent of
    the block's largest |x|), then the exact dot products with the dequantized weights."""
    K = x.shape[1]
    F = 256 if group_size % 256 == 0 else 128 if group_size % 128 == 0 else 64
    xb = x.double().reshape(x.shape[0], K // F, F)
    amax = xb.abs().amax(-1, keepdim=True)
    step = torch.where(amax > 0, torch.exp2(torch.floor(torch.log2(amax)) - 14), torch.ones_like(amax))
    xq = (torch.round(xb / step) * step).reshape_as(x)
    return ref.int4_weight_only_mm(xq, p, s, z, group_size, signed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_size", [64, 128, 256])
def test_int4_int16_activations_rounding(dtype, group_size, monkeypatch):
    """Activations spanning 16 octaves (outliers next to tiny values): the kernel equals its own int16 rounding of x
    up to fp32 accumulation and the output rounding, and stays within the dtype's bound of the exact product."""
    monkeypatch.setenv("QKERNELS_CPU_I16", "1")
    torch.manual_seed(3)
    M, N, K = 3, 64, 1024
    x = (torch.randn(M, K) * torch.exp2(torch.randint(-8, 8, (M, K)).float())).to(dtype)
    p, s, z = _int4_weight(N, K, group_size, False, True)
    out = qkernels.int4_weight_only_mm(x, p, s, z, group_size)
    assert rel_err(out, _i16_emulated(x, p, s, z, group_size, True)) < {torch.bfloat16: 4e-3,
                                                                         torch.float16: 5e-4}[dtype]
    assert rel_err(out, ref.int4_weight_only_mm(x.double(), p, s, z, group_size, True)) < GEMM_RTOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_int16_activations_rounding_and_nonfinite(dtype, monkeypatch):
    """W8A16 on int16 activations: equal to its own int16 rounding of x (per 256-block, as _i16_emulated) up to the
    output rounding, within the dtype's bound of the exact product for x spread over 16 octaves; NaN/inf rows fall
    back to the fp32 kernel and propagate per row like the reference."""
    torch.manual_seed(4)
    M, N, K = 3, 40, 1024
    x = (torch.randn(M, K) * torch.exp2(torch.randint(-8, 8, (M, K)).float())).to(dtype)
    q = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    s = (torch.rand(N) + 0.01) * 1e-3  # outputs well inside fp16's range
    out = qkernels.int8_weight_only_mm(x, q, s)
    F = 256
    xb = x.double().reshape(M, K // F, F)
    step = torch.exp2(torch.floor(torch.log2(xb.abs().amax(-1, keepdim=True))) - 14)
    xq = (torch.round(xb / step) * step).reshape(M, K)
    assert rel_err(out, ref.int8_weight_only_mm(xq, q, s)) < {torch.bfloat16: 4e-3, torch.float16: 5e-4}[dtype]
    assert rel_err(out, ref.int8_weight_only_mm(x.double(), q, s)) < GEMM_RTOL[dtype]
    x[1, 3] = float("nan")
    out = qkernels.int8_weight_only_mm(x, q, s)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    assert rel_err(out[[0, 2]], ref.int8_weight_only_mm(x[[0, 2]].double(), q, s)) < GEMM_RTOL[dtype]
    monkeypatch.setenv("QKERNELS_CPU_I16", "no")
    with pytest.raises(RuntimeError, match="QKERNELS_CPU_I16 must be 'auto', '0' or '1', got 'no'"):
        qkernels.int8_weight_only_mm(x, q, s)


def test_int4_int16_activations_nonfinite_and_env(monkeypatch):
    """NaN / inf in x: the call falls back to the fp32 kernel, which propagates them per row like the reference;
    an all-zero block gets scale 1 and contributes 0. A bad QKERNELS_CPU_I16 value is an error naming it."""
    monkeypatch.setenv("QKERNELS_CPU_I16", "1")
    p, s, z = _int4_weight(12, 256, 64, False, False)
    x = torch.randn(3, 256).bfloat16()
    x[1, 7] = float("nan")
    x[2, :64] = 0
    out = qkernels.int4_weight_only_mm(x, p, s, z, 64, signed=False)
    want = ref.int4_weight_only_mm(x.double(), p, s, z, 64, False)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    assert rel_err(out[[0, 2]], want[[0, 2]]) < GEMM_RTOL[torch.bfloat16]
    x[1, 7] = float("inf")
    assert not torch.isfinite(qkernels.int4_weight_only_mm(x, p, s, z, 64, signed=False)[1]).any()
    out0 = qkernels.int4_weight_only_mm(x[2:], p, s, z, 64, signed=False)
    assert rel_err(out0, want[2:]) < GEMM_RTOL[torch.bfloat16]
    monkeypatch.setenv("QKERNELS_CPU_I16", "yes")
    with pytest.raises(RuntimeError, match="QKERNELS_CPU_I16 must be 'auto', '0' or '1', got 'yes'"):
        torch.ops.qkernels.int4_weight_only_mm(x, p, s, z, 64, False)


# int8 register kernels: fp32 (K % 16 == 0) and, for bf16/fp16 x with K % 64 == 0, the int16-activation kernel
# (x-scale blocks F = 64 (K 192, 320), 128 (384), 256 (1024, 2560, 4096)); "0" sends 16-bit x to the fp32 kernel.
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 3, 4, 5, 11, 24])
@pytest.mark.parametrize("N,K", [(1, 16), (5, 48), (6, 80), (301, 1024), (4, 4096), (9, 192), (7, 320), (13, 384),
                                 (66, 2560)])
@pytest.mark.parametrize("i16", ["auto", "0"])
def test_int8_register_kernel_tails(dtype, M, N, K, i16, monkeypatch):
    monkeypatch.setenv("QKERNELS_CPU_I16", i16)
    x = torch.randn(M, K).to(dtype)
    q = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    s = torch.rand(N) + 0.01
    assert rel_err(qkernels.int8_weight_only_mm(x, q, s), ref.int8_weight_only_mm(x.double(), q, s)) < GEMM_RTOL[dtype]


# QKERNELS_CPU_ISA=scalar: the portable paths (no AVX2), as machines without AVX2 or x86 run them.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 5, 30])
def test_scalar_isa_paths(monkeypatch, dtype, M):
    x = torch.randn(M, 256).to(dtype)
    p, s, z = _int4_weight(37, 256, 64, False, True)
    q8 = torch.randint(-128, 128, (37, 256), dtype=torch.int8)
    s8 = torch.rand(37) + 0.01
    fast = (qkernels.int4_weight_only_mm(x, p, s, z, 64), qkernels.int8_weight_only_mm(x, q8, s8),
            qkernels.int8_dynamic_mm(x, q8, s8))
    monkeypatch.setenv("QKERNELS_CPU_ISA", "scalar")
    slow = (qkernels.int4_weight_only_mm(x, p, s, z, 64), qkernels.int8_weight_only_mm(x, q8, s8),
            qkernels.int8_dynamic_mm(x, q8, s8))
    assert rel_err(slow[0], ref.int4_weight_only_mm(x.double(), p, s, z, 64, True)) < GEMM_RTOL[dtype]
    assert rel_err(slow[1], ref.int8_weight_only_mm(x.double(), q8, s8)) < GEMM_RTOL[dtype]
    assert torch.equal(slow[2], fast[2])  # exact int32 accumulation on both paths
    for a, b in zip(fast[:2], slow[:2]):
        assert rel_err(a, b) < 2 * GEMM_RTOL[dtype]
    monkeypatch.setenv("QKERNELS_CPU_ISA", "avx512")
    with pytest.raises(RuntimeError, match="QKERNELS_CPU_ISA must be 'auto' or 'scalar', got 'avx512'"):
        qkernels.int8_weight_only_mm(x, q8, s8)


# (K, group): 32-k kernel with 4 groups (scalar correction only); 64-k kernel with 17 groups (the vectorised
# correction's 8-group steps plus a scalar tail), the bad value in a vector step and in the tail
@pytest.mark.parametrize("K,group,col", [(128, 32, 2), (1088, 64, 9), (1088, 64, 16)])
@pytest.mark.parametrize("M", [1, 4, 40])
def test_int4_zero_point_range_checked_on_every_path(M, K, group, col):
    p, s, z = _int4_weight(9, K, group, False, True)
    x = torch.randn(M, K)
    for bad, shown in ((-9, "-9, 3"), (17, "3, 17")):
        zb = torch.full_like(z, 3)
        zb[5, col] = bad
        with pytest.raises(RuntimeError, match=f"zero_point values must be in \\[-8, 16\\].*\\[{shown}\\]"):
            torch.ops.qkernels.int4_weight_only_mm(x, p, s, zb, group, True)
    with pytest.raises(RuntimeError, match="zero_point values must be in"):
        torch.ops.qkernels.int4_weight_only_mm(x[:0], p, s, torch.full_like(z, 40), group, True)
    # the extremes of the range are accepted
    for edge in (-8, 16):
        ze = torch.full_like(z, edge)
        out = torch.ops.qkernels.int4_weight_only_mm(x, p, s, ze, group, True)
        assert rel_err(out, ref.int4_weight_only_mm(x.double(), p, s, ze, group, True)) < GEMM_RTOL[torch.float32]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("M", [1, 2, 5, 16, 37])
@pytest.mark.parametrize("N,K", [(24, 256), (33, 96), (8, 40), (7, 2048)])
def test_int8_dynamic_mm(dtype, M, N, K):
    x = (torch.randn(M, K) * torch.rand(M, 1) * 10).to(dtype)
    q = torch.randint(-128, 128, (N, K), dtype=torch.int8)  # full int8 range, -128 included
    s = torch.rand(N) / 100
    out = qkernels.int8_dynamic_mm(x, q, s)
    assert out.dtype == dtype
    # the int32 accumulation is exact, so fp32 outputs agree with the fp64 reference to rounding
    assert rel_err(out, ref.int8_dynamic_mm(x, q, s)) < max(GEMM_RTOL[dtype], 1e-6)


def test_per_token_quantization_bit_exact():
    x = torch.randn(9, 100) * 5
    x[3] = 0.0
    q, s = qkernels.quantize_per_token_int8(x)
    q2, s2 = ref.quantize_per_token_int8(x)
    assert torch.equal(q, q2) and torch.equal(s, s2)
    assert int(q.abs().max()) == 127 and s[3] == 1.0


def test_nonfinite_activations_give_nan_rows():
    x = torch.randn(3, 64)
    x[1, 5] = float("inf")
    out = qkernels.int8_dynamic_mm(x, torch.randint(-128, 128, (8, 64), dtype=torch.int8), torch.rand(8))
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2]]).all()
    q, s = qkernels.quantize_per_token_int8(x)
    q2, s2 = ref.quantize_per_token_int8(x)
    assert torch.equal(q, q2) and torch.isnan(s[1]) and (q[1] == 0).all()
    torch.testing.assert_close(s, s2, rtol=0, atol=0, equal_nan=True)


def test_leading_dims_noncontiguous_and_empty():
    p, s, z = _int4_weight(16, 128, 32, False, True)
    x = torch.randn(2, 3, 256)[..., ::2]  # [2, 3, 128], non-contiguous
    out = qkernels.int4_weight_only_mm(x, p, s, z, 32)
    assert out.shape == (2, 3, 16)
    assert rel_err(out, ref.int4_weight_only_mm(x.reshape(6, 128).double(), p, s, z, 32, True).reshape(2, 3, 16)) < 1e-5
    assert qkernels.int4_weight_only_mm(torch.randn(0, 128), p, s, z, 32).shape == (0, 16)
    q8 = torch.randint(-128, 128, (16, 128), dtype=torch.int8)
    assert qkernels.int8_weight_only_mm(torch.randn(0, 128), q8, torch.ones(16)).shape == (0, 16)
    assert qkernels.int8_dynamic_mm(torch.randn(2, 0, 128), q8, torch.ones(16)).shape == (2, 0, 16)


def test_scale_dtypes_accepted():
    p, s, z = _int4_weight(16, 128, 32, False, True)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    out = qkernels.int4_weight_only_mm(x, p, s.bfloat16(), z, 32)
    assert rel_err(out, ref.int4_weight_only_mm(x.double(), p, s.bfloat16(), z, 32, True)) < GEMM_RTOL[torch.bfloat16]


@settings(max_examples=30, deadline=None)
@given(M=st.integers(1, 128), N=st.integers(1, 40), groups=st.integers(1, 4), group_size=st.sampled_from([32, 64, 128, 2, 10]),
       signed=st.booleans(), seed=st.integers(0, 2**16))
def test_int4_property(M, N, groups, group_size, signed, seed):
    g = torch.Generator().manual_seed(seed)
    K = groups * group_size
    w = torch.randn(N, K, generator=g)
    q, s, z = qkernels.quantize_affine(w, 4, group_size, False, signed=signed)
    p = qkernels.pack_int4(q)
    x = torch.randn(M, K, generator=g)
    out = qkernels.int4_weight_only_mm(x, p, s, z, group_size, signed=signed)
    want = ref.int4_weight_only_mm(x.double(), p, s, z, group_size, signed)
    # fp32 accumulation: the error scales with |x| @ |W|^T, not with the result, which cancellation can make small
    # (one output of K = 10 terms, say: seen at 1.2e-5 relative to the result, 1e-7 relative to this bound)
    wdq = qref.dequantize_affine(qref.unpack_int4(p, signed), s, z, group_size, False, torch.float64)
    bound = (x.double().abs() @ wdq.abs().t()).norm().item()
    assert (out.double() - want).norm().item() < 1e-5 * bound


def test_forced_backends_agree():
    p, s, z = _int4_weight(16, 128, 32, False, True)
    x = torch.randn(3, 128)
    a = qkernels.int4_weight_only_mm(x, p, s, z, 32, backend="cpu")
    b = qkernels.int4_weight_only_mm(x, p, s, z, 32, backend="reference")
    assert rel_err(a, b) < 1e-5
    with pytest.raises(RuntimeError, match="backend 'cuda' was forced"):
        qkernels.int4_weight_only_mm(x, p, s, z, 32, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        qkernels.int4_weight_only_mm(x, p, s, z, 32, backend="fast")


def test_bad_inputs():
    p, s, z = _int4_weight(16, 128, 32, False, True)
    x = torch.randn(2, 128)
    with pytest.raises(TypeError, match="x must have dtype"):
        qkernels.int4_weight_only_mm(x.int(), p, s, z, 32)
    with pytest.raises(ValueError, match="packed_w must have shape \\[N, K/2\\]"):
        qkernels.int4_weight_only_mm(torch.randn(2, 64), p, s, z, 32)
    with pytest.raises(ValueError, match="group_size must be a positive divisor of K=128"):
        qkernels.int4_weight_only_mm(x, p, s, z, 48)
    with pytest.raises(ValueError, match="scale must have shape"):
        qkernels.int4_weight_only_mm(x, p, s[:, :2], z, 32)
    with pytest.raises(TypeError, match="zero_point must have dtype int32"):
        qkernels.int4_weight_only_mm(x, p, s, z.float(), 32)
    with pytest.raises(TypeError, match="packed_w must have dtype uint8"):
        qkernels.int4_weight_only_mm(x, p.to(torch.int8), s, z, 32)
    q8 = torch.randint(-128, 128, (16, 128), dtype=torch.int8)
    with pytest.raises(ValueError, match="q_w must have shape \\[N, K\\] with K=64"):
        qkernels.int8_weight_only_mm(torch.randn(2, 64), q8, torch.ones(16))
    with pytest.raises(ValueError, match="scale must have shape \\[N\\]"):
        qkernels.int8_weight_only_mm(x, q8, torch.ones(15))
    with pytest.raises(ValueError, match="w_scale must be 1-D"):
        qkernels.int8_dynamic_mm(x, q8, torch.ones(2, 8))
    with pytest.raises(ValueError, match="w_scale must have shape \\[N\\]"):
        qkernels.int8_dynamic_mm(x, q8, torch.ones(8))
    with pytest.raises(ValueError, match="0-d"):
        qkernels.int8_dynamic_mm(torch.tensor(1.0), q8, torch.ones(16))
    # C++ guards for direct op calls
    with pytest.raises(RuntimeError, match="zero_point values must be in \\[-8, 16\\]"):
        torch.ops.qkernels.int4_weight_only_mm(x, p, s, torch.full_like(z, 40), 32, True)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        torch.ops.qkernels.int8_weight_only_mm(torch.randn(2, 2, 128), q8, torch.ones(16))


@pytest.mark.parametrize("case", ["w4", "w8", "tok", "w8a8"])
def test_opcheck(case):
    x = torch.randn(3, 128)
    p, s, z = _int4_weight(16, 128, 32, False, True)
    q8 = torch.randint(-128, 128, (16, 128), dtype=torch.int8)
    ops = torch.ops.qkernels
    op, args = {
        "w4": (ops.int4_weight_only_mm.default, (x.bfloat16(), p, s, z, 32, True)),
        "w8": (ops.int8_weight_only_mm.default, (x, q8, torch.rand(16))),
        "tok": (ops.quantize_per_token_int8.default, (x,)),
        "w8a8": (ops.int8_dynamic_mm.default, (x, q8, torch.rand(16))),
    }[case]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    p, s, z = _int4_weight(16, 128, 32, False, True)
    q8 = torch.randint(-128, 128, (16, 128), dtype=torch.int8)
    s8 = torch.rand(16)

    def f(x):
        return (qkernels.int4_weight_only_mm(x, p, s, z, 32) + qkernels.int8_weight_only_mm(x, q8, s8)
                + qkernels.int8_dynamic_mm(x, q8, s8))

    x = torch.randn(2, 5, 128)
    assert torch.allclose(torch.compile(f, fullgraph=True)(x), f(x), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(M=st.integers(1, 128), N=st.integers(1, 40), K=st.integers(1, 300), dtype=st.sampled_from(FLOAT_DTYPES),
       seed=st.integers(0, 2**16))
def test_int8_property(M, N, K, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    q = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    s = torch.rand(N, generator=g) + 0.01
    assert rel_err(qkernels.int8_weight_only_mm(x, q, s), ref.int8_weight_only_mm(x.double(), q, s)) < GEMM_RTOL[dtype]
    assert rel_err(qkernels.int8_dynamic_mm(x, q, s), ref.int8_dynamic_mm(x, q, s)) < max(GEMM_RTOL[dtype], 1e-6)
