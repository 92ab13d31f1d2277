"""fp8 casts and the fp8 scaled GEMM: every path against qkernels.reference.float8 (bit-exact for casts), the
casts against ml_dtypes and torch's own conversions, the GEMMs against an fp64 reference with a documented bound,
the dispatch rows, bad input, opcheck and torch.compile."""

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkernels
from qkernels import reference as ref
from qkernels.dispatch import mock_device
from qkernels.ops import _call
from qkernels.reference import float8 as r8

from .conftest import FLOAT_GEMM_RTOL as GEMM_RTOL
from .conftest import needs_extension, rel_err, requires_sm

# No module-wide skip: the reference, ml_dtypes and fallback tests run without qkernels._C too; the tests that
# need the compiled kernels (dispatch rows naming "cpu", opcheck, C++ messages) carry @needs_extension.

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
ML = {
    torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
    torch.float8_e5m2: ml_dtypes.float8_e5m2,
    torch.float8_e4m3fnuz: ml_dtypes.float8_e4m3fnuz,
    torch.float8_e5m2fnuz: ml_dtypes.float8_e5m2fnuz,
}
MAXES = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0, torch.float8_e4m3fnuz: 240.0,
         torch.float8_e5m2fnuz: 57344.0}


def random_bits_f32(n, seed):
    """fp32 values from uniformly random bit patterns: every exponent, subnormals, inf and NaN included."""
    g = np.random.default_rng(seed)
    return g.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32).view(np.float32)


def edge_values(dtype):
    m = MAXES[dtype]
    fi = torch.finfo(dtype)
    tiny_sub = fi.smallest_normal * fi.eps  # smallest subnormal of the fp8 format
    ulp_max = m * fi.eps / (2 if dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz) else 2)
    vals = [0.0, -0.0, tiny_sub, tiny_sub / 2, tiny_sub * 0.5000001, tiny_sub * 1.5, fi.smallest_normal,
            fi.smallest_normal * (1 - fi.eps / 4), m, m + ulp_max / 2, m + ulp_max / 2 * 1.0001, m * 1.01, m * 2,
            1e-45, 1.5e-39, 3.4e38, float("inf"), float("nan"), 1.0, 1.0 + fi.eps / 2, 1.0 + fi.eps * 1.5]
    vals = vals + [-v for v in vals]
    return np.array(vals, dtype=np.float32)


def ml_bits(x_np, dtype, saturate):
    m = MAXES[dtype]
    with np.errstate(all="ignore"):
        src = np.clip(x_np, -m, m) if saturate else x_np  # np.clip keeps NaN
        return src.astype(ML[dtype]).view(np.uint8)


def cast_cpu(x, dtype, saturate):
    """The C++ element conversion: per-tensor quantization with a given scale of 1 (x / 1 is exact)."""
    q, _ = qkernels.quantize_fp8(x, dtype, "tensor", saturate=saturate, scale=torch.ones(()))
    return q.view(torch.uint8)


def assert_bits_equal(ours, theirs, dtype, what):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    nan_o = np.isnan(ours.view(ML[dtype]).astype(np.float32))
    nan_t = np.isnan(theirs.view(ML[dtype]).astype(np.float32))
    assert (nan_o == nan_t).all(), f"{what}: NaN positions differ"
    bad = (ours != theirs) & ~nan_o
    assert not bad.any(), f"{what}: {bad.sum()} codes differ, first {ours[bad][:5]} vs {theirs[bad][:5]}"


# ---- element conversion -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("saturate", [True, False])
def test_cast_bit_exact_vs_ml_dtypes(dtype, saturate):
    x = np.concatenate([random_bits_f32(200_000, 1), edge_values(dtype)])
    xt = torch.from_numpy(x.copy())
    cpu = cast_cpu(xt, dtype, saturate).numpy()
    assert_bits_equal(cpu, ml_bits(x, dtype, saturate), dtype, "C++ vs ml_dtypes")
    refb = r8.cast_to_fp8_bits(xt, dtype, saturate).numpy()
    assert (cpu == refb).all(), "C++ vs reference must agree bit for bit (NaN codes included)"


