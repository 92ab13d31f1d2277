"""Integer affine quantization and int4 packing: C++ CPU kernels bit-exact against the reference."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkernels
from qkernels.reference import int_quant as ref

from .conftest import FLOAT_DTYPES


def test_extension_is_built():
    # every other CPU test would silently run the reference if the build were missing
    assert qkernels.HAS_EXTENSION, qkernels._ext.LOAD_ERROR
    assert qkernels.explain("quantize_affine", "cpu").backend == "cpu"


def _both(w, bits, group_size, symmetric, signed, domain="int"):
    got = qkernels.quantize_affine(w, bits, group_size, symmetric, signed=signed, zero_point_domain=domain)
    want = qkernels.quantize_affine(w, bits, group_size, symmetric, signed=signed, zero_point_domain=domain,
                                    backend="reference")
    return got, want


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, 256, 96, -1, "tensor"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("signed", [True, False])
def test_quantize_matches_reference(dtype, bits, group_size, symmetric, signed):
    w = (torch.randn(24, 768) * torch.rand(24, 1) * 3).to(dtype)
    (q, s, z), (q2, s2, z2) = _both(w, bits, group_size, symmetric, signed)
    assert torch.equal(s, s2) and torch.equal(z, z2) and torch.equal(q, q2)
    qmin, qmax = ref.int_range(bits, signed)
    assert q.dtype == (torch.int8 if signed else torch.uint8)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    d = qkernels.dequantize_affine(q, s, z, group_size)
    d2 = qkernels.dequantize_affine(q, s, z, group_size, backend="reference")
    assert torch.equal(d, d2)
    # round-to-nearest: error at most half a step (plus fp32 rounding) wherever the value was not clamped
    step = (s if s.dim() == 0 else s.repeat_interleave(w.shape[-1] // s.shape[-1], dim=-1))
    err = (d - w.float()).abs()
    assert (err <= 0.5 * step * (1 + 1e-5) + 1e-6).float().mean() > 0.99


def test_scales_are_true_quotients():
    """Scales are correctly rounded fp32 quotients, as the C++ and CUDA kernels compute them: amax 3 with int4
    symmetric is 3 / 7 = 0x3EDB6DB7, where a multiply by the reciprocal (what PyTorch's CUDA division by a Python
    number does) gives 0x3EDB6DB8; per-token int8 0.140625 / 127 = 0x3A912245 (reciprocal: 0x3A912244). The reference
    divides by a tensor (reference/_arith.true_div) so that it means the same on GPU tensors."""
    from qkernels.reference import int_gemm as gref

    w = torch.tensor([[3.0, -1.0, 0.5, 2.0]])
    for scale in (ref.choose_qparams_affine(w, 4, 4, True, True, False)[0], qkernels.quantize_affine(w, 4, 4, True)[1]):
        assert scale.view(torch.int32).item() == 0x3EDB6DB7
    x = torch.tensor([[0.140625, 0.1]])
    for scale in (gref.quantize_per_token_int8(x)[1], qkernels.quantize_per_token_int8(x)[1]):
        assert scale.view(torch.int32).item() == 0x3A912245


@pytest.mark.parametrize("bits", [4, 8])
def test_float_zero_point_domain(bits):
    w = torch.randn(16, 256) + 2.0  # all-positive groups: min is not 0, as in GGUF Q4_1
    (q, s, mn), (q2, s2, mn2) = _both(w, bits, 32, False, False, "float")
    assert torch.equal(q, q2) and torch.equal(s, s2) and torch.equal(mn, mn2)
    assert q.dtype == torch.uint8 and int(q.max()) <= (1 << bits) - 1
    assert torch.equal(mn, w.reshape(16, 8, 32).amin(-1))
    d = qkernels.dequantize_affine(q, s, mn, 32, zero_point_domain="float")
    assert torch.equal(d, qkernels.dequantize_affine(q, s, mn, 32, zero_point_domain="float", backend="reference"))
    assert (d - w).abs().max() <= 0.5 * s.max() * 1.0001


def test_asymmetric_formula_and_zero_exact():
    w = torch.tensor([[-1.0, 0.0, 0.5, 3.0]])
    q, s, z = qkernels.quantize_affine(w, 8, -1, False, signed=False)
    assert s.item() == pytest.approx(4.0 / 255)
    assert z.item() == 0 - round(-1.0 / (4.0 / 255))  # zero_point = qmin - round(vmin / scale)
    d = qkernels.dequantize_affine(q, s, z)
    assert d[0, 1].item() == 0.0  # 0 is exactly representable


@pytest.mark.parametrize("symmetric", [True, False])
def test_constant_and_zero_groups(symmetric):
    w = torch.zeros(4, 64)
    w[1] = 0.75  # constant positive group: range [0, 0.75]
    w[2] = -2.0
    q, s, z = qkernels.quantize_affine(w, 4, 32, symmetric)
    assert torch.isfinite(s).all() and (s > 0).all()
    d = qkernels.dequantize_affine(q, s, z, 32)
    assert torch.equal(d[0], w[0])  # all-zero group: scale 1, exact
    assert torch.allclose(d, w, atol=1e-6)


def test_round_half_even():
    # 0.5 and 2.5 steps round to even, like torch.round and C nearbyint
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5, 7.0]])
    s = torch.ones(1, 1)
    z = torch.zeros(1, 1, dtype=torch.int32)
    q = qkernels.quantize_affine_with_qparams(w, s, z, 4, -1)
    assert q.tolist() == [[0, 2, 2, 0, -2, 7]]


@pytest.mark.parametrize("shape", [(3, 5, 64), (128,), (7, 32)])
def test_leading_dims_and_noncontiguous(shape):
    w = torch.randn(*shape[:-1], shape[-1] * 2)[..., ::2]  # non-contiguous view
    assert not w.is_contiguous() or w.dim() == 1
    (q, s, z), (q2, s2, z2) = _both(w, 4, 32, False, True)
    assert q.shape == w.shape and s.shape == (*shape[:-1], shape[-1] // 32)
    assert torch.equal(q, q2) and torch.equal(s, s2) and torch.equal(z, z2)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), groups=st.integers(1, 6), group_size=st.sampled_from([2, 6, 32, 48, 64]),
       bits=st.integers(2, 8), symmetric=st.booleans(), signed=st.booleans(),
       scale=st.floats(1e-4, 1e4), seed=st.integers(0, 2**16))
def test_quantize_property(rows, groups, group_size, bits, symmetric, signed, scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * group_size, generator=g) * scale
    (q, s, z), (q2, s2, z2) = _both(w, bits, group_size, symmetric, signed)
    assert torch.equal(q, q2) and torch.equal(s, s2) and torch.equal(z, z2)
    d = qkernels.dequantize_affine(q, s, z, group_size)
    assert torch.equal(d, ref.dequantize_affine(q, s, z, group_size, False, torch.float32))


# ---- int4 packing ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(2,), (5, 18), (3, 4, 130), (0, 8)])
def test_pack_unpack_roundtrip(signed, shape):
    lo, hi = (-8, 8) if signed else (0, 16)
    q = torch.randint(lo, hi, shape, dtype=torch.int8 if signed else torch.uint8)
    p = qkernels.pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (*shape[:-1], shape[-1] // 2)
    assert torch.equal(p, ref.pack_int4(q))
    assert torch.equal(qkernels.unpack_int4(p, signed), q)
    assert torch.equal(qkernels.unpack_int4(p, signed, backend="reference"), q)


def test_pack_layout_low_nibble_first():
    q = torch.tensor([1, 2, -1, 7, -8, 0], dtype=torch.int8)
    assert qkernels.pack_int4(q).tolist() == [0x21, 0x7F, 0x08]
    u = torch.tensor([15, 0], dtype=torch.uint8)
    assert qkernels.pack_int4(u).tolist() == [0x0F]


def test_pack_noncontiguous():
    q = torch.randint(-8, 8, (6, 20), dtype=torch.int8).t()  # [20, 6], non-contiguous
    assert torch.equal(qkernels.unpack_int4(qkernels.pack_int4(q)), q)


# ---- bad input ------------------------------------------------------------------------------------------------

def test_bad_inputs():
    w = torch.randn(4, 64)
    with pytest.raises(TypeError, match="w must have dtype"):
        qkernels.quantize_affine(w.int(), 4, 32)
    with pytest.raises(ValueError, match="group_size 48 must divide"):
        qkernels.quantize_affine(w, 4, 48)
    with pytest.raises(ValueError, match="bits must be an int in \\[2, 8\\]"):
        qkernels.quantize_affine(w, 9, 32)
    with pytest.raises(ValueError, match="bits must be an int"):
        qkernels.quantize_affine(w, 1, 32)
    with pytest.raises(ValueError, match="non-empty"):
        qkernels.quantize_affine(torch.empty(0, 64), 4, 32)
    bad = w.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        qkernels.quantize_affine(bad, 4, 32)
    bad[1, 3] = float("inf")
    with pytest.raises(ValueError, match="NaN or inf"):
        qkernels.quantize_affine(bad, 4, 32)
    with pytest.raises(ValueError, match="zero_point_domain"):
        qkernels.quantize_affine(w, 4, 32, zero_point_domain="double")
    with pytest.raises(ValueError, match="scale must have shape"):
        qkernels.dequantize_affine(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 3), None, 32)
    with pytest.raises(TypeError, match="q must have dtype"):
        qkernels.dequantize_affine(torch.zeros(4, 64), torch.ones(4, 2), None, 32)
    with pytest.raises(ValueError, match="must be even"):
        qkernels.pack_int4(torch.zeros(3, 5, dtype=torch.int8))
    with pytest.raises(ValueError, match="must be in \\[-8, 7\\]"):
        qkernels.pack_int4(torch.tensor([9, 0], dtype=torch.int8))
    with pytest.raises(ValueError, match="must be in \\[0, 15\\]"):
        qkernels.pack_int4(torch.tensor([16, 0], dtype=torch.uint8))
    with pytest.raises(TypeError, match="packed must have dtype uint8"):
        qkernels.unpack_int4(torch.zeros(4, dtype=torch.int8))


def test_cpp_checks_name_arguments():
    # the C++ kernels guard direct torch.ops calls too (no garbage, no crash)
    ops = torch.ops.qkernels
    with pytest.raises(RuntimeError, match="group_size 48 must divide"):
        ops.choose_qparams_affine(torch.randn(4, 64), 4, 48, True, True, False)
    with pytest.raises(RuntimeError, match="bits must be in \\[2, 8\\]"):
        ops.choose_qparams_affine(torch.randn(4, 64), 12, 32, True, True, False)
    with pytest.raises(RuntimeError, match="NaN or inf"):
        ops.choose_qparams_affine(torch.tensor([[1.0, float("nan")]]), 4, 2, True, True, False)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        ops.quantize_affine(torch.randn(4, 64), torch.ones(4, 3), None, 4, 32, True, False)
    with pytest.raises(RuntimeError, match="outside the int4 range"):
        ops.pack_int4(torch.tensor([100, 0], dtype=torch.int8))
    with pytest.raises(RuntimeError, match="packed must have dtype"):
        ops.unpack_int4(torch.zeros(4, dtype=torch.int32), True)


def test_inputs_not_modified():
    w = torch.randn(8, 64)
    w0 = w.clone()
    q, s, z = qkernels.quantize_affine(w, 4, 32, False)
    qkernels.dequantize_affine(q, s, z, 32)
    assert torch.equal(w, w0)


# ---- op registration: opcheck and torch.compile -----------------------------------------------------------------

def _opcheck_cases():
    w = torch.randn(8, 64)
    s, z = torch.ops.qkernels.choose_qparams_affine(w, 4, 32, False, True, False)
    q = torch.ops.qkernels.quantize_affine(w, s, z, 4, 32, True, False)
    return [
        (torch.ops.qkernels.choose_qparams_affine.default, (w, 4, 32, False, True, False)),
        (torch.ops.qkernels.choose_qparams_affine.default, (w.bfloat16(), 8, 64, True, False, True)),
        (torch.ops.qkernels.quantize_affine.default, (w, s, z, 4, 32, True, False)),
        (torch.ops.qkernels.dequantize_affine.default, (q, s, z, 32, False, torch.bfloat16)),
        (torch.ops.qkernels.pack_int4.default, (q,)),
        (torch.ops.qkernels.unpack_int4.default, (torch.ops.qkernels.pack_int4(q), True)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_torch_compile_fullgraph():
    def roundtrip(w):
        q, s, z = qkernels.quantize_affine(w, 4, 32, False)
        return qkernels.dequantize_affine(qkernels.unpack_int4(qkernels.pack_int4(q)), s, z, 32)

    w = torch.randn(16, 128)
    compiled = torch.compile(roundtrip, fullgraph=True, backend="inductor")
    assert torch.equal(compiled(w), roundtrip(w))
