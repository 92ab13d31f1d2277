"""fp4 elements (e2m1, e1m2), MXFP4 / NVFP4 block quantization and the fp4 scaled GEMM: every path against
qkernels.reference.float4 (bit-exact), e2m1 against ml_dtypes, MXFP4 against gguf's quantizer, NVFP4 decoding against
gguf's NVFP4 decoder, GEMMs against the fp64 reference; dispatch rows, bad input, opcheck, torch.compile."""

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkernels
from qkernels.dispatch import mock_device
from qkernels.ops import float4 as ops_float4
from qkernels.reference import float4 as r4

from .conftest import FLOAT_GEMM_RTOL as GEMM_RTOL
from .conftest import needs_extension, rel_err, requires_sm

# No module-wide skip: the reference, ml_dtypes and fallback tests run without qkernels._C too; the tests that
# need the compiled kernels (dispatch rows naming "cpu", opcheck, C++ messages) carry @needs_extension.

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
E1M2 = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]


def random_bits_f32(n, seed):
    g = np.random.default_rng(seed)
    return g.integers(0, 2**32, size=n, dtype=np.uint64).astype(np.uint32).view(np.float32)


def unpack(p):
    p = p.to(torch.int64)
    return torch.stack([p & 0xF, p >> 4], -1).reshape(*p.shape[:-1], -1)


# ---- elements ----------------------------------------------------------------------------------------------------


def test_e2m1_encode_bit_exact_vs_ml_dtypes():
    x = random_bits_f32(200_000, 1)
    x = x[~np.isnan(x)]  # e2m1 has no NaN; ml_dtypes maps NaN to +-0 by its sign bit, we to 0x8 (documented)
    x = np.concatenate([x, np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.5, 7.0, 1e-40, -0.0, -0.2, 1e30,
                                     np.inf], np.float32)])
    x = np.concatenate([x, -x])[: len(x) // 2 * 2]
    xt = torch.from_numpy(x.copy())
    packed = qkernels.fp4_encode(xt)
    with np.errstate(all="ignore"):
        want = x.astype(ml_dtypes.float4_e2m1fn).view(np.uint8)
    codes = unpack(packed).numpy()
    assert (codes == want).all(), f"{(codes != want).sum()} codes differ"
    assert torch.equal(packed, r4.fp4_encode(xt, "e2m1"))
    # packing: element 2i in the low nibble
    assert torch.equal(packed, torch.from_numpy((want[0::2] | (want[1::2] << 4)).astype(np.uint8)))


def test_nan_encodes_as_minus_zero_code():
    assert unpack(qkernels.fp4_encode(torch.tensor([float("nan"), 1.0]))).tolist() == [8, 2]


def test_decode_all_bytes():
    b = torch.arange(256, dtype=torch.uint8)
    out = qkernels.fp4_decode(b)
    want = np.stack([np.arange(256) & 0xF, np.arange(256) >> 4], -1).astype(np.uint8).view(ml_dtypes.float4_e2m1fn)
    assert torch.equal(out, torch.from_numpy(want.astype(np.float32).reshape(-1)))
    assert sorted(set(qkernels.fp4_decode(b, "e1m2").abs().tolist())) == E1M2
    assert torch.equal(qkernels.fp4_decode(b, "e1m2", torch.bfloat16), r4.fp4_decode(b, "e1m2", torch.bfloat16))


def _nearest_even(x, grid):
    """Independent oracle: nearest grid value, ties to the even code, saturating, sign kept."""
    a = np.abs(x)[:, None]
    g = np.array(grid)[None, :]
    d = np.abs(a - g)
    best = d.min(axis=1, keepdims=True)
    cand = d == best
    codes = np.where(cand.sum(1) > 1, np.argmax(cand & (np.arange(8) % 2 == 0)[None], 1), np.argmin(d, 1))
    return codes | (np.signbit(x).astype(np.int64) << 3)


def test_e1m2_encode_vs_brute_force():
    g = np.random.default_rng(3)
    x = np.concatenate([g.standard_normal(20_000) * 2, np.arange(-40, 41) / 8.0]).astype(np.float32)
    x = x[: len(x) // 2 * 2]
    codes = unpack(qkernels.fp4_encode(torch.from_numpy(x), "e1m2")).reshape(-1).numpy()
    assert (codes == _nearest_even(x, E1M2)).all()
    codes2 = unpack(qkernels.fp4_encode(torch.from_numpy(x), "e2m1")).reshape(-1).numpy()
    assert (codes2 == _nearest_even(x, E2M1)).all()


# ---- block formats ------------------------------------------------------------------------------------------------


def _data(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * torch.exp(torch.randn(shape[:-1] + (1,), generator=g) * 3)).to(dtype)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("element", ["e2m1", "e1m2"])
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (3, 5, 64), (130, 256)])
def test_quantize_matches_reference(fmt, element, shape):
    x = _data(shape, sum(shape))
    p, s, g = qkernels.quantize_fp4(x, fmt, element=element)
    pr, sr, gr = r4.quantize_fp4(x.reshape(-1, shape[-1]), fmt, element, None)
    assert torch.equal(p.reshape(pr.shape), pr) and torch.equal(s.view(torch.uint8).reshape(sr.shape), sr)
    assert (g is None) == (fmt == "mxfp4")
    if g is not None:
        assert torch.equal(g, gr)
    p2, s2, g2 = qkernels.quantize_fp4(x, fmt, element=element, backend="reference")
    assert torch.equal(p2, p) and torch.equal(s2.view(torch.uint8), s.view(torch.uint8))
    y = qkernels.dequantize_fp4(p, s, g, fmt, element=element)
    yr = r4.dequantize_fp4(pr, sr, gr, fmt, element, torch.float32).reshape(x.shape)
    assert torch.equal(y, yr)
    # error bound per block: rounding (half the largest code gap) plus clipping at the element max stay within
    # amax / 2 whenever the block scale is a normal number (MX always; NV unless amax_block / max / g < 2^-6, where
    # the e4m3 block scale is subnormal and coarse: NVFP4's limit for blocks far below the tensor's amax)
    B = 32 if fmt == "mxfp4" else 16
    xb, yb = x.reshape(-1, B), y.reshape(-1, B)
    amax = xb.abs().amax(-1, keepdim=True)
    ok = torch.ones_like(amax, dtype=torch.bool)
    if fmt == "nvfp4":
        ok = amax / r4.element_max(element) / g >= 2.0**-6
    assert ok.float().mean() > 0.5
    assert ((xb - yb).abs() <= amax / 2 * 1.0001)[ok.expand_as(xb)].all()


