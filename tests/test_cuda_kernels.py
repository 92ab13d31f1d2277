"""CUDA kernels (csrc/cuda/) and the Triton kernels on GPU against the reference. Run only where an NVIDIA GPU is
present (scripts/gpu_check.sh runs ``pytest -m gpu``); everything here skips by capability elsewhere.

Tolerances (relative error ||out - ref|| / ||ref|| against the fp64 reference of the same quantized weights):
  * pack/unpack, choose_qparams, quantize, dequantize: bit-exact.
  * GEMMs, fp16 x: 3e-3; bf16 x: 1.5e-2 (the decoded weight is rounded to x's dtype once, products are exact in
    the fp32 mma accumulator, the output is rounded to x's dtype); fp32 x: 1e-5 (dequantize + fp32 cuBLAS with TF32
    off / IEEE Triton dot).
"""

from __future__ import annotations

import pytest
import torch

import qkernels
from qkernels import reference as ref

from .conftest import GEMM_RTOL_TABLE, rel_err, requires_sm

pytestmark = [pytest.mark.gpu, requires_sm(8, 0)]

TOL = GEMM_RTOL_TABLE["cuda_int"]
DEV = "cuda"


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def _cuda_op(name):
    assert qkernels._ext.has_kernel(name, "CUDA"), f"qkernels._C has no CUDA kernel for {name}"
    return getattr(torch.ops.qkernels, name)


def test_build_covers_this_gpu():
    built = qkernels._ext.compiled_cuda_archs()
    cap = torch.cuda.get_device_capability()
    assert built, "cuda_build_archs() is empty: the extension was built without CUDA"
    assert qkernels.dispatch.arch_runs(cap, built), f"built for {built}, device is sm{cap[0]}{cap[1]}"
    assert qkernels.explain("int4_weight_only_mm", DEV).backend == "cuda"


# ---- packing / quantization: bit-exact ---------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(2,), (7, 34), (3, 4096), (2, 3, 130), (1, 16)])
def test_pack_unpack(signed, shape):
    lo, hi, dt = (-8, 8, torch.int8) if signed else (0, 16, torch.uint8)
    q = torch.randint(lo, hi, shape, dtype=dt, device=DEV)
    packed = _cuda_op("pack_int4")(q)
    assert torch.equal(packed, ref.OPS["pack_int4"](q))
    assert torch.equal(_cuda_op("unpack_int4")(packed, signed), q)
    # misaligned input (offset 1 byte): the scalar path
    qm = q.reshape(-1)[2:].reshape(-1)
    if qm.numel() % 2 == 0 and qm.numel():
        assert torch.equal(_cuda_op("pack_int4")(qm), ref.OPS["pack_int4"](qm))
        pm = packed.reshape(-1)[1:]
        assert torch.equal(_cuda_op("unpack_int4")(pm, signed), ref.OPS["unpack_int4"](pm, signed))


def test_pack_rejects_out_of_range():
    with pytest.raises(RuntimeError, match="outside the int4 range"):
        _cuda_op("pack_int4")(torch.tensor([0, 8, 1, 2], dtype=torch.int8, device=DEV))


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group,symmetric,signed,fz", [
    (4, 32, True, True, False), (4, 128, False, False, False), (8, 64, False, True, False), (4, 3, True, False, False),
    (4, 32, False, False, True), (3, 12, False, True, False), (8, 768, True, True, False), (2, 8, False, False, True),
])
def test_quant_ops_bit_exact(wdtype, bits, group, symmetric, signed, fz):
    w = (torch.randn(33, 768, device=DEV) * 2).to(wdtype)
    w[0, :group] = 0.0
    w[1, :group] = 0.25  # constant group
    s_signed = signed and not fz
    scale, zp = _cuda_op("choose_qparams_affine")(w, bits, group, symmetric, s_signed, fz)
    s_ref, z_ref = ref.OPS["choose_qparams_affine"](w, bits, group, symmetric, s_signed, fz)
    assert torch.equal(scale, s_ref) and torch.equal(zp, z_ref)
    args = (w, scale, zp, bits, group, s_signed, fz)
    q = _cuda_op("quantize_affine")(*args)
    assert torch.equal(q, ref.OPS["quantize_affine"](*args))
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        got = _cuda_op("dequantize_affine")(q, scale, zp, group, fz, out_dtype)
        assert torch.equal(got, ref.OPS["dequantize_affine"](q, scale, zp, group, fz, out_dtype)), out_dtype
    # unaligned / odd-length view: scalar kernels
    wv = w.reshape(-1)[1:1 + 3 * group].reshape(3, group)
    sv, zv = ref.OPS["choose_qparams_affine"](wv, bits, group, symmetric, s_signed, fz)
    args = (wv, sv, zv, bits, group, s_signed, fz)
    assert torch.equal(_cuda_op("quantize_affine")(*args), ref.OPS["quantize_affine"](*args))
    # the CUDA result equals the CPU kernel's
    q_cpu = torch.ops.qkernels.quantize_affine(w.cpu(), scale.cpu(), zp.cpu(), bits, group, s_signed, fz)
    assert torch.equal(q.cpu(), q_cpu)


