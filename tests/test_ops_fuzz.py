"""Property tests of the quantization, fp8 / fp4 and GGUF ops against qkernels.reference, on hostile values: NaN,
+-inf, subnormals and magnitudes up to float32's limit. Encoders and casts must equal the reference bit for bit
(or both refuse the input with a ValueError); GEMMs must agree on which outputs are NaN / +-inf and, elsewhere, stay
within an error bound relative to sum_k |x_k w_k| (robust to cancellation, and failing a path that flushes
subnormal x to zero). A fixed small example budget keeps the file fast."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import qkernels
from qkernels import gguf
from qkernels import reference as ref
from qkernels.ops.gguf import MAX_ABS

FUZZ = settings(max_examples=30, deadline=None, derandomize=True)

# magnitudes of the bulk of the data: subnormal, tiny, ordinary, large, near float32's largest value
MAGNITUDES = [1e-42, 1e-38, 1e-30, 1e-3, 1.0, 1e4, 1e30, 1e35, 1e38]
SPECIALS = ["none", "nan", "inf", "-inf", "all"]
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]


def _data(shape, seed, mag, special="none", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * mag
    x = x.clamp(-3.4e38, 3.4e38).to(dtype)
    n = x.numel()
    if special != "none" and n:
        idx = torch.randint(0, n, (max(1, n // 50),), generator=g)
        vals = {"nan": [math.nan], "inf": [math.inf], "-inf": [-math.inf], "all": [math.nan, math.inf, -math.inf]}
        flat = x.reshape(-1)
        for i, j in enumerate(idx.tolist()):
            flat[j] = vals[special][i % len(vals[special])]
    return x


def _same(a, b):
    """Equal including NaN positions (and fp8 / uint8 bit patterns)."""
    if a.dtype.is_floating_point:
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a[~torch.isnan(a)], b[~torch.isnan(b)])
    return torch.equal(a, b)


def _check_gemm(out, want, bound, K, tol):
    """Finiteness and sign of infinities as the reference; finite outputs within tol * sum |x w| (+ subnormal
    absolute slack of the output dtype)."""
    want = want.to(out.dtype)  # the exact result rounded once to the output dtype (inf where it overflows)
    out, want = out.double(), want.double()
    assert torch.equal(torch.isnan(out), torch.isnan(want)), "NaN pattern differs from the reference"
    assert torch.equal(torch.isposinf(out), torch.isposinf(want)), "+inf pattern differs from the reference"
    assert torch.equal(torch.isneginf(out), torch.isneginf(want)), "-inf pattern differs from the reference"
    fin = torch.isfinite(want)
    slack = K * torch.finfo(torch.float32).smallest_normal
    err = (out[fin] - want[fin]).abs()
    lim = tol * bound[fin] + slack
    assert (err <= lim).all(), f"max excess {(err - lim).max().item():.3g} (bound {bound[fin].max().item():.3g})"


# ---- integer affine quantization -------------------------------------------------------------------------------


@FUZZ
@given(seed=st.integers(0, 2**31 - 1), mag=st.sampled_from(MAGNITUDES), special=st.sampled_from(SPECIALS),
       bits=st.sampled_from([2, 4, 8]), group=st.sampled_from([-1, 16, "tensor"]), symmetric=st.booleans(),
       signed=st.booleans(), domain=st.sampled_from(["int", "float"]))
def test_quantize_affine_matches_reference_or_refuses(seed, mag, special, bits, group, symmetric, signed, domain):
    w = _data((3, 32), seed, mag, special)
    try:
        q, s, zp = qkernels.quantize_affine(w, bits, group, symmetric, signed=signed, zero_point_domain=domain)
    except ValueError as e:
        # only non-finite weights or a range float32 cannot hold are refused
        assert special != "none" or mag >= 1e38, e
        return
    assert special == "none"
    wv = w.reshape(1, -1) if group == "tensor" else w
    g = wv.shape[-1] if group in (-1, "tensor") else group
    fz = domain == "float"
    sg = signed and not fz
    rs, rz = ref.int_quant.choose_qparams_affine(wv, bits, g, symmetric, sg, fz)
    assert torch.equal(s.reshape(rs.shape), rs) and torch.equal(zp.reshape(rz.shape), rz)
    rq = ref.int_quant.quantize_affine(wv, rs, rz, bits, g, sg, fz)
    assert torch.equal(q.reshape(rq.shape), rq)
    d = qkernels.dequantize_affine(q, s, zp, group, zero_point_domain=domain)
    assert torch.equal(d.reshape(rq.shape), ref.int_quant.dequantize_affine(rq, rs, rz, g, fz, torch.float32))
    # finite in, finite out
    assert torch.isfinite(s).all() and torch.isfinite(d).all()


@FUZZ
@given(seed=st.integers(0, 2**31 - 1), signed=st.booleans(), rows=st.integers(0, 4), half=st.integers(1, 9))
def test_pack_unpack_int4_match_reference(seed, signed, rows, half):
    g = torch.Generator().manual_seed(seed)
    lo, hi, dt = (-8, 8, torch.int8) if signed else (0, 16, torch.uint8)
    q = torch.randint(lo, hi, (rows, 2 * half), generator=g).to(dt)
    p = qkernels.pack_int4(q)
    assert torch.equal(p, ref.int_quant.pack_int4(q))
    assert torch.equal(qkernels.unpack_int4(p, signed), q)
    raw = torch.randint(0, 256, (rows, half), generator=g, dtype=torch.uint8)
    assert torch.equal(qkernels.unpack_int4(raw, signed), ref.int_quant.unpack_int4(raw, signed))


@FUZZ
@given(seed=st.integers(0, 2**31 - 1), mag=st.sampled_from(MAGNITUDES), special=st.sampled_from(SPECIALS),
       wmag=st.sampled_from([1e-3, 1.0, 1e30, 1e38]), op=st.sampled_from(["int4", "int8", "int8_dynamic"]),
       M=st.integers(1, 20))
# the issue's cases: weights ~1e38 with x ~1e-30 (int4's AVX2 path), |x| >= 3e35, an inf in x
@example(seed=0, mag=1e-30, special="none", wmag=1e38, op="int4", M=1)
@example(seed=1, mag=1e-30, special="none", wmag=1e38, op="int4", M=17)
@example(seed=2, mag=1e35, special="none", wmag=1.0, op="int8", M=1)
@example(seed=3, mag=1e35, special="none", wmag=1.0, op="int8_dynamic", M=3)
@example(seed=4, mag=1.0, special="inf", wmag=1.0, op="int4", M=2)
@example(seed=5, mag=1.0, special="-inf", wmag=1.0, op="int8", M=2)
@example(seed=6, mag=1.0, special="inf", wmag=1.0, op="int8_dynamic", M=2)
def test_int_gemms_match_reference(seed, mag, special, wmag, op, M):
    """W4A16 / W8A16 / W8A8 on hostile x and weights up to float32's limit (the products x * w stay finite when
    the exact result is: the bound below is the fp64 sum of |x w|)."""
    N, K = 12, 64
    w = _data((N, K), seed + 1, wmag)
    x = _data((M, K), seed, mag, special)
    if op == "int4":
        q, s, zp = qkernels.quantize_affine(w, 4, 32, True)
        packed = qkernels.pack_int4(q)
        out = qkernels.int4_weight_only_mm(x, packed, s, zp, 32)
        want = ref.OPS["int4_weight_only_mm"](x.double(), packed, s, zp, 32, True)
        wd = qkernels.dequantize_affine(q, s, zp, 32, out_dtype=torch.float64)
    else:
        q, s, _ = qkernels.quantize_affine(w, 8, -1, True)
        s = s.reshape(-1)
        mm = qkernels.int8_weight_only_mm if op == "int8" else qkernels.int8_dynamic_mm
        out = mm(x, q, s)
        want = ref.OPS[f"{op}_weight_only_mm" if op == "int8" else "int8_dynamic_mm"](x.double(), q, s)
        wd = q.double() * s.double()[:, None]
    bound = x.double().nan_to_num(0, 0, 0).abs() @ wd.abs().t()
    if op == "int8_dynamic":  # x is rounded to 8 bits first: compare with the reference's own rounding
        qx, sx = ref.int_gemm.quantize_per_token_int8(x)
        bound = (qx.double().abs() * sx.double()[:, None]).nan_to_num(0, 0, 0) @ wd.abs().t()
    _check_gemm(out, want, bound, K, 1e-5)


# ---- fp8 -------------------------------------------------------------------------------------------------------


@FUZZ
@given(seed=st.integers(0, 2**31 - 1), mag=st.sampled_from(MAGNITUDES), special=st.sampled_from(SPECIALS),
       dtype=st.sampled_from(FP8), gran=st.sampled_from(["tensor", "row", "block"]), saturate=st.booleans(),
       x_dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_fp8_casts_match_reference(seed, mag, special, dtype, gran, saturate, x_dtype):
    x = _data((6, 64), seed, mag, special, x_dtype)
    q, s = qkernels.quantize_fp8(x, dtype, gran, 32, saturate)
    R, C, br, bc, _ = qkernels.ops.float8.fp8_layout(x.shape, gran, 32)
    rq, rs = ref.float8.quantize_fp8(x.reshape(R, C), None, dtype, br, bc, saturate)
    assert torch.equal(q.view(torch.uint8).reshape(R, C), rq) and _same(s.reshape(rs.shape), rs)
    d = qkernels.dequantize_fp8(q, s)
    assert _same(d.reshape(R, C), ref.float8.dequantize_fp8(rq, rs, dtype, br, bc, torch.float32))


@FUZZ
@given(seed=st.integers(0, 2**31 - 1), mag=st.sampled_from(MAGNITUDES), special=st.sampled_from(SPECIALS),
       dtype=st.sampled_from(FP8), gran=st.sampled_from(["tensor", "row", "block"]), M=st.integers(1, 20),
       bias=st.booleans())
@example(seed=0, mag=1e-42, special="none", dtype=torch.float8_e4m3fn, gran="row", M=1, bias=False)  # subnormal x
@example(seed=1, mag=1e35, special="none", dtype=torch.float8_e4m3fn, gran="row", M=2, bias=False)
@example(seed=2, mag=1.0, special="inf", dtype=torch.float8_e5m2, gran="tensor", M=3, bias=True)
def test_fp8_weight_only_mm_matches_reference(seed, mag, special, dtype, gran, M, bias):
    N, K = 12, 64
    w = _data((N, K), seed + 1, 1.0)
    wq, ws = qkernels.quantize_fp8(w, dtype, gran, 32)
    x = _data((M, K), seed, mag, special)
    b = _data((N,), seed + 2, 1.0) if bias else None
    out = qkernels.fp8_weight_only_mm(x, wq, ws, b)
    grid = ws.reshape(1, 1) if ws.dim() == 0 else ws
    want = ref.OPS["fp8_weight_only_mm"](x.double(), wq.view(torch.uint8), grid, dtype, b)
    wd = qkernels.dequantize_fp8(wq, ws).double()
    bound = x.double().nan_to_num(0, 0, 0).abs() @ wd.abs().nan_to_num(0, 0, 0).t()
    if b is not None:
        bound = bound + b.double().abs()
    _check_gemm(out, want, bound, K, 1e-5)


@FUZZ
@given(seed=st.integers(0, 2**31 - 1), mag=st.sampled_from(MAGNITUDES), special=st.sampled_from(SPECIALS),
       dtype=st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2]), M=st.integers(1, 20))
def test_fp8_mm_matches_reference(seed, mag, special, dtype, M):
    N, K = 12, 64
    aq, as_ = qkernels.quantize_fp8(_data((M, K), seed, mag, special), dtype, "row", saturate=False)
    bq, bs_ = qkernels.quantize_fp8(_data((N, K), seed + 1, 1.0), dtype, "row")
    out = qkernels.fp8_mm(aq, as_, bq, bs_, torch.float32)
    want = ref.OPS["fp8_mm"](aq.view(torch.uint8), as_, dtype, bq.view(torch.uint8), bs_, dtype, None,
                             torch.float64)
    ad, bd = qkernels.dequantize_fp8(aq, as_).double(), qkernels.dequantize_fp8(bq, bs_).double()
    bound = ad.nan_to_num(0, 0, 0).abs() @ bd.nan_to_num(0, 0, 0).abs().t()
    _check_gemm(out, want.float(), bound, K, 1e-5)


# ---- fp4 -------------------------------------------------------------------------------------------------------


@FUZZ
@given(seed=st.integers(0, 2**31 - 1), mag=st.sampled_from(MAGNITUDES), special=st.sampled_from(SPECIALS),
       fmt=st.sampled_from(["mxfp4", "nvfp4"]), element=st.sampled_from(["e2m1", "e1m2"]))
def test_fp4_casts_match_reference(seed, mag, special, fmt, element):
    x = _data((4, 64), seed, mag, special)
    codes = qkernels.fp4_encode(x, element)
    assert torch.equal(codes, ref.float4.fp4_encode(x, element))
    assert _same(qkernels.fp4_decode(codes, element), ref.float4.fp4_decode(codes, element, torch.float32))
    p, s, g = qkernels.quantize_fp4(x, fmt, element=element)
    rp, rs, rg = ref.float4.quantize_fp4(x, fmt, element, None)
    assert torch.equal(p, rp) and torch.equal(s.view(torch.uint8), rs)
    if fmt == "nvfp4":
        assert _same(g.reshape(()), rg.reshape(()))
    d = qkernels.dequantize_fp4(p, s, g, fmt, element=element)
    assert _same(d, ref.float4.dequantize_fp4(rp, rs, rg, fmt, element, torch.float32))


@FUZZ
@given(seed=st.integers(0, 2**31 - 1), mag=st.sampled_from(MAGNITUDES), special=st.sampled_from(SPECIALS),
       fmt=st.sampled_from(["mxfp4", "nvfp4"]), M=st.integers(1, 20), bias=st.booleans())
@example(seed=0, mag=1e35, special="none", fmt="mxfp4", M=1, bias=False)
@example(seed=1, mag=1e-42, special="none", fmt="nvfp4", M=2, bias=False)
@example(seed=2, mag=1.0, special="inf", fmt="mxfp4", M=3, bias=True)
def test_fp4_weight_only_mm_matches_reference(seed, mag, special, fmt, M, bias):
    N, K = 12, 64
    p, s, g = qkernels.quantize_fp4(_data((N, K), seed + 1, 1.0), fmt)
    x = _data((M, K), seed, mag, special)
    b = _data((N,), seed + 2, 1.0) if bias else None
    out = qkernels.fp4_weight_only_mm(x, p, s, b, format=fmt, w_global_scale=g)
    gg = g if g is not None else torch.ones(())
    want = ref.OPS["fp4_weight_only_mm"](x.double(), p, s.view(torch.uint8), gg, fmt, "e2m1", b)
    wd = qkernels.dequantize_fp4(p, s, g, fmt).double()
    bound = x.double().nan_to_num(0, 0, 0).abs() @ wd.abs().t()
    if b is not None:
        bound = bound + b.double().abs()
    _check_gemm(out, want, bound, K, 1e-5)


@FUZZ
@given(seed=st.integers(0, 2**31 - 1), mag=st.sampled_from(MAGNITUDES), special=st.sampled_from(SPECIALS),
       fmt=st.sampled_from(["mxfp4", "nvfp4"]), M=st.integers(1, 8))
def test_fp4_mm_matches_reference(seed, mag, special, fmt, M):
    N, K = 12, 64
    ap, as_, ag = qkernels.quantize_fp4(_data((M, K), seed, mag, special), fmt)
    bp, bs_, bg = qkernels.quantize_fp4(_data((N, K), seed + 1, 1.0), fmt)
    out = qkernels.fp4_mm(ap, as_, bp, bs_, torch.float32, format=fmt, a_global_scale=ag, b_global_scale=bg)
    one = torch.ones(())
    want = ref.OPS["fp4_mm"](ap, as_.view(torch.uint8), ag if ag is not None else one, bp, bs_.view(torch.uint8),
                             bg if bg is not None else one, fmt, "e2m1", None, torch.float64)
    ad = qkernels.dequantize_fp4(ap, as_, ag, fmt).double()
    bd = qkernels.dequantize_fp4(bp, bs_, bg, fmt).double()
    bound = ad.nan_to_num(0, 0, 0).abs() @ bd.abs().t()
    _check_gemm(out, want.float(), bound, K, 1e-5)


# ---- GGUF ------------------------------------------------------------------------------------------------------

GGUF_TYPES = sorted(gguf.TYPES)


@FUZZ
@given(seed=st.integers(0, 2**31 - 1), mag=st.sampled_from(MAGNITUDES + [3e5, 2e6, 5e7]),
       name=st.sampled_from(GGUF_TYPES), imatrix=st.booleans())
def test_gguf_quantize_matches_reference_or_refuses(seed, mag, name, imatrix):
    t = gguf.TYPES[name]
    x = _data((2, 256), seed, mag)
    im = None
    if imatrix and t in ref.gguf.IMATRIX_TYPES:
        im = torch.rand(256, generator=torch.Generator().manual_seed(seed)) + 0.01
    amax = float(x.abs().max())
    try:
        got = gguf.quantize(x, name, im)
    except ValueError as e:
        # refused only beyond the type's fp16 range (or just below it, where a block's scale still overflows)
        assert t in MAX_ABS and amax > MAX_ABS[t] * 0.5, e
        return
    assert t not in MAX_ABS or amax <= MAX_ABS[t]
    assert torch.equal(got, ref.gguf.gguf_quantize(x, t, im))
    d = gguf.dequantize(got, name, x.shape)
    assert torch.isfinite(d).all(), "finite in, finite out"


@FUZZ
@given(seed=st.integers(0, 2**31 - 1), name=st.sampled_from(GGUF_TYPES))
def test_gguf_dequantize_random_bytes_matches_reference(seed, name):
    t = gguf.TYPES[name]
    bs, ts = gguf.BLOCK[t]
    raw = torch.randint(0, 256, (3, 2 * ts), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    assert _same(gguf.dequantize(raw, name, (3, 2 * bs)), ref.gguf.gguf_dequantize(raw, t, 3, 2 * bs, torch.float32))


@FUZZ
@given(seed=st.integers(0, 2**31 - 1), mag=st.sampled_from(MAGNITUDES), special=st.sampled_from(SPECIALS),
       name=st.sampled_from(["Q4_0", "Q8_0", "Q4_K", "Q6_K", "MXFP4", "F16", "BF16"]), M=st.integers(1, 12))
def test_gguf_mm_matches_reference(seed, mag, special, name, M):
    N, K = 8, 256
    data = gguf.quantize(_data((N, K), seed + 1, 1.0), name)
    x = _data((M, K), seed, mag, special)
    out = qkernels.gguf_mm(x, data, name, N, K)
    want = ref.OPS["gguf_mm"](x.double(), data, gguf.TYPES[name], N, K)
    wd = gguf.dequantize(data, name, (N, K)).double()
    bound = x.double().nan_to_num(0, 0, 0).abs() @ wd.abs().t()
    _check_gemm(out, want, bound, K, 1e-5)


# ---- refusals: every bad input names its argument ----------------------------------------------------------------


@pytest.mark.parametrize("call, exc, match", [
    (lambda: qkernels.unpack_int4(torch.zeros(2, 2, dtype=torch.uint8), "no"), TypeError, "signed must be a bool"),
    (lambda: qkernels.quantize_affine(torch.randn(2, 8), 4.0), TypeError, "bits must be an int"),
    (lambda: qkernels.quantize_affine(torch.randn(2, 8), 8, -1, "yes"), TypeError, "symmetric must be a bool"),
    (lambda: qkernels.quantize_affine(torch.tensor([[-3e38, 3e38]]), 8, -1, False), ValueError,
     "exceeds float32's largest value"),
    (lambda: qkernels.dequantize_affine(torch.zeros(2, 3, dtype=torch.int8), torch.ones(2, 1), group_size=2),
     ValueError, "last dim of q"),
    (lambda: qkernels.dequantize_affine(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2, 1), out_dtype="float32"),
     TypeError, "out_dtype must be a torch.dtype"),
    (lambda: qkernels.quantize_fp8(torch.randn(2, 8), saturate="no"), TypeError, "saturate must be a bool"),
    (lambda: qkernels.quantize_fp8(torch.randn(2, 8), "float8_e4m3fn"), TypeError, "dtype must be a torch float8"),
    (lambda: qkernels.quantize_fp4(torch.randn(2, 32), 4), TypeError, "format must be one of"),
    (lambda: gguf.quantize(torch.randn(2, 32), 2.5), TypeError, "type must be a ggml type name"),
    (lambda: gguf.quantize(torch.randn(2, 32), True), TypeError, "type must be a ggml type name"),
    (lambda: gguf.dequantize(torch.zeros(2, 18, dtype=torch.uint8), "Q4_0", (2, 32), None), TypeError,
     "dtype must be a torch.dtype"),
    (lambda: gguf.dequantize(torch.zeros(2, 18, dtype=torch.uint8), "Q4_0", 64), TypeError, "shape must be a"),
    (lambda: gguf.gguf_mm(torch.randn(2, 32), torch.zeros(4, 18, dtype=torch.uint8), "Q4_0", 4.0, 32), TypeError,
     "N must be an int"),
])
def test_wrong_types_and_values_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_k_zero_and_empty_operands_are_clear():
    with pytest.raises(ValueError, match="K must be positive"):
        wq, ws = qkernels.quantize_fp8(torch.randn(4, 8))
        qkernels.fp8_weight_only_mm(torch.randn(2, 0), wq[:, :0], torch.ones(4, 1))
    with pytest.raises(ValueError, match="a_q's last dim K must be positive"):
        q = torch.zeros(2, 0).to(torch.float8_e4m3fn)
        qkernels.fp8_mm(q, torch.ones(()), torch.zeros(3, 0).to(torch.float8_e4m3fn), torch.ones(()))
    with pytest.raises(ValueError, match="last dim of x must be positive"):
        qkernels.quantize_fp4(torch.randn(2, 0))
    with pytest.raises(ValueError, match="last dim of w_packed must be positive"):
        qkernels.fp4_weight_only_mm(torch.randn(2, 0), torch.zeros(3, 0, dtype=torch.uint8),
                                    torch.zeros(3, 0, dtype=torch.uint8))
    with pytest.raises(ValueError, match="K must be positive"):
        gguf.gguf_mm(torch.randn(3, 0), torch.zeros(4, 0, dtype=torch.uint8), "Q4_0", 4, 0)
    with pytest.raises(ValueError, match="last dim of x must be positive"):
        gguf.quantize(torch.randn(2, 0), "Q8_0")
    assert gguf.dequantize(torch.zeros(0, dtype=torch.uint8), "Q4_0", (4, 0)).shape == (4, 0)


def test_meta_tensors_give_shapes():
    w = torch.empty(4, 64, device="meta")
    q, s, zp = qkernels.quantize_affine(w, 4, 32, False)
    assert (q.shape, s.shape, zp.shape, q.device.type) == ((4, 64), (4, 2), (4, 2), "meta")
    assert qkernels.pack_int4(torch.empty(4, 8, dtype=torch.int8, device="meta")).shape == (4, 4)
    assert gguf.quantize(torch.empty(4, 256, device="meta"), "Q4_K").shape == (4, 144)
    assert gguf.quantize(w, "Q8_0", None).device.type == "meta"


def test_fp8_scale_shapes_checked_against_the_weight():
    """A [12, 1] slice of a [24, 1] per-row scale is refused rather than read as 2 x K blocks; an explicit block
    size is checked against the scale's shape."""
    wq, ws = qkernels.quantize_fp8(torch.randn(24, 256), granularity="row")
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match=r"w_scale of shape \(12, 1\) matches no scale layout"):
        qkernels.fp8_weight_only_mm(x, wq, ws[:12])
    with pytest.raises(ValueError, match=r"b_scale of shape \(12, 1\)"):
        qkernels.fp8_mm(*qkernels.quantize_fp8(x, granularity="row"), wq, ws[:12])
    wb, sb = qkernels.quantize_fp8(torch.randn(24, 256), granularity="block", block_size=(2, 32))
    with pytest.raises(ValueError, match="block size given is 4 x 32"):
        qkernels.fp8_weight_only_mm(x, wb, sb, w_block_size=(4, 32))
    want = x @ qkernels.dequantize_fp8(wb, sb, granularity="block", block_size=(2, 32)).t()
    assert torch.allclose(qkernels.fp8_weight_only_mm(x, wb, sb, w_block_size=(2, 32)), want, rtol=1e-4, atol=1e-4)
    wsq, ssq = qkernels.quantize_fp8(torch.randn(256, 256), granularity="block", block_size=(128, 128))
    assert qkernels.fp8_weight_only_mm(x, wsq, ssq).shape == (2, 256)  # square blocks need no block size


