"""Autograd of the GEMM ops (qkernels/ops/autograd.py): x.grad and bias.grad equal those of F.linear through the
dequantized float weight, for every op, every backend the CPU has (the C++ kernels through the registered formula,
the reference through the public wrapper), 3-D x, bias, torch.compile and QuantLinear of every scheme; a gradient
asked of a scale raises."""

import pytest
import torch
import torch.nn.functional as F

import qkernels
from qkernels import gguf
from qkernels.nn import QuantLinear
from qkernels.nn.schemes import Fp4, Fp8Dynamic, Fp8WeightOnly, Int4WeightOnly, Int8Dynamic, \
    Int8DynamicInt4Weight, Int8WeightOnly, IntWeightInt8Act

RTOL = 1e-3  # ||grad - grad_ref|| / ||grad_ref||: fp32 sums in a different order (and rounding of x's dtype)
N, K = 24, 64


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _weights(seed=0):
    """(name, public GEMM taking (x, bias) -> y, dequantized fp32 weight [N, K], whether it takes a bias)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    out = []
    q, s, zp = qkernels.quantize_affine(w, 4, 32, False, signed=True)
    packed = qkernels.pack_int4(q)
    W = qkernels.dequantize_affine(q, s, zp, 32)
    out.append(("int4", lambda x, b, be=None: qkernels.int4_weight_only_mm(x, packed, s, zp, 32, backend=be), W, False))
    q8, s8, _ = qkernels.quantize_affine(w, 8, -1, True)
    W8 = q8.float() * s8
    s8 = s8.reshape(-1)
    out.append(("int8", lambda x, b, be=None: qkernels.int8_weight_only_mm(x, q8, s8, backend=be), W8, False))
    # W8A8: straight-through gradient, as for the float weight
    out.append(("int8_dynamic", lambda x, b, be=None: qkernels.int8_dynamic_mm(x, q8, s8, backend=be), W8, False))
    for gran, bs in (("row", 128), ("block", (8, 32))):
        wq, ws = qkernels.quantize_fp8(w, torch.float8_e4m3fn, gran, bs)
        kw = {"w_block_size": bs} if gran == "block" else {}
        out.append((f"fp8_{gran}", lambda x, b, be=None, wq=wq, ws=ws, kw=kw: qkernels.fp8_weight_only_mm(
            x, wq, ws, b, backend=be, **kw),
                    qkernels.dequantize_fp8(wq, ws), True))
    for fmt in ("mxfp4", "nvfp4"):
        p, s4, g4 = qkernels.quantize_fp4(w, fmt)
        out.append((f"fp4_{fmt}", lambda x, b, be=None, p=p, s4=s4, g4=g4, fmt=fmt: qkernels.fp4_weight_only_mm(
            x, p, s4, b, format=fmt, w_global_scale=g4, backend=be), qkernels.dequantize_fp4(p, s4, g4, fmt), True))
    for t in ("Q4_0", "Q8_0"):  # 32-wide blocks (the K-quants need K % 256 == 0)
        data = gguf.quantize(w, t)
        out.append((f"gguf_{t}", lambda x, b, be=None, data=data, t=t: qkernels.gguf_mm(x, data, t, N, K, backend=be),
                    gguf.dequantize(data, t, (N, K)), False))
    return out


CASES = _weights()


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", [None, "reference"])
@pytest.mark.parametrize("shape", [(5, K), (2, 3, K)])
def test_grad_x_and_bias_match_float_linear(case, backend, shape):
    name, mm, W, has_bias = case
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g, requires_grad=True)
    b = torch.randn(N, generator=g, requires_grad=True) if has_bias else None
    gy = torch.randn(*shape[:-1], N, generator=g)
    y = mm(x, b, backend)
    assert y.requires_grad and y.grad_fn is not None
    y.backward(gy)
    x2 = x.detach().clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_() if has_bias else None
    F.linear(x2, W, b2).backward(gy)
    assert _rel(x.grad, x2.grad) < RTOL, name
    if has_bias:
        assert _rel(b.grad, b2.grad) < RTOL, name


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16])
def test_grad_keeps_x_dtype(x_dtype):
    name, mm, W, _ = CASES[0]
    x = torch.randn(4, K).to(x_dtype).requires_grad_()
    mm(x, None).float().sum().backward()
    assert x.grad.dtype == x_dtype
    want = torch.ones(4, N) @ W
    assert _rel(x.grad, want) < 1e-2  # one rounding to bf16 / fp16


def test_registered_formula_on_the_op_itself():
    """torch.ops.qkernels.* called directly (as torch.compile and other libraries do) also differentiate."""
    name, mm, W, _ = CASES[1]
    g = torch.Generator().manual_seed(2)
    q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=g)
    s8 = torch.rand(N, generator=g) + 0.5
    x = torch.randn(3, K, generator=g, requires_grad=True)
    torch.ops.qkernels.int8_weight_only_mm(x, q8, s8).sum().backward()
    assert _rel(x.grad, torch.ones(3, N) @ (q8.float() * s8[:, None])) < RTOL


def test_bias_only_gradient_for_the_scaled_fp8_and_fp4_gemms():
    g = torch.Generator().manual_seed(3)
    aq, as_ = qkernels.quantize_fp8(torch.randn(4, K, generator=g))
    bq, bs_ = qkernels.quantize_fp8(torch.randn(N, K, generator=g))
    b = torch.randn(N, generator=g, requires_grad=True)
    qkernels.fp8_mm(aq, as_, bq, bs_, torch.float32, b).sum().backward()
    assert torch.equal(b.grad, torch.full((N,), 4.0))
    ap, asc, _ = qkernels.quantize_fp4(torch.randn(4, K, generator=g), "mxfp4")
    bp, bsc, _ = qkernels.quantize_fp4(torch.randn(N, K, generator=g), "mxfp4")
    b.grad = None
    qkernels.fp4_mm(ap, asc, bp, bsc, torch.float32, b).sum().backward()
    assert torch.equal(b.grad, torch.full((N,), 4.0))


def test_gradient_of_a_scale_raises():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(N, K, generator=g)
    x = torch.randn(2, K, generator=g, requires_grad=True)
    wq, ws = qkernels.quantize_fp8(w, granularity="row")
    with pytest.raises(RuntimeError, match="w_scale requires grad"):
        qkernels.fp8_weight_only_mm(x, wq, ws.clone().requires_grad_())
    q8, s8, _ = qkernels.quantize_affine(w, 8)
    with pytest.raises(RuntimeError, match="scale requires grad"):
        qkernels.int8_weight_only_mm(x, q8, s8.reshape(-1).clone().requires_grad_())
    p, s4, g4 = qkernels.quantize_fp4(w, "nvfp4")
    with pytest.raises(RuntimeError, match="w_global_scale requires grad"):
        qkernels.fp4_weight_only_mm(x, p, s4, format="nvfp4", w_global_scale=g4.clone().requires_grad_())
    with pytest.raises(RuntimeError, match="scale requires grad"):
        qkernels.dequantize_affine(q8, s8.clone().requires_grad_())
    with pytest.raises(RuntimeError, match="scale requires grad"):
        qkernels.dequantize_fp8(wq, ws.clone().requires_grad_())
    # under no_grad nothing is asked of the scale: fine
    with torch.no_grad():
        qkernels.fp8_weight_only_mm(x, wq, ws.clone().requires_grad_())


def test_torch_compile_backward():
    name, mm, W, _ = CASES[3]  # fp8 per row, with bias
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, K, generator=g, requires_grad=True)
    b = torch.randn(N, generator=g, requires_grad=True)
    torch.compile(mm, fullgraph=True, backend="aot_eager")(x, b).sum().backward()
    assert _rel(x.grad, torch.ones(3, N) @ W) < RTOL and torch.equal(b.grad, torch.full((N,), 3.0))


SCHEMES = [Int4WeightOnly(32), Int4WeightOnly(32, True, bits=3), Int8WeightOnly(), Int8WeightOnly(32, False),
           Int8Dynamic(), IntWeightInt8Act(4, 32), IntWeightInt8Act(8, -1, True), Int8DynamicInt4Weight(64),
           Fp8WeightOnly(), Fp8Dynamic(),
           Fp8Dynamic("tensor"), Fp4("mxfp4"), Fp4("nvfp4"), Fp4("nvfp4", weight_only=True)]


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_quantlinear_backward_equals_dequantized_linear(scheme):
    """LoRA / QLoRA train adapters around a frozen QuantLinear: its x.grad must be the float layer's (W8A8 / W4A4:
    the straight-through gradient)."""
    g = torch.Generator().manual_seed(6)
    lin = torch.nn.Linear(K, N)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.1)
    ql = QuantLinear.from_linear(lin, scheme)
    x = torch.randn(2, 3, K, generator=g, requires_grad=True)
    gy = torch.randn(2, 3, N, generator=g)
    ql(x).backward(gy)
    assert x.grad is not None, f"{scheme}: backward left x.grad None"
    x2 = x.detach().clone().requires_grad_()
    F.linear(x2, ql.dequantize(torch.float32), ql.bias.detach()).backward(gy)
    assert _rel(x.grad, x2.grad) < RTOL


def test_opcheck_with_grad():
    """torch.library.opcheck with x (and bias) requiring grad: the registered formula, its fake kernels and
    aot_autograd's trace of the backward."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(N, K, generator=g)
    x = torch.randn(3, K, generator=g, requires_grad=True)
    b = torch.randn(N, generator=g, requires_grad=True)
    q, s, zp = qkernels.quantize_affine(w, 4, 32, False)
    q8, s8, _ = qkernels.quantize_affine(w, 8)
    wq, ws = qkernels.quantize_fp8(w, granularity="row")
    p, s4, g4 = qkernels.quantize_fp4(w, "nvfp4")
    data = gguf.quantize(w, "Q4_0")
    ops = torch.ops.qkernels
    cases = [
        (ops.int4_weight_only_mm.default, (x, qkernels.pack_int4(q), s, zp, 32, True)),
        (ops.int8_weight_only_mm.default, (x, q8, s8.reshape(-1))),
        (ops.int8_dynamic_mm.default, (x, q8, s8.reshape(-1))),
        (ops.fp8_weight_only_mm.default, (x, wq.view(torch.uint8), ws, wq.dtype, b)),
        (ops.fp4_weight_only_mm.default, (x, p, s4.view(torch.uint8), g4, "nvfp4", "e2m1", b)),
        (ops.gguf_mm.default, (x, data, gguf.TYPES["Q4_0"], N, K)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
