"""W4A8: ``int8_dynamic_int4_mm`` (x rounded to int8 per row and weight group, int4 weights) against its fp64
reference, on every CPU path (the AVX2 u8 x s8 register kernel at small M, the composite of dequantized codes + the
W4A16 kernel at large M / other group sizes / QKERNELS_CPU_ISA=scalar), plus its edges (ragged x, NaN rows, zero
points out of range, argument errors), autograd, opcheck and the ``Int8DynamicInt4Weight`` scheme."""

from __future__ import annotations

import pytest
import torch

import qkernels
from qkernels.nn import Int4WeightOnly, Int8DynamicInt4Weight, QuantLinear
from qkernels.reference import int_gemm as ref

from .conftest import GEMM_RTOL, needs_extension, rel_err

pytestmark = needs_extension
op = torch.ops.qkernels.int8_dynamic_int4_mm


def _weight(N, K, g, signed, with_zp, gen):
    if signed:
        q = torch.randint(-8, 8, (N, K), dtype=torch.int8, generator=gen)
    else:
        q = torch.randint(0, 16, (N, K), dtype=torch.int8, generator=gen).to(torch.uint8)
    s = torch.rand(N, K // g, generator=gen) + 0.05
    zp = torch.randint(-8, 17, (N, K // g), dtype=torch.int32, generator=gen) if with_zp else None
    return qkernels.pack_int4(q), s, zp


# (M, N, K, group, Kx): the register kernel (M <= 24, K and group multiples of 64: one chunk per group for g <= 256,
# int16 sums folded every 256 k for g = 512 / per channel), ragged x (576 of 640), and the composite paths (M > 24,
# group 32)
CASES = [(1, 1, 64, 64, 64), (1, 13, 128, 128, 128), (1, 36, 640, 128, 576), (2, 9, 256, 64, 256),
         (3, 20, 512, 256, 512), (4, 8, 1024, 512, 1024), (5, 11, 768, 768, 768), (7, 6, 640, 128, 600),
         (30, 10, 256, 128, 256), (2, 12, 96, 32, 96), (1, 5, 640, 128, 520)]


@pytest.mark.parametrize("M,N,K,g,Kx", CASES)
@pytest.mark.parametrize("signed,with_zp", [(True, False), (True, True), (False, True)])
def test_matches_reference_fp32(M, N, K, g, Kx, signed, with_zp):
    gen = torch.Generator().manual_seed(M * 1000 + N * 7 + K + g)
    p, s, zp = _weight(N, K, g, signed, with_zp, gen)
    x = torch.randn(M, Kx, generator=gen)
    want = ref.int8_dynamic_int4_mm(x, p, s, zp, g, signed)
    out = op(x, p, s, zp, g, signed)
    assert out.dtype == torch.float32 and out.shape == (M, N)
    assert_within_fp32_rounding(out, want, x, s, g)


def assert_within_fp32_rounding(out, want, x, s, g):
    """|out - want| below 1e-6 of the output's magnitude scale T = |x| @ (24 * scale)^T (codes and zero point terms
    are at most 24 in size after the kernel's offset): the fp32 sums' rounding. One x code rounded the other way
    would cost ~scale * |x|max / 127 * 8, tens of times more than that bound at these K."""
    Kx = x.shape[1]
    T = x.abs().double() @ (24 * s.double().repeat_interleave(g, dim=1)[:, :Kx]).t()
    err = (out.double() - want.double()).abs()
    assert (err <= 1e-6 * T).all(), (err / T).max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M,N,K,g,Kx", [(1, 36, 640, 128, 576), (4, 8, 1024, 512, 1024), (30, 10, 256, 128, 256)])
def test_half_x_is_the_fp32_call_rounded(dtype, M, N, K, g, Kx):
    """16-bit x is widened exactly: the same codes and sums as for x.float(), the fp32 result rounded once."""
    gen = torch.Generator().manual_seed(K + M)
    p, s, zp = _weight(N, K, g, True, True, gen)
    x = torch.randn(M, Kx, generator=gen).to(dtype)
    out = op(x, p, s, zp, g, True)
    assert out.dtype == dtype
    assert torch.equal(out, op(x.float(), p, s, zp, g, True).to(dtype))
    assert rel_err(out, ref.int8_dynamic_int4_mm(x, p, s, zp, g, True)) < GEMM_RTOL[dtype]


@pytest.mark.parametrize("M", [1, 3, 30])
def test_scalar_isa_matches_avx2(M, monkeypatch):
    gen = torch.Generator().manual_seed(M)
    p, s, zp = _weight(16, 640, 128, True, True, gen)
    x = torch.randn(M, 576, generator=gen)
    want = ref.int8_dynamic_int4_mm(x, p, s, zp, 128, True)
    fast = op(x, p, s, zp, 128, True)
    monkeypatch.setenv("QKERNELS_CPU_ISA", "scalar")
    portable = op(x, p, s, zp, 128, True)
    assert_within_fp32_rounding(fast, want, x, s, 128)
    assert_within_fp32_rounding(portable, want, x, s, 128)


def test_codes_are_the_references():
    """The activations the op multiplies: quantize_per_group_int8's codes (ties, saturation, all-zero groups)."""
    x = torch.tensor([[0.5, -1.5, 2.5, 127.0] * 16 + [0.0] * 64, [1e-3] * 64 + [-3.0] * 64])
    q, sx = ref.quantize_per_group_int8(x, 64)
    assert sx[0, 1] == 1.0 and torch.all(q[0, 64:] == 0)  # an all-zero group: scale 1, codes 0
    assert q[0, :4].tolist() == [0, -2, 2, 127]  # x / 1.0, half to even
    # the op equals the integer sums of those codes exactly (weights of ones, one group: integers times scales)
    w = qkernels.pack_int4(torch.ones(1, 128, dtype=torch.int8))
    out = op(x, w, torch.ones(1, 2), None, 64, True).double()
    want = (q.double().reshape(2, 2, 64).sum(-1) * sx.double()).sum(-1, keepdim=True)
    assert torch.allclose(out, want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("M", [4, 30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K,g,Kx", [(256, 64, 256), (256, 128, 200), (640, 128, 576), (512, 512, 512)])
def test_activation_codes_are_the_references(M, dtype, K, g, Kx):
    """Every activation code (the vectorized quantizer in both layouts: evens / odds for the register kernel at
    M <= 24, natural order for the composite at larger M): with one-hot unsigned
    weights (row n = 1 at column n, scale 1, no zero point) out[m, n] = code[m, n] * xs[m, n // g], one rounding
    (to x's dtype: codes one apart differ by >= 1/127 relative, more than a bf16 rounding, so every code is seen).
    Rows with ties (x / xs = k + 0.5), a saturating element, an all-zero group."""
    gen = torch.Generator().manual_seed(K + g + Kx)
    x = torch.randn(M, Kx, generator=gen) * 3
    x[1, :64] = torch.arange(64) - 31.5  # amax 31.5 -> xs = 31.5 / 127: not exact ties, checked as computed
    x[2, :] = 0.5 * torch.randint(-60, 61, (Kx,), generator=gen).float()
    x[2, 0] = 127.0  # xs = 1 in the first group: every half-integer a tie, rounded to even
    x[3, :g] = 0.0  # an all-zero group: xs = 1, codes 0
    x = x.to(dtype)
    w = qkernels.pack_int4(torch.eye(K, dtype=torch.int8).to(torch.uint8))
    out = op(x, w, torch.ones(K, K // g), None, g, False)
    q, sx = ref.quantize_per_group_int8(torch.nn.functional.pad(x.float(), (0, K - Kx)), g)
    want = (q.float() * sx.repeat_interleave(g, dim=1)).to(dtype)
    assert torch.equal(out, want), (out.float() - want.float()).abs().max()


def test_nan_or_inf_row_is_nan_others_exact():
    gen = torch.Generator().manual_seed(3)
    p, s, zp = _weight(8, 256, 128, True, True, gen)
    for M in (3, 30):  # register kernel and composite
        x = torch.randn(M, 256, generator=gen)
        x[1, 7] = float("nan")
        x[2, 200] = float("inf")
        out = op(x, p, s, zp, 128, True)
        assert torch.isnan(out[1]).all() and torch.isnan(out[2]).all()
        keep = [0] + list(range(3, M))
        assert_within_fp32_rounding(out[keep], ref.int8_dynamic_int4_mm(x[keep], p, s, zp, 128, True), x[keep], s, 128)


def test_zero_point_out_of_range_raises():
    p, s, _ = _weight(4, 128, 64, True, False, torch.Generator().manual_seed(0))
    zp = torch.zeros(4, 2, dtype=torch.int32)
    zp[3, 1] = 17
    for M in (1, 30):
        with pytest.raises(RuntimeError, match=r"zero_point values must be in \[-8, 16\]"):
            op(torch.randn(M, 128), p, s, zp, 64, True)


def test_public_function_checks_arguments():
    p, s, zp = _weight(4, 128, 64, True, True, torch.Generator().manual_seed(0))
    x = torch.randn(2, 3, 128)
    out = qkernels.int8_dynamic_int4_mm(x, p, s, zp, 64)
    assert out.shape == (2, 3, 4)
    assert torch.equal(out.reshape(6, 4), op(x.reshape(6, 128), p, s, zp, 64, True))
    with pytest.raises(ValueError, match="scale must have shape"):
        qkernels.int8_dynamic_int4_mm(x, p, s[:, :1], zp, 64)
    with pytest.raises(ValueError, match="group_size must be a positive divisor"):
        qkernels.int8_dynamic_int4_mm(x, p, s, zp, 48)
    with pytest.raises(TypeError, match="x"):
        qkernels.int8_dynamic_int4_mm(x.to(torch.int32), p, s, zp, 64)
    assert torch.equal(qkernels.int8_dynamic_int4_mm(x, p, s, zp, 64, backend="reference"),
                       ref.int8_dynamic_int4_mm(x.reshape(6, 128), p, s, zp, 64, True).reshape(2, 3, 4))


def test_inputs_not_modified():
    p, s, zp = _weight(4, 128, 64, True, True, torch.Generator().manual_seed(1))
    x = torch.randn(3, 128)
    before = [t.clone() for t in (x, p, s, zp)]
    op(x, p, s, zp, 64, True)
    assert all(torch.equal(a, b) for a, b in zip(before, (x, p, s, zp)))


def test_opcheck():
    p, s, zp = _weight(8, 256, 128, True, True, torch.Generator().manual_seed(2))
    torch.library.opcheck(op.default, (torch.randn(2, 256), p, s, zp, 128, True))
    torch.library.opcheck(op.default, (torch.randn(2, 200).bfloat16(), p, s, None, 128, True))


def test_grad_x_is_straight_through():
    """Gradient with respect to x: the rounding of x is passed straight through (QAT's estimator), i.e. grad_y @ W
    with the dequantized weight, as for int8_dynamic_mm."""
    gen = torch.Generator().manual_seed(4)
    p, s, zp = _weight(8, 256, 128, True, True, gen)
    x = torch.randn(3, 256, generator=gen, requires_grad=True)
    gy = torch.randn(3, 8, generator=gen)
    qkernels.int8_dynamic_int4_mm(x, p, s, zp, 128).backward(gy)
    w = qkernels.dequantize_affine(qkernels.unpack_int4(p), s, zp, 128, out_dtype=torch.float32)
    assert torch.allclose(x.grad, gy @ w, rtol=1e-5, atol=1e-5)


# ---- the scheme ---------------------------------------------------------------------------------------------------


def test_scheme_layer_runs_the_op_on_int4_codes():
    torch.manual_seed(0)
    lin = torch.nn.Linear(576, 40, bias=True)
    w4 = QuantLinear.from_linear(lin, Int4WeightOnly(group_size=128))
    w48 = QuantLinear.from_linear(lin, Int8DynamicInt4Weight(group_size=128))
    # the same codes, scales and zero points as W4A16: only the activations differ
    for name in ("qweight", "scale", "zero_point"):
        assert torch.equal(getattr(w4, name), getattr(w48, name))
    x = torch.randn(2, 5, 576).bfloat16()
    with torch.inference_mode():
        out = w48(x)
        want = qkernels.int8_dynamic_int4_mm(x, w48.qweight, w48.scale, w48.zero_point, 128) + lin.bias.bfloat16()
    assert torch.equal(out, want)
    assert rel_err(out, w4(x)) < 2e-2  # x rounded to 8 bits: close to W4A16, not equal
    d = w48.scheme.to_dict()
    assert d == {"scheme": "int8_dynamic_int4_weight", "group_size": 128, "symmetric": False}
    assert type(w48.scheme).from_dict(d) == w48.scheme
    with pytest.raises(ValueError, match="Int8DynamicInt4Weight.group_size"):
        Int8DynamicInt4Weight(group_size=0)



def test_use_int8_activations_switches_int4_layers():
    """An int4 model (any source) to W4A8 in place: the same codes, so the logits equal those of the model quantized
    with Int8DynamicInt4Weight directly."""
    import copy

    from .formats_fixtures import IDS, tiny_llama

    base = tiny_llama()
    w4 = qkernels.quantize_(copy.deepcopy(base), Int4WeightOnly(group_size=32))
    direct = qkernels.quantize_(copy.deepcopy(base), Int8DynamicInt4Weight(group_size=32))
    switched = copy.deepcopy(w4)
    names = qkernels.use_int8_activations(switched)
    assert len(names) == 14 and "model.layers.0.self_attn.q_proj" in names
    layer = switched.get_submodule(names[0])
    assert isinstance(layer.scheme, Int8DynamicInt4Weight) and layer.scheme.group_size == 32
    assert torch.equal(layer.qweight, w4.get_submodule(names[0]).qweight)
    with torch.inference_mode():
        got, want, w4_out = switched(IDS).logits, direct(IDS).logits, w4(IDS).logits
    assert torch.equal(got, want)
    assert 0 < rel_err(got, w4_out) < 5e-2
    assert qkernels.use_int8_activations(switched) == []  # nothing left to switch
    with pytest.raises(ValueError, match="cannot be replaced in place"):
        qkernels.use_int8_activations(QuantLinear.from_linear(torch.nn.Linear(64, 8), Int4WeightOnly(32)))


def test_use_int8_activations_after_fuse_projections():
    """Fused groups hold one QuantLinear each: switching after fuse_projections switches them too, with the same
    logits as fusing the W4A8 model."""
    import copy

    from qkernels.nn import fuse_projections
    from qkernels.nn.fuse import FusedLinear

    from .formats_fixtures import IDS, tiny_llama

    w4 = qkernels.quantize_(tiny_llama(), Int4WeightOnly(group_size=32))
    first = copy.deepcopy(w4)
    qkernels.use_int8_activations(first)
    fuse_projections(first)
    later = copy.deepcopy(w4)
    fuse_projections(later)
    names = qkernels.use_int8_activations(later)
    assert any(name.endswith(".linear") for name in names)
    fused = [m for m in later.modules() if isinstance(m, FusedLinear)]
    assert fused and all(isinstance(m.linear.scheme, Int8DynamicInt4Weight) for m in fused)
    with torch.inference_mode():
        assert torch.equal(later(IDS).logits, first(IDS).logits)


def test_eval_a8_suffix():
    from qkernels.eval.runner import parse_scheme

    assert parse_scheme("gptq-int4-asym+a8") == parse_scheme("gptq-int4-asym")
    assert parse_scheme("rtn-int4+head8+a8") == parse_scheme("rtn-int4")
    assert parse_scheme("rtn-int4+head8+emb+a8") == parse_scheme("rtn-int4")
    with pytest.raises(ValueError, match=r"\+emb .* follows \+head8"):
        parse_scheme("rtn-int4+emb")
    for bad in ("int8+a8", "rtn-int8+a8", "q4_k_m+a8", "qat-int4+a8", "float+a8"):
        with pytest.raises(ValueError, match=r"\+a8"):
            parse_scheme(bad)