@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_noncontiguous(in_dtype):
    x = _data((64, 128), 5, in_dtype)
    for inp in (x, x.t().contiguous().t(), x[::2]):
        for fmt in ("mxfp4", "nvfp4"):
            p, s, g = qkernels.quantize_fp4(inp, fmt)
            pr, sr, _ = r4.quantize_fp4(inp.contiguous(), fmt, "e2m1", None)
            assert torch.equal(p, pr) and torch.equal(s.view(torch.uint8), sr)


def _gguf_mxfp4(x):
    """gguf's MXFP4 quantizer (llama.cpp's reference, same math in a different container) -> (codes, e8m0)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    R, K = x.shape
    blocks = quantize(x.numpy(), GGMLQuantizationType.MXFP4).reshape(R, K // 32, 17)
    e = blocks[..., 0]
    qs = blocks[..., 1:]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # gguf: element j low nibble, j + 16 high nibble
    return codes.reshape(R, K), e


def test_mxfp4_matches_gguf():
    x = _data((64, 256), 7)
    p, s, _ = qkernels.quantize_fp4(x, "mxfp4")
    codes = unpack(p).numpy()
    g_codes, g_e = _gguf_mxfp4(x)
    assert (s.view(torch.uint8).numpy() == g_e).all(), "E8M0 scales must equal gguf's floor(log2(amax)) - 2 + 127"
    # gguf's argmin picks +0 for small negatives (its table lists +0 first); we keep the sign (-0, code 8)
    ours = np.where(codes == 8, 0, codes)
    assert (ours == g_codes).all(), f"{(ours != g_codes).sum()} element codes differ from gguf"
    # and the dequantized values agree exactly
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    gy = dequantize(quantize(x.numpy(), GGMLQuantizationType.MXFP4), GGMLQuantizationType.MXFP4)
    assert torch.equal(qkernels.dequantize_fp4(p, s), torch.from_numpy(gy.reshape(x.shape)))


def test_mxfp4_ties_round_to_even_unlike_gguf():
    """Exact midpoints: MX v1.0 conversion rounds ties to even; gguf's argmin takes the smaller magnitude."""
    x = torch.zeros(1, 32)
    x[0, 0] = 4.0  # amax 4 -> X = 2^(2 - 2) = 1
    x[0, 1:8] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    p, s, _ = qkernels.quantize_fp4(x, "mxfp4")
    assert s.view(torch.uint8)[0, 0] == 127
    assert unpack(p)[0, :8].tolist() == [6, 0, 2, 2, 4, 4, 6, 6]  # 0, 1, 1, 2, 2, 4, 4 (even codes)
    g_codes, _ = _gguf_mxfp4(x)
    assert g_codes[0, 1:8].tolist() == [0, 1, 2, 3, 4, 5, 6]  # gguf: the lower neighbour


