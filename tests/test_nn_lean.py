"""The lean forward (issue 18): QuantLinear and the integer public ops call the compiled kernel directly on CPU,
with the backend decided once and cached, and still give the same outputs and the same argument errors."""

import pytest
import torch

import qkernels
from qkernels import dispatch
from qkernels.nn import (Int4WeightOnly, Int8Dynamic, Int8DynamicInt4Weight, Int8WeightOnly, IntWeightInt8Act,
                         QuantLinear)
from qkernels.ops import _call, int_gemm

pytestmark = pytest.mark.skipif(not qkernels.HAS_EXTENSION, reason="the fast path needs the compiled extension")

SCHEMES = [Int4WeightOnly(32), Int4WeightOnly(48, symmetric=True), Int8WeightOnly(), Int8Dynamic(),
           IntWeightInt8Act(4, 32), Int8WeightOnly(32, symmetric=False), IntWeightInt8Act(8, 32),
           Int8DynamicInt4Weight(64)]


def layer(scheme, K=96, N=40, act_order=False):
    torch.manual_seed(0)
    q = QuantLinear.from_linear(torch.nn.Linear(K, N), scheme)
    if act_order:
        q = QuantLinear.from_codes(q.codes(), q.scale, q.zero_point, scheme, q.bias, torch.randperm(K))
    return q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_fast_forward_equals_dispatched(scheme, dtype, monkeypatch):
    """No choose() and no Python argument checks on the plain CPU path; the result is bit-equal to the path that
    decides through the table (QKERNELS_BACKEND=cpu forces the same kernel the long way)."""
    q = layer(scheme, act_order=isinstance(scheme, Int8WeightOnly))
    x = torch.randn(2, 3, 96, dtype=dtype)
    seen = []
    monkeypatch.setattr(dispatch, "choose", lambda *a, **k: seen.append(a[0]))
    for name in ("_check_int4_args", "_check_int8_args"):
        monkeypatch.setattr(int_gemm, name, lambda *a, **k: seen.append("check"))
    out = q(x)
    assert seen == [] and out.shape == (2, 3, 40) and out.dtype == dtype
    monkeypatch.undo()
    monkeypatch.setenv("QKERNELS_BACKEND", "cpu")
    assert torch.equal(q(x), out)


def test_compiled_op_cache_honours_overrides(monkeypatch):
    dev = torch.device("cpu")
    op = _call.compiled_op("int4_weight_only_mm", dev)
    assert op is torch.ops.qkernels.int4_weight_only_mm.default
    assert _call.compiled_op("int4_weight_only_mm", dev) is op  # cached
    assert _call.cpu_op("int4_weight_only_mm", dev) is op
    assert _call.cpu_op("fp8_mm", torch.device("cuda", 0)) is None  # a GPU's fp8 decision reads the call: no cache
    with monkeypatch.context() as m:  # an op whose CPU rule would read the call's context: always ask choose
        m.setattr(_call, "_COMPILED", {})
        m.setattr(dispatch, "cpu_fast_path", lambda op: op != "gguf_mm")
        assert _call.compiled_op("gguf_mm", dev) is None and _call.cpu_op("gguf_mm", dev) is None
    with dispatch.mock_device("sm90"):
        assert _call.compiled_op("int4_weight_only_mm", dev) is None
    monkeypatch.setenv("QKERNELS_BACKEND", "reference")  # set after the cache was filled: takes effect at once
    assert _call.compiled_op("int4_weight_only_mm", dev) is None
    calls = []
    orig = qkernels.reference.OPS["int4_weight_only_mm"]
    monkeypatch.setitem(qkernels.reference.OPS, "int4_weight_only_mm", lambda *a: calls.append(1) or orig(*a))
    q = layer(Int4WeightOnly(32))
    q(torch.randn(1, 96))
    qkernels.int4_weight_only_mm(torch.randn(1, 96), q.qweight, q.scale, q.zero_point, 32)
    assert calls == [1, 1]


def test_shape_class():
    assert dispatch.shape_class(dict(dtype=torch.bfloat16, M=1, K=64)) == (("dtype", torch.bfloat16), ("M", 1),
                                                                            ("K", 64))
    assert [dispatch.shape_class({"M": m})[0][1] for m in (1, 2, 3, 4, 5, 17, 64)] == [1, 2, 4, 4, 8, 32, 64]