@pytest.mark.parametrize("dtype", FP8)
def test_cast_matches_torch_in_range(dtype):
    g = torch.Generator().manual_seed(2)
    m = MAXES[dtype]
    x = torch.cat([torch.randn(50_000, generator=g) * m / 4, torch.rand(50_000, generator=g) * 2e-3,
                   (torch.rand(10_000, generator=g) * 2 - 1) * m, torch.tensor([m, -m, 0.0, -0.0])])
    x = x.clamp(-m, m)
    ours = cast_cpu(x, dtype, saturate=False)
    assert torch.equal(ours, x.to(dtype).view(torch.uint8))


@pytest.mark.parametrize("dtype", FP8)
def test_edges_documented(dtype):
    m = MAXES[dtype]
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), m * 4, -m * 4, -0.0, -1e-30])
    sat = cast_cpu(x, dtype, True).view(dtype).float()
    assert torch.isnan(sat[0]) and sat[1] == m and sat[2] == -m and sat[3] == m and sat[4] == -m
    non = cast_cpu(x, dtype, False).view(dtype).float()
    if dtype == torch.float8_e5m2:
        assert non[1] == float("inf") and non[2] == -float("inf") and non[3] == float("inf")
    else:
        assert torch.isnan(non[1:5]).all()
    bits = cast_cpu(x, dtype, True)
    if dtype in (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz):
        assert bits[5] == 0 and bits[6] == 0 and bits[0] == 0x80  # no -0; the only NaN is 0x80
    else:
        assert bits[5] == 0x80 and bits[6] == 0x80


@pytest.mark.parametrize("dtype", FP8)
def test_decode_all_codes(dtype):
    codes = torch.arange(256, dtype=torch.uint8)
    out = qkernels.dequantize_fp8(codes.view(dtype), torch.ones(()), torch.float32)
    want = torch.from_numpy(codes.numpy().view(ML[dtype]).astype(np.float32))
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    fin = ~torch.isnan(want)
    assert torch.equal(out[fin], want[fin]) and torch.equal(torch.signbit(out[fin]), torch.signbit(want[fin]))


# ---- scaled casts ---------------------------------------------------------------------------------------------

CASES = [  # (shape, granularity, block_size)
    ((37, 130), "tensor", None),
    ((5, 3, 67), "row", None),
    ((1, 1), "row", None),
    ((33, 256), "block", 128),
    ((4, 6, 96), "block", 32),
    ((256, 384), "block", (128, 128)),
    ((3, 5), "block", (3, 5)),
]


def _data(shape, dtype, seed, specials=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[-1], generator=g) * 2)
    if specials and x.numel() > 8:
        flat = x.view(-1)
        flat[3] = float("nan")
        flat[5] = float("inf")
        flat[7] = -float("inf")
        flat[1] = 0.0
    return x.to(dtype)


def _ref_quantize(x, dtype, gran, bs, saturate):
    from qkernels.ops.float8 import fp8_layout

    R, C, br, bc, sshape = fp8_layout(x.shape, gran, bs if bs is not None else 128)
    q, s = r8.quantize_fp8(x.reshape(R, C), None, dtype, br, bc, saturate)
    return q.reshape(x.shape), s.reshape(sshape)


