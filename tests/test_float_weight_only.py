"""fp8_weight_only_mm / fp4_weight_only_mm (float x times an fp8 / fp4 weight): every CPU path (the fused AVX2
kernel for up to 16 rows of x, decode + sgemm beyond, the portable loops) against the fp64 reference, the dispatch
rows, bad input, opcheck and torch.compile."""

import pytest
import torch

import qkernels
from qkernels import dispatch
from qkernels import reference as ref

from .conftest import FLOAT_GEMM_RTOL, rel_err

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz]
# the result is rounded to x's dtype once; fp32 sums over K <= 384 stay far below these
RTOL = FLOAT_GEMM_RTOL
# (granularity, block_size) of the weight: per tensor, per channel, 1 x 128 and 128 x 128 blocks, and an odd grid
FP8_GRIDS = [("tensor", 128), ("row", 128), ("block", 128), ("block", (128, 128)), ("block", (2, 32))]


def _fp8_weight(N, K, dtype, gran, bs, seed):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * 0.05
    return qkernels.quantize_fp8(w, dtype, gran, bs)


@pytest.mark.parametrize("dtype", FP8)
@pytest.mark.parametrize("grid", FP8_GRIDS, ids=str)
@pytest.mark.parametrize("M", [1, 3, 16, 17, 40])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_weight_only_matches_reference(isa_pair, dtype, grid, M, x_dtype):
    N, K = 256, 384
    wq, ws = _fp8_weight(N, K, dtype, *grid, seed=M)
    gen = torch.Generator().manual_seed(100 + M)
    x = torch.randn(M, K, generator=gen).to(x_dtype)
    bias = torch.randn(N, generator=gen)
    # 2 x 32 blocks must be named: such a grid is shaped like a per-row scale with rows missing
    bsz = grid[1] if grid[1] == (2, 32) else None
    grid = ws.reshape(1, 1) if ws.dim() == 0 else ws
    want = ref.OPS["fp8_weight_only_mm"](x.double(), wq.view(torch.uint8), grid, dtype, bias)
    fast, slow = isa_pair(lambda: qkernels.fp8_weight_only_mm(x, wq, ws, bias, w_block_size=bsz))
    for out in (fast, slow):
        assert out.dtype == x_dtype and out.shape == (M, N)
        assert rel_err(out, want) < RTOL[x_dtype]


def test_fp8_weight_only_batched_no_bias_and_nan():
    wq, ws = _fp8_weight(20, 64, torch.float8_e4m3fn, "row", 128, 1)
    x = torch.randn(2, 3, 64)
    out = qkernels.fp8_weight_only_mm(x, wq, ws)
    assert out.shape == (2, 3, 20)
    assert torch.equal(out.reshape(6, 20), qkernels.fp8_weight_only_mm(x.reshape(6, 64), wq, ws))
    x[1, 2, 5] = float("nan")
    out = qkernels.fp8_weight_only_mm(x, wq, ws)
    assert out[1, 2].isnan().all() and out.reshape(6, 20)[:5].isfinite().all()
    # the layer's own scale shapes ([N] and 0-d) work too
    assert torch.equal(qkernels.fp8_weight_only_mm(x[0], wq, ws.reshape(-1)),
                       qkernels.fp8_weight_only_mm(x[0], wq, ws))


def test_fp8_weight_only_shapes_outside_the_fused_kernel(isa_pair):
    """K % 16 != 0 and a transposed (non-contiguous) x: the decode + sgemm path at M = 1, same results."""
    wq, ws = _fp8_weight(24, 40, torch.float8_e5m2, "block", (4, 8), 6)
    x = torch.randn(40, 2).t()
    want = ref.OPS["fp8_weight_only_mm"](x.double(), wq.view(torch.uint8), ws, wq.dtype, None)
    fast, slow = isa_pair(lambda: qkernels.fp8_weight_only_mm(x, wq, ws, w_block_size=(4, 8)))
    for out in (fast, slow):
        assert rel_err(out, want) < RTOL[torch.float32]


def test_fp8_weight_only_does_not_modify_inputs():
    wq, ws = _fp8_weight(16, 64, torch.float8_e4m3fn, "row", 128, 2)
    x, b = torch.randn(2, 64), torch.randn(16)
    copies = [t.clone() for t in (x, wq.view(torch.uint8), ws, b)]
    qkernels.fp8_weight_only_mm(x, wq, ws, b)
    for before, after in zip(copies, (x, wq.view(torch.uint8), ws, b)):
        assert torch.equal(before, after)


