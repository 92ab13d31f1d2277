"""GGUF block formats: encoders/decoders vs llama.cpp (golden bytes from its own C code) and gguf-py, the C++ kernels vs
the reference, gguf_mm, GGUFLinear, opcheck, torch.compile, hypothesis, bad input."""

import os

import numpy as np
import pytest
import torch

import qkernels
from qkernels import gguf as qg
from qkernels.reference import gguf as R

from .conftest import GEMM_RTOL, rel_err, requires_sm

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as GT  # noqa: E402

HAS_C = qkernels.HAS_EXTENSION
needs_c = pytest.mark.skipif(not HAS_C, reason="qkernels._C not built")
GOLDEN = os.path.join(os.path.dirname(__file__), "data", "gguf_llamacpp_golden.npz")

ALL = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
GGUFPY_QUANTIZE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4"]  # what gguf-py can encode
CPU_ENCODE = ALL
K_TYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def data_rows(rows, cols, seed=0):
    """Gaussian rows plus edge rows: scaled, zero block, constant block, heavy tails, one-signed, tiny, outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g)
    if rows >= 8:
        x[1] *= 100
        x[2, : min(cols, 256)] = 0
        x[3, : min(cols, 64)] = 1.5
        x[4] = torch.distributions.StudentT(2.0).sample((cols,))
        x[5] = x[5].abs()
        x[6] *= 1e-3
        x[7, ::37] *= 30
    return x


def same_floats(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a.shape == b.shape and bool(((a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))).all())


# ---- oracles ---------------------------------------------------------------------------------------------------


# (type, with imatrix): the imatrix applies to the K-quants (docs/gguf.md)
GOLDEN_CASES = [(n, False) for n in ALL] + [(n, True) for n in K_TYPES]


@pytest.mark.parametrize("name,with_imatrix", GOLDEN_CASES)
def test_reference_encoder_matches_llamacpp_golden(name, with_imatrix):
    """Bytes produced by llama.cpp's ggml-quants.c (benchmarks/gguf_llamacpp_oracle.py) on seeded data."""
    g = np.load(GOLDEN)
    x = torch.from_numpy(g["x"])
    im = torch.from_numpy(g["imatrix"]) if with_imatrix else None
    want = g[name + ("_imatrix" if with_imatrix else "")]
    got = R.gguf_quantize(x, R.TYPES[name], im).numpy()
    assert got.shape == want.shape
    bad = np.nonzero((got != want).any(1))[0]
    assert len(bad) == 0, f"rows {bad} differ from llama.cpp"


@needs_c
@pytest.mark.parametrize("name,with_imatrix", [c for c in GOLDEN_CASES if c[0] in CPU_ENCODE])
def test_cpp_encoder_matches_llamacpp_golden(name, with_imatrix):
    g = np.load(GOLDEN)
    x = torch.from_numpy(g["x"])
    im = torch.from_numpy(g["imatrix"]) if with_imatrix else None
    want = g[name + ("_imatrix" if with_imatrix else "")]
    got = torch.ops.qkernels.gguf_quantize(x, R.TYPES[name], im).numpy()
    assert (got == want).all()