def test_nvfp4_decode_matches_gguf():
    """gguf's NVFP4 decoder (ggml's container: 4 e4m3 scales + 4 x 8 bytes per 64 values, global scale 1)."""
    from gguf.quants import NVFP4

    x = _data((4, 128), 8)
    gs = torch.ones(())
    p, s, g = qkernels.quantize_fp4(x, "nvfp4", global_scale=gs)
    codes = unpack(p).numpy().reshape(-1, 4, 16).astype(np.uint8)
    qs = (codes[..., :8] | (codes[..., 8:] << 4)).reshape(-1, 32)
    blocks = np.concatenate([s.view(torch.uint8).numpy().reshape(-1, 4), qs], axis=1)
    gy = NVFP4.dequantize_blocks(blocks).reshape(x.shape)
    assert torch.equal(qkernels.dequantize_fp4(p, s, g, "nvfp4"), torch.from_numpy(gy.astype(np.float32)))


def test_nvfp4_scales():
    x = _data((8, 64), 9)
    p, s, g = qkernels.quantize_fp4(x, "nvfp4")
    assert torch.equal(g, x.abs().max() / (448.0 * 6.0))
    sb = s.float()  # e4m3fn block scales
    want = (x.reshape(8, 4, 16).abs().amax(-1) / 6.0 / g).to(torch.float8_e4m3fn).float()
    assert torch.equal(sb, want)
    # a given global scale is used as is
    p2, s2, g2 = qkernels.quantize_fp4(x, "nvfp4", global_scale=torch.tensor(0.01))
    assert g2 == torch.tensor(0.01)


def test_nonfinite_blocks_and_zero_blocks():
    x = _data((2, 64), 10)
    x[0, 3] = float("nan")
    x[1, 40] = float("inf")
    x[1, :32] = 0
    for fmt in ("mxfp4", "nvfp4"):
        p, s, g = qkernels.quantize_fp4(x, fmt)
        y = qkernels.dequantize_fp4(p, s, g, fmt)
        B = 32 if fmt == "mxfp4" else 16
        nan_blocks = torch.isnan(y.reshape(2, -1, B)).all(-1)
        assert nan_blocks.tolist() == ([[True, False], [False, True]] if B == 32 else
                                       [[True, False, False, False], [False, False, True, False]])
        assert not torch.isnan(y.reshape(2, -1, B)[~nan_blocks]).any()
        assert torch.equal(y[1, :32], torch.zeros(32))
        pr, sr, _ = r4.quantize_fp4(x, fmt, "e2m1", None)
        assert torch.equal(p, pr) and torch.equal(s.view(torch.uint8), sr)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 6), nblocks=st.integers(1, 4), seed=st.integers(0, 2**31 - 1),
       fmt=st.sampled_from(["mxfp4", "nvfp4"]), element=st.sampled_from(["e2m1", "e1m2"]),
       scale_pow=st.integers(-60, 60))