# K = 128: bf16 x at M < 4 takes the int16-activation kernel (K % 64 == 0); K = 96 the fp32 one; K = 48 (nvfp4 only: mxfp4
# blocks are 32 elements) is no multiple of 32: the emulation at every M
@pytest.mark.parametrize("fmt,K", [("mxfp4", 128), ("nvfp4", 128), ("mxfp4", 96), ("nvfp4", 96), ("nvfp4", 48)])
@pytest.mark.parametrize("element", ["e2m1", "e1m2"])
@pytest.mark.parametrize("M", [1, 5, 16, 17, 40])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_fp4_weight_only_matches_reference(isa_pair, fmt, K, element, M, x_dtype):
    N = 70
    gen = torch.Generator().manual_seed(M + K)
    w = torch.randn(N, K, generator=gen) * 0.1
    wp, ws, wg = qkernels.quantize_fp4(w, fmt, element=element)
    g = wg if fmt == "nvfp4" else None
    x = torch.randn(M, K, generator=gen).to(x_dtype)
    bias = torch.randn(N, generator=gen)
    kw = dict(format=fmt, element=element, w_global_scale=g)
    # the op takes the scale codes as uint8 (quantize_fp4 returns them as float8_e8m0fnu / float8_e4m3fn)
    want = ref.OPS["fp4_weight_only_mm"](x.double(), wp, ws.view(torch.uint8), wg if fmt == "nvfp4" else torch.ones(()),
                                         fmt, element, bias)
    fast, slow = isa_pair(lambda: qkernels.fp4_weight_only_mm(x, wp, ws, bias, **kw))
    for out in (fast, slow):
        assert out.dtype == x_dtype and out.shape == (M, N)
        assert rel_err(out, want) < RTOL[x_dtype]


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("i16", ["1", "0"])
def test_fp4_weight_only_int16_and_fp32_kernels(monkeypatch, fmt, i16):
    """bf16 x on the int16-activation kernel (default, M < 4) and on the fp32 one (QKERNELS_CPU_I16=0, and M >= 4),
    every tile shape, against the fp64 reference; x with NaN falls back to the fp32 kernel and gives NaN in its row
    only."""
    monkeypatch.setenv("QKERNELS_CPU_I16", i16)
    gen = torch.Generator().manual_seed(7)
    N, K = 37, 256
    wp, ws, wg = qkernels.quantize_fp4(torch.randn(N, K, generator=gen) * 0.1, fmt)
    g = wg if fmt == "nvfp4" else None
    for M in (1, 2, 3, 4, 8, 16):
        x = (torch.randn(M, K, generator=gen) * torch.logspace(-2, 2, K)).bfloat16()  # a wide range per block
        want = ref.OPS["fp4_weight_only_mm"](x.double(), wp, ws.view(torch.uint8), wg if g is not None else
                                             torch.ones(()), fmt, "e2m1", None)
        out = qkernels.fp4_weight_only_mm(x, wp, ws, format=fmt, w_global_scale=g)
        assert rel_err(out, want) < RTOL[torch.bfloat16], M
    x = x[:3].clone()
    x[1, 5] = float("nan")
    out = qkernels.fp4_weight_only_mm(x, wp, ws, format=fmt, w_global_scale=g)
    assert out[1].isnan().all() and out[torch.arange(3) != 1].isfinite().all()


def test_fp4_weight_only_nan_block():
    w = torch.randn(12, 64)
    w[4, 3] = float("nan")
    wp, ws, _ = qkernels.quantize_fp4(w, "mxfp4")
    out = qkernels.fp4_weight_only_mm(torch.randn(2, 64), wp, ws)
    assert out[:, 4].isnan().all() and out[:, torch.arange(12) != 4].isfinite().all()


# ---- bad input ---------------------------------------------------------------------------------------------------