@pytest.mark.parametrize("name", GGUFPY_QUANTIZE)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_encoder_matches_gguf_py(name, backend):
    if backend == "cpu" and not HAS_C:
        pytest.skip("no extension")
    x = data_rows(16, 320, seed=1)
    x[9, 5] = 2.0 ** 20  # exact powers of two and just below them exercise MXFP4's floor(log2)
    x[10, 7] = float(np.nextafter(np.float32(4.0), np.float32(0)))
    for b in range(10):  # block maxima one ulp below 2^k: floor(log2f(.)) rounds up there
        x[12, 32 * b: 32 * b + 32] *= 1e-3
        x[12, 32 * b] = float(np.nextafter(np.float32(2.0 ** (3 * b - 12)), np.float32(0)))
    x[11, :32] = torch.linspace(-3, 3, 32)
    if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        # 2^20 overflows these types' fp16 block scales: gguf-py (like llama.cpp) would store inf; refused here
        with pytest.raises(ValueError, match=f"exceeds .* the largest {name} can encode"):
            qg.quantize(x, name, backend=backend)
        x[9, 5] = 2.0 ** 15
    got = qg.quantize(x, name, backend=backend).numpy()
    want = gguf.quants.quantize(x.numpy(), GT[name])
    assert got.shape == want.shape and (got == want).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_decoder_matches_gguf_py_on_random_bytes(name, backend):
    """Every byte pattern, including inf/NaN scales: the floats must be bit-identical to gguf-py's."""
    if backend == "cpu" and not HAS_C:
        pytest.skip("no extension")
    t = R.TYPES[name]
    bs, ts = R.BLOCK[t]
    cols = bs * 3
    g = torch.Generator().manual_seed(t)
    data = torch.randint(0, 256, (5, cols // bs * ts), dtype=torch.uint8, generator=g)
    got = qg.dequantize(data, name, (5, cols), backend=backend).numpy()
    with np.errstate(all="ignore"):
        want = gguf.quants.dequantize(data.numpy(), GT[name])
    assert same_floats(got, want)


# ---- C++ vs reference --------------------------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("name", CPU_ENCODE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_encoder_matches_reference(name, dtype):
    bs = R.BLOCK[R.TYPES[name]][0]
    x = data_rows(9, bs * 2, seed=3).to(dtype)
    ref = qg.quantize(x, name, backend="reference")
    got = qg.quantize(x, name, backend="cpu")
    assert torch.equal(got, ref)


@needs_c
@pytest.mark.parametrize("name", K_TYPES)
def test_cpp_encoder_imatrix_matches_reference(name):
    x = data_rows(8, 512, seed=4)
    im = torch.rand(512, generator=torch.Generator().manual_seed(5)) * 4
    im[:7] = 0  # zero importance on some columns
    assert torch.equal(qg.quantize(x, name, im, backend="cpu"), qg.quantize(x, name, im, backend="reference"))


@needs_c
@pytest.mark.parametrize("name", ALL + ["F32", "F16", "BF16"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_cpp_decoder_matches_reference(name, out_dtype):
    t = R.TYPES[name]
    bs, ts = R.BLOCK[t]
    x = data_rows(8, 256 if bs > 1 else 40, seed=6)
    data = qg.quantize(x, name, backend="reference")
    ref = qg.dequantize(data, name, x.shape, out_dtype, backend="reference")
    got = qg.dequantize(data, name, x.shape, out_dtype, backend="cpu")
    assert torch.equal(got.view(torch.int16 if out_dtype != torch.float32 else torch.int32),
                       ref.view(torch.int16 if out_dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("name", ALL)
def test_roundtrip_error_is_small(name):
    """Sanity bound on the reconstruction error (the exact numbers are in benchmarks/RESULTS_gguf.md)."""
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(7))
    y = qg.dequantize(qg.quantize(x, name), name, x.shape)
    bound = {"Q2_K": 0.45, "Q3_K": 0.25, "MXFP4": 0.2, "Q4_0": 0.15, "Q4_1": 0.12, "Q4_K": 0.1,
             "Q5_0": 0.07, "Q5_1": 0.06, "Q5_K": 0.05, "Q6_K": 0.025, "Q8_0": 0.006}[name]
    rel = ((y - x).norm() / x.norm()).item()
    assert rel < bound, rel


# ---- gguf_mm and GGUFLinear ------------------------------------------------------------------------------------


@needs_c
@pytest.mark.parametrize("name", ["Q4_0", "Q8_0", "Q4_K", "Q6_K", "Q2_K", "MXFP4", "F16"])
@pytest.mark.parametrize("M", [1, 3, 17, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gguf_mm_matches_fp64_reference(name, M, dtype):
    N, K = 45, 512
    w = torch.randn(N, K)
    data = qg.quantize(w, name)
    wd = qg.dequantize(data, name, (N, K)).double()
    x = torch.randn(M, K).to(dtype)
    ref = x.double() @ wd.t()
    got = qkernels.gguf_mm(x, data, name, N, K, backend="cpu")
    assert got.dtype == dtype and got.shape == (M, N)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # fp32 accumulation; bf16 output rounding
    assert ((got.double() - ref).norm() / ref.norm()).item() < tol


@needs_c
def test_gguf_mm_noncontiguous_and_batched_input():
    N, K = 33, 256
    data = qg.quantize(torch.randn(N, K), "Q4_K")
    x = torch.randn(2, K, 5).transpose(1, 2)  # [2, 5, K], non-contiguous
    got = qkernels.gguf_mm(x, data, "Q4_K", N, K)
    ref = x @ qg.dequantize(data, "Q4_K", (N, K)).t()
    assert got.shape == (2, 5, N)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_gguf_mm_empty():
    data = qg.quantize(torch.randn(8, 64), "Q8_0")
    assert qkernels.gguf_mm(torch.randn(0, 64), data, "Q8_0", 8, 64).shape == (0, 8)


def test_gguf_linear_from_float_and_forward():
    lin = torch.nn.Linear(256, 40, bias=True)
    q = qg.GGUFLinear.from_float(lin, "Q6_K")
    x = torch.randn(3, 256)
    ref = x @ q.dequantize_weight().t() + lin.bias
    torch.testing.assert_close(q(x), ref, rtol=1e-5, atol=1e-4)
    assert "Q6_K" in repr(q)
    sd = q.state_dict()
    q2 = qg.GGUFLinear(256, 40, "Q6_K", bias=torch.zeros(40))
    q2.load_state_dict(sd)
    assert torch.equal(q2(x), q(x))


@needs_c
def test_gguf_linear_torch_compile_fullgraph():
    q = qg.GGUFLinear.from_float(torch.nn.Linear(512, 64, bias=False), "Q4_K")
    x = torch.randn(4, 512)
    # aot_eager traces through the fake kernels and functionalization like inductor does, at a fraction of the cost
    compiled = torch.compile(q, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), q(x))


@needs_c
@pytest.mark.parametrize("name", ["Q4_0", "Q4_K", "Q6_K"])
def test_opcheck(name):
    t = R.TYPES[name]
    x = torch.randn(4, 256)
    data = torch.ops.qkernels.gguf_quantize(x, t, None)
    torch.library.opcheck(torch.ops.qkernels.gguf_quantize, (x, t, None))
    torch.library.opcheck(torch.ops.qkernels.gguf_quantize, (x, t, torch.rand(256)))
    torch.library.opcheck(torch.ops.qkernels.gguf_dequantize, (data, t, 4, 256, torch.float32))
    torch.library.opcheck(torch.ops.qkernels.gguf_mm.default, (torch.randn(3, 256), data, t, 4, 256))


# ---- properties ------------------------------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@needs_c
@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(CPU_ENCODE), rows=st.integers(1, 4), nblocks=st.integers(1, 3),
       scale=st.sampled_from([1e-6, 1e-2, 1.0, 300.0]), seed=st.integers(0, 2**16))
def test_property_cpp_equals_reference_and_decode_roundtrips(name, rows, nblocks, scale, seed):
    bs = R.BLOCK[R.TYPES[name]][0]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, bs * nblocks, generator=g) * scale
    if seed % 3 == 0:
        x = x.round()  # ties and repeated values
    ref = qg.quantize(x, name, backend="reference")
    got = qg.quantize(x, name, backend="cpu")
    assert torch.equal(got, ref)
    y = qg.dequantize(got, name, x.shape, backend="cpu")
    assert torch.equal(y, qg.dequantize(got, name, x.shape, backend="reference"))
    # re-encoding the decoded values is stable for the symmetric 8-bit type (a fixed point)
    if name == "Q8_0":
        assert torch.equal(qg.dequantize(qg.quantize(y, name), name, x.shape), y)


# ---- bad input -------------------------------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
    x = torch.randn(4, 100)
    with pytest.raises(ValueError, match=r"multiple of the Q4_K block size 256"):
        qg.quantize(x, "Q4_K")
    with pytest.raises(ValueError, match=r"type must be one of"):
        qg.quantize(torch.randn(4, 256), "Q7_K")
    with pytest.raises(ValueError, match=r"IQ2_XXS"):
        qg.quantize(torch.randn(4, 256), GT.IQ2_XXS)
    with pytest.raises(TypeError, match=r"x must have dtype"):
        qg.quantize(torch.ones(4, 256, dtype=torch.int32), "Q8_0")
    with pytest.raises(ValueError, match=r"NaN or inf"):
        qg.quantize(torch.full((1, 32), float("nan")), "Q8_0")
    with pytest.raises(ValueError, match=r"imatrix must have shape \[256\]"):
        qg.quantize(torch.randn(2, 256), "Q4_K", torch.rand(128))
    with pytest.raises(NotImplementedError, match=r"imatrix"):
        qg.quantize(torch.randn(2, 256), "Q4_0", torch.rand(256))
    with pytest.raises(ValueError, match=r"data must hold 288 bytes"):
        qg.dequantize(torch.zeros(100, dtype=torch.uint8), "Q4_K", (2, 256))
    with pytest.raises(TypeError, match=r"data must have dtype uint8"):
        qg.dequantize(torch.zeros(144, dtype=torch.int8), "Q4_K", (1, 256))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., K\] with K=256"):
        qkernels.gguf_mm(torch.randn(2, 128), torch.zeros(4, 144, dtype=torch.uint8), "Q4_K", 4, 256)
    with pytest.raises(ValueError, match=r"data must have shape"):
        qkernels.gguf_mm(torch.randn(2, 256), torch.zeros(4, 100, dtype=torch.uint8), "Q4_K", 4, 256)
    with pytest.raises(ValueError, match=r"in_features \(100\) must be a multiple"):
        qg.GGUFLinear(100, 4, "Q8_0")


@needs_c
def test_cpp_ops_check_arguments():
    with pytest.raises(RuntimeError, match=r"type must be a supported ggml type id"):
        torch.ops.qkernels.gguf_dequantize(torch.zeros(1, 10, dtype=torch.uint8), 5, 1, 32, torch.float32)
    with pytest.raises(RuntimeError, match=r"cols \(100\) must be a multiple of the block size 32"):
        torch.ops.qkernels.gguf_dequantize(torch.zeros(1, 10, dtype=torch.uint8), 8, 1, 100, torch.float32)
    with pytest.raises(RuntimeError, match=r"data must have shape \[2, 34\]"):
        torch.ops.qkernels.gguf_dequantize(torch.zeros(1, 34, dtype=torch.uint8), 8, 2, 32, torch.float32)
    with pytest.raises(RuntimeError, match=r"type must be a supported ggml type id"):
        torch.ops.qkernels.gguf_quantize(torch.randn(1, 256), 16, None)
    with pytest.raises(RuntimeError, match=r"imatrix must have shape \[256\]"):
        torch.ops.qkernels.gguf_quantize(torch.randn(1, 256), 12, torch.rand(255))
    with pytest.raises(RuntimeError, match=r"x must have shape \[M, K\] with K=64"):
        torch.ops.qkernels.gguf_mm(torch.randn(2, 32), torch.zeros(3, 68, dtype=torch.uint8), 8, 3, 64)


def test_dispatch():
    if HAS_C:
        for t in (2, 8, 10, 11, 12, 39):
            assert qkernels.explain("gguf_quantize", "cpu", type=t).backend == "cpu"
        assert qkernels.explain("gguf_mm", "cpu").backend == "cpu"
        assert qkernels.explain("gguf_dequantize", "cpu").backend == "cpu"
    assert qkernels.explain("gguf_quantize", "cpu", type=12, backend="reference").backend == "reference"
    with qkernels.dispatch.mock_device("sm90"):
        # no CUDA kernel yet: the Triton decode where triton is installed (test_dispatch_gpu_picks_triton_...)
        has_triton = qkernels.dispatch.triton_available(qkernels.dispatch.parse_device("sm90"))[0]
        assert qkernels.explain("gguf_mm").backend == ("triton" if has_triton else "reference")


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", ["Q8_0", "Q4_K", "Q3_K"])
def test_noncontiguous_batched_and_empty(backend, name):
    if backend == "cpu" and not HAS_C:
        pytest.skip("no extension")
    x = torch.randn(256, 6).t()  # [6, 256] non-contiguous
    want = qg.quantize(x.contiguous(), name, backend="reference")
    got = qg.quantize(x, name, backend=backend)
    assert torch.equal(got, want)
    xb = torch.randn(2, 3, 256)
    qb = qg.quantize(xb, name, backend=backend)
    assert qb.shape[:2] == (2, 3)
    assert torch.equal(qg.dequantize(qb, name, xb.shape, backend=backend).reshape(6, 256),
                       qg.dequantize(qb.reshape(6, -1), name, (6, 256), backend="reference"))
    e = qg.quantize(torch.randn(0, 256), name, backend=backend)
    assert e.shape == (0, R.row_bytes(R.TYPES[name], 256))
    assert qg.dequantize(e, name, (0, 256), backend=backend).shape == (0, 256)


# ---- GPU decode: Triton (qkernels/triton/gguf.py) --------------------------------------------------------------
# Bit-exactness of the Triton decode vs the reference on CPU: tests/triton_interpret_gguf_cases.py (interpreter).

TRITON_TYPES = [R.TYPE_NAMES[t] for t in R.types_with("triton", "gguf_dequantize")]


@pytest.mark.parametrize("device", ["sm80", "sm90", "sm100", "gfx942"])
@pytest.mark.parametrize("op", ["gguf_dequantize", "gguf_mm"])
def test_dispatch_gpu_picks_triton_for_block_types(device, op, monkeypatch):
    monkeypatch.delenv("QKERNELS_BACKEND", raising=False)
    pytest.importorskip("triton")
    with qkernels.dispatch.mock_device(device):
        for name in ALL:
            d = qkernels.explain(op, type=R.TYPES[name])
            assert d.backend == ("triton" if name in TRITON_TYPES else "reference"), (name, str(d))
        for name in ("F32", "F16", "BF16"):  # plain casts: no Triton decoder, the reference says why
            d = qkernels.explain(op, type=R.TYPES[name])
            assert d.backend == "reference" and any(b == "triton" and w.startswith(
                f"no Triton decoder for ggml type {name} ") for b, w in d.rejected), str(d)
    with qkernels.dispatch.mock_device("cpu"):
        assert qkernels.explain(op, type=R.TYPES["Q4_K"]).backend in ("cpu", "reference")


@pytest.mark.gpu
@requires_sm(8, 0)
@pytest.mark.parametrize("name", TRITON_TYPES)
def test_triton_decode_on_gpu_matches_reference(name):
    pytest.importorskip("triton")
    t = R.TYPES[name]
    bs, ts = R.BLOCK[t]
    rows, cols = 37, bs * 11
    g = torch.Generator().manual_seed(t)
    data = torch.randint(0, 256, (rows, cols // bs * ts), dtype=torch.uint8, generator=g)
    x = torch.randn(rows, cols, generator=g)
    for blocks in (data, R.gguf_quantize(x, t)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            want = R.gguf_dequantize(blocks, t, rows, cols, dtype)
            got = qg.dequantize(blocks.cuda(), name, (rows, cols), dtype, backend="triton").cpu()
            assert same_floats(got.float(), want.float()), (name, dtype)
    w = R.gguf_quantize(x, t)
    for dtype in (torch.float32, torch.bfloat16):
        a = torch.randn(5, cols, generator=g).to(dtype)
        want = a.double() @ R.gguf_dequantize(w, t, rows, cols, torch.float64).t()
        got = qkernels.gguf_mm(a.cuda(), w.cuda(), name, rows, cols, backend="triton").cpu()
        assert got.dtype == dtype and rel_err(got, want) < GEMM_RTOL[dtype], (name, dtype)