def test_public_int4_errors_unchanged():
    """The fast path runs the kernel first; its failures are reported as the Python checks word them."""
    q = layer(Int4WeightOnly(32))
    w, s, z = q.qweight, q.scale, q.zero_point
    x = torch.randn(2, 96)
    f = qkernels.int4_weight_only_mm
    with pytest.raises(ValueError, match=r"packed_w must have shape \[N, K/2\] with K=64 .*x may be shorter than "
                                         r"the weight's K=96 only within its last group"):
        f(torch.randn(2, 64), w, s, z, 32)
    with pytest.raises(ValueError, match=r"packed_w must have shape \[N, K/2\] with K=128"):
        f(torch.randn(2, 128), w, s, z, 32)
    with pytest.raises(TypeError, match="x must have dtype"):
        f(x.to(torch.int32), w, s, z, 32)
    with pytest.raises(ValueError, match="group_size must be a positive divisor of K=96, got True"):
        f(x, w, s, z, True)
    with pytest.raises(ValueError, match="group_size must be a positive divisor of K=96, got 40"):
        f(x, w, s, z, 40)
    with pytest.raises(TypeError, match="zero_point must have dtype int32"):
        f(x, w, s, z.float(), 32)
    with pytest.raises(ValueError, match=r"scale must have shape \[N, K/group_size\]"):
        f(x, w, s[:, :2], z, 32)
    with pytest.raises(TypeError, match="packed_w must be a torch.Tensor"):
        f(x, w.tolist(), s, z, 32)
    with pytest.raises(ValueError, match="x must have at least 1 dim"):
        f(torch.tensor(1.0), w, s, z, 32)
    with pytest.raises(RuntimeError, match="zero"):  # the kernel's own range check of the zero points stands
        f(x, w, s, torch.full_like(z, 100), 32)


@pytest.mark.parametrize("fn, sname", [(qkernels.int8_weight_only_mm, "scale"), (qkernels.int8_dynamic_mm, "w_scale")])
def test_public_int8_errors_unchanged(fn, sname):
    q = layer(Int8WeightOnly())
    x = torch.randn(3, 96)
    with pytest.raises(ValueError, match=r"q_w must have shape \[N, K\] with K=64"):
        fn(torch.randn(3, 64), q.qweight, q.scale)
    with pytest.raises(TypeError, match="q_w must have dtype int8"):
        fn(x, q.qweight.to(torch.int16), q.scale)
    with pytest.raises(ValueError, match=rf"{sname} must have shape \[N\] = \[40\]"):
        fn(x, q.qweight, q.scale[:5])
    with pytest.raises(TypeError, match=f"{sname} must have dtype"):
        fn(x, q.qweight, q.scale.to(torch.int32))


@pytest.mark.parametrize("scheme", [Int4WeightOnly(32), Int4WeightOnly(64), Int8WeightOnly()], ids=repr)
def test_layer_input_errors(scheme):
    q = layer(scheme)  # Int4WeightOnly(64): K=96 is padded to 128
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., K\] with K=96 \(in_features\), got \(2, 128\)"):
        q(torch.randn(2, 128))
    with pytest.raises(TypeError, match="x must have dtype"):
        q(torch.ones(2, 96, dtype=torch.int64))
    with pytest.raises(ValueError, match="got a 0-d tensor"):
        q(torch.tensor(1.0))


@pytest.mark.parametrize("scheme", [Int4WeightOnly(32), Int8WeightOnly()], ids=repr)
def test_bias_cast_follows_the_buffer(scheme):
    """The bias kept in the activation dtype is recast when the fp32 buffer changes in place or is loaded."""
    q = layer(scheme)
    x = torch.randn(4, 96, dtype=torch.bfloat16)
    want = lambda: q._layout.mm(q, q._buffers, x) + q.bias.to(x.dtype)  # noqa: E731
    assert q.bias.dtype == torch.float32 and torch.equal(q(x), want())
    with torch.no_grad():
        q.bias.add_(1.0)
    assert torch.equal(q(x), want())
    sd = q.state_dict()
    sd["bias"] = torch.randn(40)
    q.load_state_dict(sd)
    assert torch.equal(q(x), want())
    with torch.inference_mode():  # an inference-mode bias has no version counter: cast per call
        q2 = layer(scheme)
        assert torch.equal(q2(x), q2._layout.mm(q2, q2._buffers, x) + q2.bias.to(x.dtype))