def test_fp8_weight_only_bad_input():
    wq, ws = _fp8_weight(16, 64, torch.float8_e4m3fn, "row", 128, 3)
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="x"):
        qkernels.fp8_weight_only_mm(x.int(), wq, ws)
    with pytest.raises(ValueError, match="w_q.dtype must be one of float8_e4m3fn"):
        qkernels.fp8_weight_only_mm(x, wq.view(torch.uint8), ws)
    with pytest.raises(ValueError, match=r"w_q must have shape \[N, K\] with K=32"):
        qkernels.fp8_weight_only_mm(x[:, :32], wq, ws)
    with pytest.raises(ValueError, match="w_scale"):
        qkernels.fp8_weight_only_mm(x, wq, torch.ones(3, 5))
    with pytest.raises(ValueError, match=r"bias must have shape \[N\] = \[16\]"):
        qkernels.fp8_weight_only_mm(x, wq, ws, torch.zeros(15))
    # the C++ checks name the arguments too (the op called directly)
    with pytest.raises(RuntimeError, match="w_dtype must be one of"):
        torch.ops.qkernels.fp8_weight_only_mm(x, wq.view(torch.uint8), ws, torch.int8, None)
    with pytest.raises(RuntimeError, match=r"w must have shape \[N, K\] with K=32"):
        torch.ops.qkernels.fp8_weight_only_mm(x[:, :32], wq.view(torch.uint8), ws, torch.float8_e4m3fn, None)


def test_fp4_weight_only_bad_input():
    wp, ws, wg = qkernels.quantize_fp4(torch.randn(16, 64), "nvfp4")
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="w_global_scale .* is required for format='nvfp4'"):
        qkernels.fp4_weight_only_mm(x, wp, ws, format="nvfp4")
    with pytest.raises(TypeError, match="w_scale must have dtype float8_e8m0fnu .* for format='mxfp4'"):
        qkernels.fp4_weight_only_mm(x, wp, ws[:, :2], format="mxfp4")
    with pytest.raises(ValueError, match="w_global_scale is only used by format='nvfp4'"):
        qkernels.fp4_weight_only_mm(x, wp, ws.view(torch.uint8)[:, :2], format="mxfp4", w_global_scale=wg)
    with pytest.raises(ValueError, match=r"w_packed must have shape \[N, K/2\] with K/2=16"):
        qkernels.fp4_weight_only_mm(x[:, :32], wp, ws, format="nvfp4", w_global_scale=wg)
    with pytest.raises(ValueError, match="format must be"):
        qkernels.fp4_weight_only_mm(x, wp, ws, format="fp4", w_global_scale=wg)
    with pytest.raises(RuntimeError, match="w_scale must have shape"):
        torch.ops.qkernels.fp4_weight_only_mm(x, wp, ws.view(torch.uint8)[:, :3], wg, "nvfp4", "e2m1", None)


# ---- dispatch, opcheck, compile ----------------------------------------------------------------------------------


def _has_triton():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.parametrize("op", ["fp8_weight_only_mm", "fp4_weight_only_mm"])
@pytest.mark.parametrize("device,backend", [("cpu", "cpu"), ("sm80", "cuda"), ("sm90", "cuda"), ("sm100", "cuda"),
                                            ("gfx942", "triton")])
def test_dispatch(op, device, backend):
    # NVIDIA: the CUDA build's decode + cuBLAS (the Triton kernel where the build lacks the arch); ROCm: the Triton
    # kernel (plain PyTorch where triton is missing)
    if backend == "triton" and not _has_triton():
        backend = "reference"
    with dispatch.mock_device(device):
        d = qkernels.explain(op, assume_compiled=device != "gfx942")
    assert d.backend == backend, str(d)


def test_opcheck():
    wq, ws = _fp8_weight(16, 64, torch.float8_e4m3fn, "block", (8, 32), 4)
    x = torch.randn(3, 64)
    torch.library.opcheck(torch.ops.qkernels.fp8_weight_only_mm.default,
                          (x, wq.view(torch.uint8), ws, torch.float8_e4m3fn, torch.randn(16)))
    torch.library.opcheck(torch.ops.qkernels.fp8_weight_only_mm.default,
                          (x.bfloat16(), wq.view(torch.uint8), ws, torch.float8_e4m3fn, None))
    wp, s4, g4 = qkernels.quantize_fp4(torch.randn(16, 64), "nvfp4")
    torch.library.opcheck(torch.ops.qkernels.fp4_weight_only_mm.default,
                          (x, wp, s4.view(torch.uint8), g4, "nvfp4", "e2m1", None))


def test_torch_compile_fullgraph():
    wq, ws = _fp8_weight(32, 64, torch.float8_e4m3fn, "row", 128, 5)
    wp, s4, _ = qkernels.quantize_fp4(torch.randn(32, 64), "mxfp4")

    def f(x):
        return qkernels.fp8_weight_only_mm(x, wq, ws) + qkernels.fp4_weight_only_mm(x, wp, s4)

    x = torch.randn(4, 64)
    torch._dynamo.reset()
    assert torch.allclose(torch.compile(f, fullgraph=True)(x), f(x))