@pytest.mark.parametrize("shape,gran,bs", CASES)
@pytest.mark.parametrize("dtype", FP8)
def test_quantize_matches_reference(shape, gran, bs, dtype):
    x = _data(shape, torch.float32, 3)
    for saturate in (True, False):
        q, s = qkernels.quantize_fp8(x, dtype, gran, bs if bs is not None else 128, saturate)
        assert q.dtype == dtype and q.shape == x.shape and s.dtype == torch.float32
        qr, sr = _ref_quantize(x, dtype, gran, bs, saturate)
        assert torch.equal(s, sr)
        assert torch.equal(q.view(torch.uint8), qr)
        # the reference backend (what GPUs without a kernel run) is the same
        q2, s2 = qkernels.quantize_fp8(x, dtype, gran, bs if bs is not None else 128, saturate, backend="reference")
        assert torch.equal(q2.view(torch.uint8), qr) and torch.equal(s2, sr)


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gran", ["tensor", "row", "block"])
def test_quantize_half_inputs_and_noncontiguous(in_dtype, gran):
    x = _data((64, 256), in_dtype, 4)
    xt = x.t()  # non-contiguous [256, 64]
    for inp in (x, xt, x[:, ::2]):
        q, s = qkernels.quantize_fp8(inp, torch.float8_e4m3fn, gran, 32)
        qr, sr = _ref_quantize(inp.contiguous(), torch.float8_e4m3fn, gran, 32, True)
        assert torch.equal(q.view(torch.uint8), qr) and torch.equal(s, sr)


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("gran,bs", [("tensor", None), ("row", None), ("block", 64), ("block", (16, 64))])
def test_round_trip_error_and_scale(dtype, gran, bs):
    x = _data((64, 192), torch.float32, 5, specials=False)
    q, s = qkernels.quantize_fp8(x, dtype, gran, bs if bs is not None else 128)
    y = qkernels.dequantize_fp8(q, s)
    # scale = amax / max: the block's largest |x| lands exactly on (or next to) +-max, so no clipping happens
    assert (q.float().abs().amax() <= MAXES[dtype]) and torch.isfinite(q.float()).all()
    # RNE: relative error of a normal fp8 value <= 2^-(mbits+1); values far below amax may be subnormal
    mbits = 3 if dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz) else 2
    y2 = qkernels.dequantize_fp8(q, s, granularity=gran, block_size=bs)
    assert torch.equal(y, y2)
    full_s = qkernels.dequantize_fp8(torch.ones(q.shape).to(dtype), s)  # each element's scale
    sub = torch.finfo(dtype).smallest_normal * full_s  # absolute error allowance in the subnormal range
    err = (y - x).abs()
    assert (err <= x.abs() * 2.0 ** -(mbits + 1) * 1.0001 + sub).all()


def test_all_zero_block_scale_is_one():
    x = torch.zeros(4, 64)
    x[1, :32] = torch.randn(32)
    q, s = qkernels.quantize_fp8(x, torch.float8_e4m3fn, "block", 32)
    assert s[0, 0] == 1 and s[2, 1] == 1 and torch.equal(q.float()[0], torch.zeros(64))
    assert s[1, 0] == x[1, :32].abs().max() / 448


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dequantize_matches_reference(out_dtype):
    x = _data((33, 256), torch.float32, 6)
    for gran, bs in [("tensor", None), ("row", None), ("block", 128), ("block", (11, 64))]:
        q, s = qkernels.quantize_fp8(x, torch.float8_e5m2, gran, bs if bs is not None else 128)
        y = qkernels.dequantize_fp8(q, s, out_dtype)
        from qkernels.ops.float8 import fp8_layout

        R, C, br, bc, _ = fp8_layout(x.shape, gran, bs if bs is not None else 128)
        yr = r8.dequantize_fp8(q.view(torch.uint8).reshape(R, C), s.reshape(R // br, C // bc), q.dtype, br, bc,
                               out_dtype).reshape(x.shape)
        assert y.dtype == out_dtype
        assert torch.equal(torch.isnan(y), torch.isnan(yr)) and torch.equal(y[~torch.isnan(y)], yr[~torch.isnan(yr)])


def test_static_scale_and_empty():
    x = _data((8, 64), torch.float32, 7, specials=False)
    s = torch.full((8, 1), 0.01)
    q, s2 = qkernels.quantize_fp8(x, torch.float8_e4m3fn, "row", scale=s)
    assert torch.equal(s2, s)
    assert torch.equal(q.view(torch.uint8), r8.cast_to_fp8_bits(x / 0.01, torch.float8_e4m3fn, True))
    q, s = qkernels.quantize_fp8(torch.empty(0, 64), torch.float8_e4m3fn, "row")
    assert q.shape == (0, 64) and s.shape == (0, 1)
    assert qkernels.dequantize_fp8(q, s).shape == (0, 64)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 70), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from(FP8), gran=st.sampled_from(["tensor", "row"]), saturate=st.booleans(),
       scale_pow=st.integers(-30, 30))
