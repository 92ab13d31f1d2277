"""The lean forward of the fp8 / fp4 / GGUF layers and the fast paths of the public fp8 / fp4 GEMMs (issue 18): on
the CPU they call the kernels directly, skipping the Python-side checks, and give the same outputs, gradients and
argument errors as the checked path (QKERNELS_BACKEND=cpu / backend="cpu" run the same kernels through choose())."""

import pytest
import torch

import qkernels
from qkernels.nn import Fp4, Fp8Dynamic, Fp8WeightOnly, GGUFLinear, QuantLinear, layouts
from qkernels.ops import float4 as ops4
from qkernels.ops import float8 as ops8

from .test_nn_linear import make_linear

pytestmark = pytest.mark.skipif(not qkernels.HAS_EXTENSION, reason="the fast path needs the compiled extension")

SCHEMES = [Fp8WeightOnly(), Fp8Dynamic("row"), Fp8Dynamic("tensor"), Fp8Dynamic("block"), Fp4("mxfp4"),
           Fp4("nvfp4"), Fp4("mxfp4", weight_only=True), Fp4("nvfp4", weight_only=True)]
# what the checked path runs, by the name layouts.py imports it under: the fast path must call none of them
PUBLIC = ("check_input", "fp8_weight_only_mm", "fp8_mm", "quantize_fp8", "fp4_weight_only_mm", "fp4_mm",
          "quantize_fp4")
K, N = 128, 128  # Fp8Dynamic("block") needs multiples of 128


def layer(scheme, bias=True):
    return QuantLinear.from_linear(make_linear(K, N, bias, seed=3), scheme)


def spy_public(monkeypatch, seen):
    for name in PUBLIC:
        fn = getattr(layouts, name)
        monkeypatch.setattr(layouts, name, lambda *a, _n=name, _f=fn, **k: seen.append(_n) or _f(*a, **k))