def test_quant_rejects_nonfinite():
    w = torch.randn(4, 64, device=DEV)
    w[2, 7] = float("inf")
    with pytest.raises(RuntimeError, match="NaN or inf"):
        _cuda_op("choose_qparams_affine")(w, 4, 32, True, True, False)
    with pytest.raises(RuntimeError, match="NaN or inf"):
        _cuda_op("quantize_affine")(w, torch.ones(4, 2, device=DEV), None, 4, 32, True, False)


def test_quant_opcheck():
    w = torch.randn(8, 64, device=DEV)
    scale, zp = ref.OPS["choose_qparams_affine"](w, 4, 32, False, True, False)
    q = ref.OPS["quantize_affine"](w, scale, zp, 4, 32, True, False)
    torch.library.opcheck(torch.ops.qkernels.choose_qparams_affine, (w, 4, 32, False, True, False))
    torch.library.opcheck(torch.ops.qkernels.quantize_affine, (w, scale, zp, 4, 32, True, False))
    torch.library.opcheck(torch.ops.qkernels.dequantize_affine, (q, scale, zp, 32, False, torch.bfloat16))
    torch.library.opcheck(torch.ops.qkernels.pack_int4, (q,))
    torch.library.opcheck(torch.ops.qkernels.unpack_int4, (ref.OPS["pack_int4"](q), True))


# ---- GEMMs ---------------------------------------------------------------------------------------------------------

M_VALUES = list(range(1, 17)) + [17, 31, 64, 65, 128, 300]


@pytest.fixture(params=["direct", "splitk"])
def decode_kernel(request, monkeypatch):
    """Both tensor-core decode kernels on every GEMM shape below (QKERNELS_CUDA_DECODE; the default "auto" picks the
    one-launch direct kernel only when N gives every SM a block, which these small test shapes do not)."""
    monkeypatch.setenv("QKERNELS_CUDA_DECODE", request.param)
    return request.param


def test_decode_kernel_env_checked(monkeypatch):
    monkeypatch.setenv("QKERNELS_CUDA_DECODE", "fast")
    x = torch.randn(1, 256, device=DEV, dtype=torch.bfloat16)
    q8 = torch.zeros(8, 256, dtype=torch.int8, device=DEV)
    with pytest.raises(RuntimeError, match="QKERNELS_CUDA_DECODE must be 'auto', 'direct' or 'splitk', got 'fast'"):
        _cuda_op("int8_weight_only_mm")(x, q8, torch.ones(8, device=DEV))


def test_direct_decode_large_n_default():
    """auto picks the direct kernel at Llama-sized N: check it there, M = 1 and M = 16, W4 and W8."""
    N, K, group = 4096, 512, 128
    packed, scale, zp = _w4(N, K, group, True, True)
    q8 = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=DEV)
    s8 = torch.rand(N, device=DEV) * 0.01
    for M in (1, 16):
        x = torch.randn(M, K, device=DEV, dtype=torch.bfloat16)
        out = _cuda_op("int4_weight_only_mm")(x, packed, scale, zp, group, True)
        want = ref.OPS["int4_weight_only_mm"](x.double(), packed, scale, zp, group, True)
        assert out.dtype == torch.bfloat16 and rel_err(out, want) < TOL[torch.bfloat16]
        out = _cuda_op("int8_weight_only_mm")(x, q8, s8)
        assert rel_err(out, ref.OPS["int8_weight_only_mm"](x.double(), q8, s8)) < TOL[torch.bfloat16]