def test_quantize_property(rows, cols, seed, dtype, gran, saturate, scale_pow):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * 2.0**scale_pow
    q, s = qkernels.quantize_fp8(x, dtype, gran, saturate=saturate)
    qr, sr = _ref_quantize(x, dtype, gran, None, saturate)
    assert torch.equal(q.view(torch.uint8), qr) and torch.equal(s, sr)


# ---- GEMM ------------------------------------------------------------------------------------------------------


def _operands(M, N, K, a_dtype, b_dtype, a_gran, b_gran, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(M, K, generator=g)
    b = torch.randn(N, K, generator=g) * 0.05
    a_bs = {"block": 128 if K % 128 == 0 else 32}.get(a_gran, 128)
    b_bs = {"block": (128, 128) if (K % 128 == 0 and N % 128 == 0) else (1, 32)}.get(b_gran, 128)
    aq, as_ = qkernels.quantize_fp8(a, a_dtype, a_gran, a_bs)
    bq, bs_ = qkernels.quantize_fp8(b, b_dtype, b_gran, b_bs)
    return aq, as_, bq, bs_


def _ref_mm(aq, as_, bq, bs_, bias, out_dtype):
    a = qkernels.dequantize_fp8(aq, as_, torch.float64)
    b = qkernels.dequantize_fp8(bq, bs_, torch.float64)
    out = a.reshape(-1, a.shape[-1]) @ b.t()
    if bias is not None:
        out = out + bias.double()
    return out


@pytest.mark.parametrize("M", [1, 7, 33, 128])
@pytest.mark.parametrize("a_gran,b_gran", [("tensor", "tensor"), ("row", "row"), ("tensor", "row"),
                                           ("block", "block"), ("row", "block")])
def test_fp8_mm_matches_reference(M, a_gran, b_gran):
    N, K = 256, 384
    aq, as_, bq, bs_ = _operands(M, N, K, torch.float8_e4m3fn, torch.float8_e4m3fn, a_gran, b_gran, M)
    bias = torch.randn(N)
    want = _ref_mm(aq, as_, bq, bs_, bias, torch.float64)
    for out_dtype in (torch.float32, torch.bfloat16):
        out = qkernels.fp8_mm(aq, as_, bq, bs_, out_dtype, bias)
        assert out.dtype == out_dtype and out.shape == (M, N)
        assert rel_err(out, want) < GEMM_RTOL[out_dtype]
        outr = qkernels.fp8_mm(aq, as_, bq, bs_, out_dtype, bias, backend="reference")
        assert torch.equal(outr, want.to(out_dtype))  # the reference is the fp64 spec, rounded once


@pytest.mark.parametrize("a_dtype,b_dtype", [(torch.float8_e4m3fn, torch.float8_e5m2),
                                             (torch.float8_e5m2, torch.float8_e5m2),
                                             (torch.float8_e4m3fnuz, torch.float8_e5m2fnuz)])
def test_fp8_mm_dtypes_unaligned_shapes(a_dtype, b_dtype):
    M, N, K = 5, 19, 96  # nothing a multiple of 16 except K
    aq, as_, bq, bs_ = _operands(M, N, K, a_dtype, b_dtype, "row", "block", 9)
    out = qkernels.fp8_mm(aq, as_, bq, bs_, torch.float32)
    assert rel_err(out, _ref_mm(aq, as_, bq, bs_, None, torch.float64)) < GEMM_RTOL[torch.float32]
    # batched activations [B, S, K] and 1-D scale forms
    a3 = aq.reshape(1, M, K)
    out3 = qkernels.fp8_mm(a3, as_.reshape(1, M, 1), bq, bs_, torch.float32)
    assert torch.equal(out3.reshape(M, N), out)
    out1d = qkernels.fp8_mm(aq, as_.reshape(M), bq, bs_, torch.float32)
    assert torch.equal(out1d, out)


def test_fp8_mm_noncontiguous_and_nan():
    aq, as_, bq, bs_ = _operands(16, 64, 128, torch.float8_e4m3fn, torch.float8_e4m3fn, "row", "row", 10)
    bq_nc = bq.t().contiguous().t()  # same values, column-major storage
    out = qkernels.fp8_mm(aq, as_, bq_nc, bs_, torch.float32)
    assert torch.equal(out, qkernels.fp8_mm(aq, as_, bq, bs_, torch.float32))
    a_bits = aq.view(torch.uint8).clone()
    a_bits[3, 5] = 0x7F  # NaN
    out = qkernels.fp8_mm(a_bits.view(torch.float8_e4m3fn), as_, bq, bs_, torch.float32)
    assert torch.isnan(out[3]).all() and torch.isfinite(out[torch.arange(16) != 3]).all()


@needs_extension
def test_fp8_mm_empty():
    aq = torch.zeros(0, 32, dtype=torch.float8_e4m3fn)
    bq = torch.zeros(8, 32, dtype=torch.float8_e4m3fn)
    out = qkernels.fp8_mm(aq, torch.ones(()), bq, torch.ones(()), torch.float32)
    assert out.shape == (0, 8)


@pytest.mark.parametrize("gran,out_dtype,tol", [("tensor", torch.float32, 1e-5), ("row", torch.bfloat16, 8e-3)])
def test_native_fp8_glue_on_cpu_scaled_mm(gran, out_dtype, tol):
    """The NATIVE function (what sm89+/gfx942 run) against the emulation, through torch's CPU _scaled_mm when this
    torch build has one: it checks the scale shapes, layouts and bias handling we hand to torch._scaled_mm."""
    aq, as_, bq, bs_ = _operands(16, 32, 64, torch.float8_e4m3fn, torch.float8_e4m3fn, gran, gran, 11)
    try:
        torch._scaled_mm(aq, bq.t(), torch.ones(()), torch.ones(()), out_dtype=torch.float32)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch build has no CPU torch._scaled_mm for fp8: {e}")
    bias = torch.randn(32)
    ga, gb = as_.reshape(-1, 1), bs_.reshape(-1, 1)
    out = _call.NATIVE["fp8_mm"](aq.view(torch.uint8), ga, aq.dtype, bq.view(torch.uint8), gb, bq.dtype, bias,
                                 out_dtype)
    assert out.dtype == out_dtype
    assert rel_err(out, _ref_mm(aq, as_, bq, bs_, bias, torch.float64)) < tol


# ---- dispatch --------------------------------------------------------------------------------------------------

E4, E5, E4Z, E5Z = FP8


@needs_extension
@pytest.mark.parametrize("device,ctx,backend", [
    ("sm89", dict(a_dtype=E4, b_dtype=E4, granularity="tensor"), "native"),
    ("sm90", dict(a_dtype=E4, b_dtype=E5, granularity="tensor"), "native"),
    ("sm90", dict(a_dtype=E4, b_dtype=E4, granularity="row", out_dtype=torch.bfloat16), "native"),
    ("sm100", dict(a_dtype=E4, b_dtype=E4, granularity="tensor"), "native"),
    ("sm89", dict(a_dtype=E4, b_dtype=E4, granularity="row"), "cuda"),
    ("sm90", dict(a_dtype=E4, b_dtype=E4, granularity="row", out_dtype=torch.float32), "cuda"),
    ("sm90", dict(a_dtype=E4, b_dtype=E4, granularity="block"), "cuda"),
    ("sm90", dict(a_dtype=E5, b_dtype=E5, granularity="tensor"), "cuda"),
    ("sm90", dict(a_dtype=E4Z, b_dtype=E4Z, granularity="tensor"), "cuda"),
    ("sm90", dict(a_dtype=E4, b_dtype=E4, granularity="tensor", K=100), "cuda"),
    ("sm80", dict(a_dtype=E4, b_dtype=E4, granularity="tensor"), "cuda"),
    ("gfx942", dict(a_dtype=E4Z, b_dtype=E5Z, granularity="tensor"), "native"),
    ("gfx942", dict(a_dtype=E4, b_dtype=E4, granularity="tensor"), "reference"),
    ("gfx90a", dict(a_dtype=E4Z, b_dtype=E4Z, granularity="tensor"), "reference"),
    ("cpu", dict(a_dtype=E4, b_dtype=E4, granularity="tensor"), "cpu"),
])
def test_dispatch_fp8_mm(device, ctx, backend):
    # assume_compiled: as if the extension had CUDA kernels for this arch; the emulated CUDA GEMM then takes what
    # torch._scaled_mm cannot run (tests/test_dispatch_float.py has the block-wise rules)
    with mock_device(device):
        d = qkernels.explain("fp8_mm", assume_compiled=True, **ctx)
    assert d.backend == backend, str(d)
    if backend in ("reference", "cuda"):
        assert "emulated" in d.reason
    if backend == "reference":
        assert any(b == "native" for b, _ in d.rejected)


@needs_extension
@pytest.mark.parametrize("op", ["quantize_fp8", "dequantize_fp8"])
@pytest.mark.parametrize("device,backend", [("cpu", "cpu"), ("sm80", "cuda"), ("sm89", "cuda"), ("sm90", "cuda"),
                                            ("sm100", "cuda"), ("gfx942", "triton"), ("gfx90a", "triton")])
def test_dispatch_casts(op, device, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    with mock_device(device):
        assert qkernels.explain(op, assume_compiled=True).backend == backend


@pytest.mark.parametrize("device,match", [("sm80", "need sm89"), ("gfx90a", "no fp8 matrix cores"),
                                          ("cpu", "fp8-capable GPU")])
def test_forcing_native_without_hardware(device, match):
    aq, as_, bq, bs_ = _operands(4, 16, 32, E4, E4, "tensor", "tensor", 12)
    with mock_device(device), pytest.raises(RuntimeError, match=f"backend 'native' was forced for fp8_mm.*{match}"):
        qkernels.fp8_mm(aq, as_, bq, bs_, torch.float32, backend="native")
    with pytest.raises(RuntimeError, match="backend 'native' was forced for quantize_fp8"):
        qkernels.quantize_fp8(torch.randn(4, 4), backend="native")


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_bad_input_messages():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="dtype must be one of float8_e4m3fn.*got torch.float16"):
        qkernels.quantize_fp8(x, torch.float16)
    with pytest.raises(ValueError, match="granularity must be one of"):
        qkernels.quantize_fp8(x, granularity="channel")
    with pytest.raises(ValueError, match="block_size 48: 48 must divide the last dim of x \\(64\\)"):
        qkernels.quantize_fp8(x, granularity="block", block_size=48)
    with pytest.raises(ValueError, match="block_size \\(3, 32\\): 3 must divide the rows of x"):
        qkernels.quantize_fp8(x, granularity="block", block_size=(3, 32))
    with pytest.raises(TypeError, match="block_size must be an int or a"):
        qkernels.quantize_fp8(x, granularity="block", block_size="128")
    with pytest.raises(TypeError, match="x must have dtype"):
        qkernels.quantize_fp8(x.int())
    with pytest.raises(ValueError, match="scale must have shape \\(4, 1\\), got \\(4,\\)"):
        qkernels.quantize_fp8(x, granularity="row", scale=torch.ones(4))
    q, s = qkernels.quantize_fp8(x, granularity="row")
    with pytest.raises(ValueError, match="scale shape \\(4, 3\\) does not tile q"):
        qkernels.dequantize_fp8(q, torch.ones(4, 3))
    with pytest.raises(ValueError, match="q.dtype must be one of"):
        qkernels.dequantize_fp8(x, s)
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        qkernels.dequantize_fp8(q, s, torch.int32)
    with pytest.raises(ValueError, match="b_q must have shape \\[N, K\\] with K=64"):
        qkernels.fp8_mm(q, s, q[:, :32], s)
    with pytest.raises(ValueError, match="a_scale of shape \\(3, 1\\) must evenly tile a_q"):
        qkernels.fp8_mm(q, torch.ones(3, 1), q, s)
    with pytest.raises(ValueError, match="b_scale must be a single value"):
        qkernels.fp8_mm(q, s, q, torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match="bias must have shape \\[N\\] = \\[4\\]"):
        qkernels.fp8_mm(q, s, q, s, bias=torch.ones(5))
    with pytest.raises(ValueError, match="b_q.dtype must be one of"):
        qkernels.fp8_mm(q, s, x, s)


@needs_extension
def test_cpp_checks_name_arguments():
    x = torch.randn(4, 64)
    with pytest.raises(RuntimeError, match="block_cols 48 must divide dim 1 of x"):
        torch.ops.qkernels.quantize_fp8(x, None, torch.float8_e4m3fn, 1, 48, True)
    with pytest.raises(RuntimeError, match="dtype must be one of float8_e4m3fn"):
        torch.ops.qkernels.quantize_fp8(x, None, torch.float16, 1, 64, True)
    q = torch.zeros(4, 64, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="scale must have shape \\[4, 1\\]"):
        torch.ops.qkernels.dequantize_fp8(q, torch.ones(4, 2), torch.float8_e5m2, 1, 64, torch.float32)
    with pytest.raises(RuntimeError, match="b_scale shape \\[3, 1\\] must evenly tile b"):
        torch.ops.qkernels.fp8_mm(q, torch.ones(4, 1), torch.float8_e4m3fn, q, torch.ones(3, 1),
                                  torch.float8_e4m3fn, None, torch.float32)


# ---- opcheck / compile -------------------------------------------------------------------------------------------


@needs_extension
def test_opcheck():
    x = _data((16, 128), torch.float32, 13, specials=False)
    q, s = torch.ops.qkernels.quantize_fp8(x, None, torch.float8_e4m3fn, 1, 32, True)
    torch.library.opcheck(torch.ops.qkernels.quantize_fp8.default, (x, None, torch.float8_e4m3fn, 1, 32, True))
    torch.library.opcheck(torch.ops.qkernels.quantize_fp8.default, (x, s, torch.float8_e5m2, 1, 32, False))
    torch.library.opcheck(torch.ops.qkernels.dequantize_fp8.default, (q, s, torch.float8_e4m3fn, 1, 32,
                                                                      torch.bfloat16))
    b, bs = torch.ops.qkernels.quantize_fp8(x[:8], None, torch.float8_e5m2, 8, 128, True)
    torch.library.opcheck(torch.ops.qkernels.fp8_mm.default, (q, s, torch.float8_e4m3fn, b, bs, torch.float8_e5m2,
                                                              torch.randn(8), torch.float32))


def test_torch_compile_fullgraph():
    def f(x, wq, ws):
        xq, xs = qkernels.quantize_fp8(x, torch.float8_e4m3fn, "row")
        return qkernels.fp8_mm(xq, xs, wq, ws, torch.float32)

    w = torch.randn(32, 64)
    wq, ws = qkernels.quantize_fp8(w, torch.float8_e4m3fn, "row")
    x = torch.randn(8, 64)
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, wq, ws)
    assert torch.equal(out, f(x, wq, ws))