def test_quantize_property(rows, nblocks, seed, fmt, element, scale_pow):
    B = 32 if fmt == "mxfp4" else 16
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, nblocks * B, generator=g) * 2.0**scale_pow
    p, s, gs = qkernels.quantize_fp4(x, fmt, element=element)
    pr, sr, gr = r4.quantize_fp4(x, fmt, element, None)
    assert torch.equal(p, pr) and torch.equal(s.view(torch.uint8), sr)


# ---- GEMM ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("element", ["e2m1", "e1m2"])
@pytest.mark.parametrize("M", [1, 5, 64, 128])
def test_fp4_mm_matches_reference(fmt, element, M):
    N, K = 48, 256
    a = _data((M, K), M)
    w = _data((N, K), 100 + M) * 0.1
    ap, as_, ag = qkernels.quantize_fp4(a, fmt, element=element)
    wp, ws, wg = qkernels.quantize_fp4(w, fmt, element=element)
    bias = torch.randn(N)
    kw = dict(format=fmt, element=element, a_global_scale=ag, b_global_scale=wg)
    ad = qkernels.dequantize_fp4(ap, as_, ag, fmt, element=element, out_dtype=torch.float64)
    wd = qkernels.dequantize_fp4(wp, ws, wg, fmt, element=element, out_dtype=torch.float64)
    want = ad @ wd.t() + bias.double()
    for out_dtype in (torch.float32, torch.bfloat16):
        out = qkernels.fp4_mm(ap, as_, wp, ws, out_dtype, bias, **kw)
        assert out.dtype == out_dtype and out.shape == (M, N)
        assert rel_err(out, want) < GEMM_RTOL[out_dtype]
    outr = qkernels.fp4_mm(ap, as_, wp, ws, torch.float32, bias, backend="reference", **kw)
    assert torch.equal(outr, want.float())


def test_fp4_mm_batched_and_nan():
    a = _data((2, 3, 64), 11)
    w = _data((16, 64), 12)
    ap, as_, _ = qkernels.quantize_fp4(a, "mxfp4")
    wp, ws, _ = qkernels.quantize_fp4(w, "mxfp4")
    out = qkernels.fp4_mm(ap, as_, wp, ws, torch.float32)
    assert out.shape == (2, 3, 16)
    flat = qkernels.fp4_mm(ap.reshape(6, 32), as_.reshape(6, 2), wp, ws, torch.float32)
    assert torch.equal(out.reshape(6, 16), flat)
    a[0, 1, 7] = float("nan")
    ap, as_, _ = qkernels.quantize_fp4(a, "mxfp4")
    out = qkernels.fp4_mm(ap, as_, wp, ws, torch.float32)
    assert torch.isnan(out[0, 1]).all() and not torch.isnan(out[1]).any()