@pytest.mark.parametrize("shape", [(1, K), (2, 3, K), (K,)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_fast_forward_equals_checked(scheme, dtype, shape, monkeypatch):
    q = layer(scheme)
    x = torch.randn(shape, dtype=dtype)
    seen = []
    spy_public(monkeypatch, seen)
    out = q(x)
    assert seen == [], f"the fast path ran {seen}"
    assert out.shape == (*shape[:-1], N) and out.dtype == dtype
    monkeypatch.setenv("QKERNELS_BACKEND", "cpu")  # the same kernels, through the public functions and choose()
    want = q(x)
    assert seen  # (the checked path did run)
    assert torch.equal(out, want)


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_fast_forward_non_contiguous_input(scheme, monkeypatch):
    """x goes to the kernels as it is: a transposed view gives what its contiguous copy gives."""
    q = layer(scheme)
    x = torch.randn(K, 3, dtype=torch.bfloat16).t()
    assert not x.is_contiguous()
    out = q(x)
    assert torch.equal(out, q(x.contiguous()))
    monkeypatch.setenv("QKERNELS_BACKEND", "cpu")
    assert torch.equal(out, q(x))


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_fast_forward_gradients(scheme, monkeypatch):
    """Gradients through the direct op calls (the ops' registered autograd, plus the straight-through estimator of
    the W8A8 / W4A4 layers) equal the checked path's (autograd.run around the chosen backend)."""
    q = layer(scheme)
    x0 = torch.randn(3, K)

    def grads():
        x = x0.clone().requires_grad_()
        bias = q.bias.requires_grad_()
        q(x).square().sum().backward()
        g = (x.grad, bias.grad.clone())
        bias.grad = None
        return g

    fast = grads()
    monkeypatch.setenv("QKERNELS_BACKEND", "cpu")
    checked = grads()
    assert torch.equal(fast[0], checked[0]) and torch.equal(fast[1], checked[1])


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_layer_input_errors_through_the_fast_path(scheme):
    q = layer(scheme)
    with pytest.raises(ValueError, match=rf"x must have shape \[\.\.\., K\] with K={K} \(in_features\), got \(2, 64\)"):
        q(torch.randn(2, 64))
    with pytest.raises(TypeError, match="x must have dtype"):
        q(torch.ones(2, K, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must have dtype"):
        q(torch.ones(2, K, dtype=torch.float64))
    with pytest.raises(ValueError, match="got a 0-d tensor"):
        q(torch.tensor(1.0))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        q([1.0] * K)
    assert q(torch.randn(0, K)).shape == (0, N) and q(torch.randn(2, 0, K)).shape == (2, 0, N)


@pytest.mark.parametrize("scheme", [Fp8WeightOnly(), Fp8Dynamic("tensor"), Fp4("nvfp4"),
                                    Fp4("nvfp4", weight_only=True)], ids=repr)
def test_cast_buffers_take_the_checked_path(scheme, monkeypatch):
    """``.to(torch.bfloat16)`` casts the fp32 scales the kernels take: the forward then runs the public functions
    (which convert them) rather than raising, and gives what the same bf16-rounded scales give there."""
    q = layer(scheme).to(torch.bfloat16)
    assert (q.global_scale if q.global_scale is not None else q.scale).dtype == torch.bfloat16
    x = torch.randn(2, K, dtype=torch.bfloat16)
    seen = []
    spy_public(monkeypatch, seen)
    out = q(x)
    assert seen  # the public functions ran
    monkeypatch.setenv("QKERNELS_BACKEND", "reference")
    want = q(x)
    assert (out.float() - want.float()).abs().max() <= 0.02 * want.float().abs().max()


def test_forced_backend_skips_the_fast_path(monkeypatch):
    """QKERNELS_BACKEND set after the layer ran takes effect at once (the kernel look-up is not cached past it)."""
    q = layer(Fp8WeightOnly())
    x = torch.randn(2, K)
    calls = []
    orig = qkernels.reference.OPS["fp8_weight_only_mm"]
    monkeypatch.setitem(qkernels.reference.OPS, "fp8_weight_only_mm", lambda *a: calls.append(1) or orig(*a))
    q(x)
    monkeypatch.setenv("QKERNELS_BACKEND", "reference")
    q(x)
    assert calls == [1]


# ---- the public fp8 / fp4 GEMMs ------------------------------------------------------------------------------------
def _spy(monkeypatch, module, names, seen):
    for name in names:
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _f=fn, **k: seen.append(_n) or _f(*a, **k))


def _fp8_weight(scale_kind, Kw=K, Nw=N):
    w = torch.randn(Nw, Kw)
    if scale_kind == "tensor":
        return qkernels.quantize_fp8(w, granularity="tensor")
    if scale_kind == "row":
        return qkernels.quantize_fp8(w, granularity="row")
    if scale_kind == "1x32":
        return qkernels.quantize_fp8(w, granularity="block", block_size=32)
    return qkernels.quantize_fp8(w, granularity="block", block_size=(64, 64))


@pytest.mark.parametrize("scale_kind", ["tensor", "row", "1x32", "64x64"])
@pytest.mark.parametrize("xshape", [(3, K), (2, 2, K), (K,)], ids=str)
def test_public_fp8_weight_only_fast_equals_checked(scale_kind, xshape, monkeypatch):
    wq, ws = _fp8_weight(scale_kind)
    x, bias = torch.randn(xshape, dtype=torch.bfloat16), torch.randn(N)
    seen = []
    _spy(monkeypatch, ops8, ["_scale_grid"], seen)
    out = qkernels.fp8_weight_only_mm(x, wq, ws, bias)
    assert seen == []
    want = qkernels.fp8_weight_only_mm(x, wq, ws, bias, backend="cpu")
    assert seen == ["_scale_grid"] and torch.equal(out, want) and out.shape == (*xshape[:-1], N)


@pytest.mark.parametrize("scale_kind", ["tensor", "row", "64x64"])
def test_public_fp8_mm_fast_equals_checked(scale_kind, monkeypatch):
    wq, ws = _fp8_weight(scale_kind)
    aq, as_ = qkernels.quantize_fp8(torch.randn(5, K), granularity="row")
    bias = torch.randn(N)
    seen = []
    _spy(monkeypatch, ops8, ["_scale_grid"], seen)
    out = qkernels.fp8_mm(aq, as_, wq, ws, torch.bfloat16, bias)
    assert seen == []
    assert torch.equal(out, qkernels.fp8_mm(aq, as_, wq, ws, torch.bfloat16, bias, backend="cpu"))


def test_public_fp8_slow_layouts_still_work():
    """Scales the fast path leaves to the checked path: a [N] vector, bf16, 2 x 32 blocks named by w_block_size."""
    wq, ws = _fp8_weight("row")
    x = torch.randn(3, K)
    want = qkernels.fp8_weight_only_mm(x, wq, ws, backend="cpu")
    assert torch.equal(qkernels.fp8_weight_only_mm(x, wq, ws.reshape(-1)), want)
    bf = ws.to(torch.bfloat16)
    assert torch.equal(qkernels.fp8_weight_only_mm(x, wq, bf), qkernels.fp8_weight_only_mm(x, wq, bf, backend="cpu"))
    wq2, ws2 = qkernels.quantize_fp8(torch.randn(N, K), granularity="block", block_size=(2, 32))
    with pytest.raises(ValueError, match="w_block_size"):
        qkernels.fp8_weight_only_mm(x, wq2, ws2)
    assert torch.equal(qkernels.fp8_weight_only_mm(x, wq2, ws2, w_block_size=(2, 32)),
                       qkernels.fp8_weight_only_mm(x, wq2, ws2, w_block_size=(2, 32), backend="cpu"))


def test_public_fp8_errors_unchanged():
    wq, ws = _fp8_weight("row")
    x = torch.randn(3, K)
    f = qkernels.fp8_weight_only_mm
    with pytest.raises(ValueError, match=r"w_q must have shape \[N, K\] with K=64"):
        f(torch.randn(3, 64), wq, ws)
    with pytest.raises(ValueError, match="K must be positive"):
        f(torch.randn(3, 0), torch.empty(N, 0, dtype=torch.float8_e4m3fn), torch.ones(N, 1))
    with pytest.raises(ValueError, match="w_q.dtype must be one of"):
        f(x, wq.view(torch.uint8), ws)
    with pytest.raises(TypeError, match="x must have dtype"):
        f(x.double(), wq, ws)
    with pytest.raises(ValueError, match=r"bias must have shape \[N\]"):
        f(x, wq, ws, torch.randn(N + 1))
    with pytest.raises(ValueError, match="w_scale"):
        f(x, wq, ws[:N // 2])
    aq, as_ = qkernels.quantize_fp8(x, granularity="row")
    with pytest.raises(ValueError, match="a_q.dtype must be one of"):
        qkernels.fp8_mm(aq.view(torch.uint8), as_, wq, ws)
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        qkernels.fp8_mm(aq, as_, wq, ws, torch.int32)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
@pytest.mark.parametrize("xshape", [(3, K), (2, 2, K)], ids=str)
def test_public_fp4_fast_equals_checked(fmt, xshape, monkeypatch):
    wp, ws, wg = qkernels.quantize_fp4(torch.randn(N, K), fmt)
    x, bias = torch.randn(xshape, dtype=torch.bfloat16), torch.randn(N)
    seen = []
    _spy(monkeypatch, ops4, ["_fp4_operand"], seen)
    out = qkernels.fp4_weight_only_mm(x, wp, ws, bias, format=fmt, w_global_scale=wg)
    assert seen == []
    want = qkernels.fp4_weight_only_mm(x, wp, ws, bias, format=fmt, w_global_scale=wg, backend="cpu")
    assert seen and torch.equal(out, want)
    ap, as_, ag = qkernels.quantize_fp4(torch.randn(5, K), fmt)
    seen.clear()
    out = qkernels.fp4_mm(ap, as_, wp, ws, torch.float32, bias, format=fmt, a_global_scale=ag, b_global_scale=wg)
    assert seen == []
    assert torch.equal(out, qkernels.fp4_mm(ap, as_, wp, ws, torch.float32, bias, format=fmt, a_global_scale=ag,
                                            b_global_scale=wg, backend="cpu"))
    # uint8 scale codes take the fast path too; a bf16 global scale is converted by the checked path
    assert torch.equal(qkernels.fp4_weight_only_mm(x, wp, ws.view(torch.uint8), bias, format=fmt, w_global_scale=wg),
                       want)
    if fmt == "nvfp4":
        seen.clear()
        got = qkernels.fp4_weight_only_mm(x, wp, ws, bias, format=fmt, w_global_scale=wg.to(torch.bfloat16))
        assert seen and torch.equal(got, qkernels.fp4_weight_only_mm(x, wp, ws, bias, format=fmt,
                                                                     w_global_scale=wg.to(torch.bfloat16).float()))


def test_public_fp4_errors_unchanged():
    wp, ws, _ = qkernels.quantize_fp4(torch.randn(N, K), "mxfp4")
    x = torch.randn(3, K)
    f = qkernels.fp4_weight_only_mm
    with pytest.raises(TypeError, match="w_scale must have dtype float8_e8m0fnu"):
        f(x, wp, ws.view(torch.uint8).view(torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="w_global_scale is only used by format='nvfp4'"):
        f(x, wp, ws, w_global_scale=torch.ones(()))
    with pytest.raises(ValueError, match="format must be one of"):
        f(x, wp, ws, format="fp4")
    with pytest.raises(ValueError, match="w_packed must have shape"):
        f(torch.randn(3, 64), wp, ws)
    with pytest.raises(ValueError, match="must be positive"):
        f(torch.randn(3, 0), torch.empty(N, 0, dtype=torch.uint8), torch.empty(N, 0, dtype=torch.uint8))
    nwp, nws, nwg = qkernels.quantize_fp4(torch.randn(N, K), "nvfp4")
    with pytest.raises(ValueError, match="w_global_scale .* is required"):
        f(x, nwp, nws, format="nvfp4")
    with pytest.raises(ValueError, match="w_global_scale must have one element"):
        f(x, nwp, nws, format="nvfp4", w_global_scale=torch.ones(2))
    with pytest.raises(ValueError, match="element must be one of"):
        f(x, nwp, nws, format="nvfp4", w_global_scale=nwg, element="e3m0")
    ap, as_, _ = qkernels.quantize_fp4(x, "mxfp4")
    with pytest.raises(ValueError, match="out_dtype must be one of"):
        qkernels.fp4_mm(ap, as_, wp, ws, torch.int32)


# ---- GGUFLinear ----------------------------------------------------------------------------------------------------
def test_gguf_linear_fast_forward(monkeypatch):
    lin = make_linear(64, 24, seed=5)
    g = GGUFLinear.from_float(lin, "Q8_0")
    x = torch.randn(2, 3, 64, dtype=torch.bfloat16)
    out = g(x)
    want = qkernels.gguf_mm(x, g.data, g.type, 24, 64, backend="cpu") + g.bias.to(x.dtype)
    assert torch.equal(out, want)
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., K\] with K=64"):
        g(torch.randn(2, 32))
    with pytest.raises(TypeError, match="x must have dtype"):
        g(torch.ones(2, 64, dtype=torch.int32))
    monkeypatch.setenv("QKERNELS_BACKEND", "reference")
    assert torch.allclose(g(x).float(), want.float(), rtol=2e-2, atol=2e-2)