def test_gguf_imatrix_validated():
    x = torch.randn(2, 256)
    for im, match in [(torch.full((256,), math.nan), "NaN or inf"), (-torch.ones(256), ">= 0"),
                      (torch.zeros(256), r"imatrix\[0:16\] is all zero"), (torch.ones(128), r"shape \[256\]"),
                      (torch.ones(256, 1), "1-D")]:
        with pytest.raises((ValueError, TypeError), match=match):
            gguf.quantize(x, "Q6_K", im)
    im = torch.rand(256)
    im[32:64] = 0  # one zero 32-column sub-block: Q4_K refuses, and so does Q6_K (16-column sub-blocks)
    with pytest.raises(ValueError, match=r"imatrix\[32:64\] is all zero"):
        gguf.quantize(x, "Q4_K", im)
    im[40] = 1.0  # half of the 32-wide sub-block has weight: Q4_K fits, Q3_K (16 wide) still has [48:64] empty
    assert torch.equal(gguf.quantize(x, "Q4_K", im), ref.gguf.gguf_quantize(x, gguf.TYPES["Q4_K"], im))
    with pytest.raises(ValueError, match=r"imatrix\[48:64\] is all zero"):
        gguf.quantize(x, "Q3_K", im)


def test_gguf_fp16_header_overflow_refused():
    with pytest.raises(ValueError, match="largest Q4_1 can encode"):
        gguf.quantize(torch.full((1, 32), 1e5), "Q4_1")
    with pytest.raises(ValueError, match="largest Q6_K can encode"):
        gguf.quantize(torch.full((1, 256), 1e38), "Q6_K")
    d = gguf.dequantize(gguf.quantize(torch.full((1, 32), 6e4), "Q4_1"), "Q4_1", (1, 32))
    assert torch.isfinite(d).all() and (d - 6e4).abs().max() <= 6e4 * 1e-3