def test_to_blocked_layout():
    """The swizzle handed to block-scaled torch._scaled_mm, against cuBLAS's documented index formula for 1-D block
    scaling factors: tile (r // 128, c // 4), offset (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4 within 512."""
    rows, cols = 200, 6
    s = torch.randint(0, 256, (rows, cols), dtype=torch.uint8)
    out = ops_float4._to_blocked(s)
    pc = -(-cols // 4) * 4
    assert out.numel() == 256 * pc
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    idx = ((r // 128) * (pc // 4) + c // 4) * 512 + (r % 32) * 16 + ((r % 128) // 32) * 4 + c % 4
    assert torch.equal(out[idx.reshape(-1)], s.reshape(-1))


# ---- dispatch ----------------------------------------------------------------------------------------------------


@needs_extension
@pytest.mark.parametrize("device,ctx,backend", [
    ("sm100", dict(format="mxfp4", element="e2m1", K=256, N=64), "native"),
    ("sm100", dict(format="nvfp4", element="e2m1", K=256, N=64), "native"),
    ("sm100", dict(format="nvfp4", element="e1m2", K=256, N=64), "cuda"),
    ("sm100", dict(format="mxfp4", element="e2m1", K=256, N=40), "cuda"),
    ("sm90", dict(format="mxfp4", element="e2m1", K=256, N=64), "cuda"),
    ("sm89", dict(format="nvfp4", element="e2m1", K=256, N=64), "cuda"),
    ("sm80", dict(format="mxfp4", element="e2m1", K=256, N=64), "cuda"),
    ("gfx942", dict(format="mxfp4", element="e2m1", K=256, N=64), "reference"),
    ("gfx90a", dict(format="mxfp4", element="e2m1", K=256, N=64), "reference"),
    ("cpu", dict(format="mxfp4", element="e2m1", K=256, N=64), "cpu"),
])
def test_dispatch_fp4_mm(device, ctx, backend):
    # assume_compiled: as if the extension had CUDA kernels for this arch (the emulated CUDA GEMM)
    with mock_device(device):
        d = qkernels.explain("fp4_mm", assume_compiled=True, **ctx)
    assert d.backend == backend, str(d)
    if backend in ("reference", "cuda"):
        assert "emulated" in d.reason


@needs_extension
@pytest.mark.parametrize("op", ["fp4_encode", "fp4_decode", "quantize_fp4", "dequantize_fp4"])
@pytest.mark.parametrize("device,backend", [("cpu", "cpu"), ("sm80", "cuda"), ("sm89", "cuda"), ("sm90", "cuda"),
                                            ("sm100", "cuda"), ("gfx942", "triton"), ("gfx90a", "triton")])
def test_dispatch_fp4_casts(op, device, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    with mock_device(device):
        assert qkernels.explain(op, assume_compiled=True).backend == backend


def test_forcing_native_fp4_without_hardware():
    ap, as_, _ = qkernels.quantize_fp4(torch.randn(4, 64), "mxfp4")
    for dev in ("sm90", "cpu", "gfx942"):
        with mock_device(dev), pytest.raises(RuntimeError, match="backend 'native' was forced for fp4_mm.*sm100"):
            qkernels.fp4_mm(ap, as_, ap, as_, torch.float32, backend="native")


# ---- bad input -----------------------------------------------------------------------------------------------------


@needs_extension
def test_bad_input_messages():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="format must be one of \\('mxfp4', 'nvfp4'\\), got 'fp4'"):
        qkernels.quantize_fp4(x, "fp4")
    with pytest.raises(ValueError, match="element must be one of \\('e2m1', 'e1m2'\\), got 'e3m0'"):
        qkernels.quantize_fp4(x, element="e3m0")
    with pytest.raises(ValueError, match="last dim of x \\(48\\) must be a multiple of the mxfp4 block size 32"):
        qkernels.quantize_fp4(torch.randn(4, 48))
    with pytest.raises(ValueError, match="global_scale is only used by format='nvfp4'"):
        qkernels.quantize_fp4(x, global_scale=torch.ones(()))
    p, s, _ = qkernels.quantize_fp4(x, "mxfp4")
    with pytest.raises(ValueError, match="scale must have shape \\(4, 2\\).*got \\(4, 3\\)"):
        qkernels.dequantize_fp4(p, torch.zeros(4, 3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="scale must have dtype float8_e8m0fnu"):
        qkernels.dequantize_fp4(p, s.view(torch.uint8).view(torch.float8_e4m3fn))
    p2, s2, g2 = qkernels.quantize_fp4(x, "nvfp4")
    with pytest.raises(ValueError, match="global_scale \\(the fp32 per-tensor scale.*required"):
        qkernels.dequantize_fp4(p2, s2, None, "nvfp4")
    with pytest.raises(ValueError, match="b_packed must have shape \\[N, K/2\\] with K/2=32"):
        qkernels.fp4_mm(p, s, p[:, :16], s[:, :1])
    with pytest.raises(ValueError, match="b_global_scale must have one element"):
        qkernels.fp4_mm(p2, s2, p2, s2, format="nvfp4", a_global_scale=g2, b_global_scale=torch.ones(2))
    with pytest.raises(ValueError, match="last dim of x must be even"):
        qkernels.fp4_encode(torch.randn(3))
    with pytest.raises(TypeError, match="packed must have dtype uint8"):
        qkernels.fp4_decode(torch.zeros(3, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="element must be 'e2m1' or 'e1m2', got 'e4m3'"):
        torch.ops.qkernels.fp4_encode(x, "e4m3")
    with pytest.raises(RuntimeError, match="format must be 'mxfp4' or 'nvfp4', got 'mx'"):
        torch.ops.qkernels.quantize_fp4(x, "mx", "e2m1", None)
    with pytest.raises(RuntimeError, match="a_scale must have shape \\[4, 2\\]"):
        torch.ops.qkernels.fp4_mm(p, s.view(torch.uint8)[:, :1], torch.ones(()), p, s.view(torch.uint8),
                                  torch.ones(()), "mxfp4", "e2m1", None, torch.float32)


# ---- opcheck / compile ---------------------------------------------------------------------------------------------


@needs_extension
def test_opcheck():
    x = _data((8, 64), 13)
    ops = torch.ops.qkernels
    torch.library.opcheck(ops.fp4_encode.default, (x, "e2m1"))
    packed = ops.fp4_encode(x, "e1m2")
    torch.library.opcheck(ops.fp4_decode.default, (packed, "e1m2", torch.bfloat16))
    for fmt in ("mxfp4", "nvfp4"):
        torch.library.opcheck(ops.quantize_fp4.default, (x, fmt, "e2m1", None))
        torch.library.opcheck(ops.quantize_fp4.default, (x, fmt, "e2m1", torch.tensor(0.5)))
        p, s, g = ops.quantize_fp4(x, fmt, "e2m1", None)
        torch.library.opcheck(ops.dequantize_fp4.default, (p, s, g, fmt, "e2m1", torch.float32))
        torch.library.opcheck(ops.fp4_mm.default, (p, s, g, p[:4], s[:4], g, fmt, "e2m1", torch.randn(4),
                                                   torch.float32))


@needs_extension
def test_torch_compile_fullgraph():
    def f(x, wp, ws, wg):
        xp, xs, xg = qkernels.quantize_fp4(x, "nvfp4")
        return qkernels.fp4_mm(xp, xs, wp, ws, torch.float32, format="nvfp4", a_global_scale=xg, b_global_scale=wg)

    wp, ws, wg = qkernels.quantize_fp4(torch.randn(32, 64), "nvfp4")
    x = torch.randn(8, 64)
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x, wp, ws, wg)
    assert torch.equal(out, f(x, wp, ws, wg))


# ---- GPU (scripts/gpu_check.sh) -------------------------------------------------------------------------------------


@pytest.mark.gpu
@requires_sm(10, 0)
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_gpu_native_fp4_mm(fmt):
    """Block-scaled torch._scaled_mm (swizzled scales) against the fp64 reference of the same operands."""
    a = torch.randn(128, 256, device="cuda")
    w = torch.randn(64, 256, device="cuda") * 0.05
    ap, as_, ag = qkernels.quantize_fp4(a, fmt)
    wp, ws, wg = qkernels.quantize_fp4(w, fmt)
    d = qkernels.explain("fp4_mm", "cuda", format=fmt, element="e2m1", K=256, N=64)
    out = qkernels.fp4_mm(ap, as_, wp, ws, torch.bfloat16, format=fmt, a_global_scale=ag, b_global_scale=wg)
    want = qkernels.fp4_mm(ap, as_, wp, ws, torch.float64, format=fmt, a_global_scale=ag, b_global_scale=wg,
                           backend="reference")
    assert d.backend == "native" and rel_err(out, want) < 8e-3, str(d)


def test_empty_inputs():
    p, s, g = qkernels.quantize_fp4(torch.empty(0, 64), "nvfp4")
    assert p.shape == (0, 32) and s.shape == (0, 4) and g == 1
    w, ws, wg = qkernels.quantize_fp4(torch.randn(8, 64), "nvfp4")
    out = qkernels.fp4_mm(p, s, w, ws, torch.float32, format="nvfp4", a_global_scale=g, b_global_scale=wg)
    assert out.shape == (0, 8)
    assert qkernels.dequantize_fp4(p, s, g, "nvfp4").shape == (0, 64)