# ---- GPU (scripts/gpu_check.sh) ---------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_sm(8, 9)
@pytest.mark.parametrize("gran", ["tensor", "row"])
def test_gpu_native_fp8_mm(gran):
    dev = "cuda"
    a = torch.randn(64, 256, device=dev)
    w = torch.randn(128, 256, device=dev) * 0.05
    aq, as_ = qkernels.quantize_fp8(a, torch.float8_e4m3fn, gran)
    wq, ws = qkernels.quantize_fp8(w, torch.float8_e4m3fn, gran)
    d = qkernels.explain("fp8_mm", dev, a_dtype=aq.dtype, b_dtype=wq.dtype, granularity=gran,
                         out_dtype=torch.bfloat16, K=256, N=128)
    out = qkernels.fp8_mm(aq, as_, wq, ws, torch.bfloat16)
    want = _ref_mm(aq.cpu(), as_.cpu(), wq.cpu(), ws.cpu(), None, torch.float64)
    assert rel_err(out.cpu(), want) < 8e-3, str(d)


def test_fp8_mm_empty_batch():
    # a batch with no tokens is a valid input (e.g. an empty micro-batch): empty output, no error
    w = torch.randn(16, 256)
    wq, ws = qkernels.quantize_fp8(w, granularity="row")
    for shape in [(0, 256), (2, 0, 256)]:
        xq, xs = qkernels.quantize_fp8(torch.randn(*shape), granularity="row")
        assert qkernels.fp8_mm(xq, xs, wq, ws).shape == (*shape[:-1], 16)