def _w4(N, K, group, signed, with_zp):
    lo, hi, dt = (-8, 8, torch.int8) if signed else (0, 16, torch.uint8)
    q = torch.randint(lo, hi, (N, K), dtype=dt, device=DEV)
    packed = ref.OPS["pack_int4"](q)
    scale = torch.rand(N, K // group, device=DEV) * 0.02 + 0.005
    zp = torch.randint(-8, 17, (N, K // group), dtype=torch.int32, device=DEV) if with_zp else None
    return packed, scale, zp


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", M_VALUES)
def test_int4_mm_many_m(dtype, M, decode_kernel):
    N, K, group = 264, 1024, 128  # N not a multiple of the 128-row block, K = 8 chunks
    packed, scale, zp = _w4(N, K, group, True, True)
    x = torch.randn(M, K, device=DEV, dtype=dtype)
    out = _cuda_op("int4_weight_only_mm")(x, packed, scale, zp, group, True)
    want = ref.OPS["int4_weight_only_mm"](x.double(), packed, scale, zp, group, True)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("group", [32, 64, 128, -1, 48])  # -1: per-channel; 48: not a multiple of 32 (fallback)
@pytest.mark.parametrize("signed,with_zp", [(True, False), (True, True), (False, True), (False, False)])
@pytest.mark.parametrize("M", [1, 7, 16, 96])
def test_int4_mm_groups(dtype, group, signed, with_zp, M, decode_kernel):
    N, K = 200, 96 * 8  # K = 768: 6 chunks of 128 (no tail), multiple of 48 and 32..128
    g = K if group == -1 else group
    packed, scale, zp = _w4(N, K, g, signed, with_zp)
    x = torch.randn(M, K, device=DEV, dtype=dtype)
    out = _cuda_op("int4_weight_only_mm")(x, packed, scale, zp, g, signed)
    want = ref.OPS["int4_weight_only_mm"](x.double(), packed, scale, zp, g, signed)
    assert rel_err(out, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [32, 96, 160, 4128, 14336])  # K tails of the 128-wide chunk, Llama's 14336
def test_int4_mm_k_tails(dtype, K, decode_kernel):
    N, group = 72, 32
    packed, scale, zp = _w4(N, K, group, True, True)
    x = torch.randn(3, K, device=DEV, dtype=dtype)
    out = _cuda_op("int4_weight_only_mm")(x, packed, scale, zp, group, True)
    want = ref.OPS["int4_weight_only_mm"](x.double(), packed, scale, zp, group, True)
    assert rel_err(out, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 2, 5, 8, 13, 16, 33, 64, 200])
@pytest.mark.parametrize("N,K", [(136, 512), (64, 96), (40, 100)])  # K=100: not a multiple of 32 (fallback)
def test_int8_mm(dtype, M, N, K, decode_kernel):
    q_w = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=DEV)
    scale = torch.rand(N, device=DEV) * 0.01 + 1e-3
    x = torch.randn(M, K, device=DEV, dtype=dtype)
    out = _cuda_op("int8_weight_only_mm")(x, q_w, scale)
    want = ref.OPS["int8_weight_only_mm"](x.double(), q_w, scale)
    assert out.shape == (M, N) and out.dtype == dtype
    assert rel_err(out, want) < TOL[dtype]


def test_gemm_noncontiguous_and_unaligned_inputs():
    K, N, group = 256, 64, 64
    packed, scale, zp = _w4(N, K, group, True, True)
    base = torch.randn(4, K + 1, device=DEV, dtype=torch.bfloat16)
    x = base[:, 1:]  # rows not 16-byte aligned and not contiguous
    out = _cuda_op("int4_weight_only_mm")(x, packed, scale, zp, group, True)
    want = ref.OPS["int4_weight_only_mm"](x.double(), packed, scale, zp, group, True)
    assert rel_err(out, want) < TOL[torch.bfloat16]
    xt = torch.randn(K, 5, device=DEV, dtype=torch.float16).t()
    out = _cuda_op("int4_weight_only_mm")(xt, packed, scale.half(), None, group, True)  # fp16 scale is accepted
    want = ref.OPS["int4_weight_only_mm"](xt.double(), packed, scale.half().float(), None, group, True)
    assert rel_err(out, want) < TOL[torch.float16]


def test_gemm_empty_and_public_api():
    packed, scale, zp = _w4(16, 64, 32, True, True)
    x = torch.randn(0, 64, device=DEV, dtype=torch.bfloat16)
    assert _cuda_op("int4_weight_only_mm")(x, packed, scale, zp, 32, True).shape == (0, 16)
    x = torch.randn(2, 3, 64, device=DEV, dtype=torch.bfloat16)
    out = qkernels.int4_weight_only_mm(x, packed, scale, zp, 32, signed=True)
    want = ref.OPS["int4_weight_only_mm"](x.reshape(-1, 64).double(), packed, scale, zp, 32, True)
    assert out.shape == (2, 3, 16) and rel_err(out.reshape(-1, 16), want) < TOL[torch.bfloat16]


def test_gemm_cuda_matches_cpu_kernel():
    packed, scale, zp = _w4(96, 512, 64, False, True)
    x = torch.randn(9, 512, device=DEV, dtype=torch.float32)
    out = _cuda_op("int4_weight_only_mm")(x, packed, scale, zp, 64, False)
    cpu = torch.ops.qkernels.int4_weight_only_mm(x.cpu(), packed.cpu(), scale.cpu(), zp.cpu(), 64, False)
    assert rel_err(out.cpu(), cpu) < 1e-5


def test_gemm_opcheck():
    packed, scale, zp = _w4(32, 128, 32, True, True)
    x = torch.randn(3, 128, device=DEV, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.qkernels.int4_weight_only_mm.default, (x, packed, scale, zp, 32, True))
    q_w = torch.randint(-128, 128, (32, 128), dtype=torch.int8, device=DEV)
    torch.library.opcheck(torch.ops.qkernels.int8_weight_only_mm.default, (x, q_w, torch.rand(32, device=DEV)))


def test_gemm_torch_compile():
    packed, scale, zp = _w4(64, 256, 64, True, True)
    x = torch.randn(4, 256, device=DEV, dtype=torch.bfloat16)

    @torch.compile(fullgraph=True)
    def f(x):
        return qkernels.int4_weight_only_mm(x, packed, scale, zp, 64, signed=True) * 2

    want = ref.OPS["int4_weight_only_mm"](x.double(), packed, scale, zp, 64, True) * 2
    assert rel_err(f(x), want) < TOL[torch.bfloat16]


def test_gemm_on_side_stream():
    packed, scale, zp = _w4(128, 512, 128, True, True)
    x = torch.randn(2, 512, device=DEV, dtype=torch.float16)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = _cuda_op("int4_weight_only_mm")(x, packed, scale, zp, 128, True)
    s.synchronize()
    want = ref.OPS["int4_weight_only_mm"](x.double(), packed, scale, zp, 128, True)
    assert rel_err(out, want) < TOL[torch.float16]


# ---- Triton kernels on the GPU (compiled, autotuned) ---------------------------------------------------------------


# Each autotuned shape compiles several configs (about a second each on a cold cache), so only M = 1 goes through
# the autotuner here; the other cases pin one decode, one split-K and one prefill-sized configuration.
_TRITON_CASES = [
    (1, None),
    (5, {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 3}),
    (33, {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 1}),
    (256, {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "SPLIT_K": 1}),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M,config", _TRITON_CASES)
def test_triton_gemms_on_gpu(dtype, M, config):
    pytest.importorskip("triton")
    from qkernels import triton as qtriton

    N, K, group = 192, 544, 32  # K = 544: not a multiple of the 64/128 K tiles
    packed, scale, zp = _w4(N, K, group, True, True)
    x = torch.randn(M, K, device=DEV, dtype=dtype)
    out = qtriton.get("int4_weight_only_mm")(x, packed, scale, zp, group, True, config=config)
    want = ref.OPS["int4_weight_only_mm"](x.double(), packed, scale, zp, group, True)
    assert out.dtype == dtype and rel_err(out, want) < TOL[dtype]
    q_w = torch.randint(-128, 128, (N, K), dtype=torch.int8, device=DEV)
    s8 = torch.rand(N, device=DEV) * 0.01
    out = qtriton.get("int8_weight_only_mm")(x, q_w, s8, config=config)
    assert rel_err(out, ref.OPS["int8_weight_only_mm"](x.double(), q_w, s8)) < TOL[dtype]


def test_triton_through_dispatch_on_gpu():
    pytest.importorskip("triton")
    packed, scale, zp = _w4(64, 256, 64, True, True)
    x = torch.randn(3, 256, device=DEV, dtype=torch.bfloat16)
    out = qkernels.int4_weight_only_mm(x, packed, scale, zp, 64, signed=True, backend="triton")
    assert rel_err(out, ref.OPS["int4_weight_only_mm"](x.double(), packed, scale, zp, 64, True)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_triton_quant_ops_on_gpu(wdtype):
    pytest.importorskip("triton")
    from qkernels import triton as qtriton

    w = (torch.randn(17, 384, device=DEV) * 3).to(wdtype)
    for bits, group, sym, signed, fz in [(4, 32, True, True, False), (4, 128, False, False, False),
                                        (8, 384, True, True, False), (4, 64, False, False, True)]:
        s_ref, z_ref = ref.OPS["choose_qparams_affine"](w, bits, group, sym, signed, fz)
        s, z = qtriton.get("choose_qparams_affine")(w, bits, group, sym, signed, fz)
        assert torch.equal(s, s_ref) and torch.equal(z, z_ref)
        args = (w, s_ref, z_ref, bits, group, signed, fz)
        q = qtriton.get("quantize_affine")(*args)
        assert torch.equal(q, ref.OPS["quantize_affine"](*args))
        for od in (torch.float32, torch.bfloat16, torch.float16):
            got = qtriton.get("dequantize_affine")(q, s, z, group, fz, od)
            assert torch.equal(got, ref.OPS["dequantize_affine"](q, s, z, group, fz, od))
        if bits == 4:
            packed = qtriton.get("pack_int4")(q)
            assert torch.equal(packed, ref.OPS["pack_int4"](q))
            assert torch.equal(qtriton.get("unpack_int4")(packed, signed), q)
