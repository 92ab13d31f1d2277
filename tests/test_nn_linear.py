"""QuantLinear: numerics vs F.linear on the dequantized weight, storage, state_dict, devices, compile, sharding."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import qkernels
from qkernels import reference
from qkernels.nn import Fp4, Fp8Dynamic, Fp8WeightOnly, Int4WeightOnly, Int8Dynamic, Int8WeightOnly, QuantLinear

from .conftest import GEMM_RTOL_TABLE, rel_err

WEIGHT_ONLY = [Int4WeightOnly(64), Int4WeightOnly(32, symmetric=True), Int4WeightOnly(-1), Int8WeightOnly(),
               Int8WeightOnly(64, symmetric=False), Int8WeightOnly(32)]
ALL = WEIGHT_ONLY + [Int8Dynamic()]
# relative error ||out - ref|| / ||ref|| of the layer against an fp64 F.linear on its dequantized weight: the
# kernels accumulate in fp32 and round the output to x's dtype once
TOL = GEMM_RTOL_TABLE["layer"]


def make_linear(K=192, N=40, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(K, N, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(N, K, generator=g) * 0.1)
        if bias:
            lin.bias.copy_(torch.randn(N, generator=g))
    return lin


def expected(q: QuantLinear, x):
    """fp64 F.linear on the dequantized weight (W8A8: the reference op, which also quantizes x per token)."""
    if isinstance(q.scheme, Int8Dynamic):
        out = reference.int_gemm.int8_dynamic_mm(x.reshape(-1, x.shape[-1]), q.qweight, q.scale).double()
        out = out.reshape(*x.shape[:-1], -1)
    else:
        out = F.linear(x.double(), q.dequantize(torch.float64))
    return out + q.bias.double() if q.bias is not None else out


@pytest.mark.parametrize("scheme", ALL, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(1,), (5,), (2, 3), (4, 1, 3)])
def test_forward_matches_dequantized(scheme, dtype, lead):
    lin = make_linear()
    q = QuantLinear.from_linear(lin, scheme)
    x = torch.randn(*lead, 192).to(dtype)
    out = q(x)
    assert out.shape == (*lead, 40) and out.dtype == dtype
    tol = TOL[dtype] * (4 if isinstance(scheme, Int8Dynamic) else 1)  # W8A8: reference rounds x per token in fp32
    assert rel_err(out, expected(q, x)) < tol
    # and the quantized layer is close to the float one (RTN error only)
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    assert rel_err(out, ref) < (0.15 if q.kind == "int4" else 0.03)


@pytest.mark.parametrize("scheme", ALL, ids=repr)
def test_codes_bit_exact_vs_reference(scheme):
    lin = make_linear(bias=False)
    q = QuantLinear.from_linear(lin, scheme)
    w = lin.weight.detach()
    bits = 4 if q.kind == "int4" else 8
    g = q.group_size
    sym = getattr(scheme, "symmetric", True)
    s, z = reference.int_quant.choose_qparams_affine(w, bits, g, sym, True, False)
    codes = reference.int_quant.quantize_affine(w, s, z, bits, g, True, False)
    assert torch.equal(q.codes(), codes)
    assert torch.equal(q.scale.reshape(s.shape), s)
    if q.zero_point is not None:
        assert torch.equal(q.zero_point, z)
    else:
        assert not z.any()
    assert torch.equal(q.dequantize(), reference.int_quant.dequantize_affine(codes, s, z, g, False, torch.float32))
    # RTN: every weight within half a step of its dequantized value
    step = s.repeat_interleave(g, dim=1) if q.scale.dim() == 2 else s
    assert ((q.dequantize() - w).abs() <= step * 0.5 + 1e-6).all()


def test_non_contiguous_input_and_no_bias():
    lin = make_linear(bias=False)
    q = QuantLinear.from_linear(lin, Int4WeightOnly(64))
    big = torch.randn(6, 384)
    x = big[:, ::2]
    assert not x.is_contiguous()
    assert rel_err(q(x), expected(q, x)) < 1e-5
    assert q.bias is None and "bias=False" in repr(q)


def test_act_order_permutation():
    lin = make_linear()
    base = QuantLinear.from_linear(lin, Int4WeightOnly(64))
    perm = torch.randperm(192, generator=torch.Generator().manual_seed(3))
    q = QuantLinear.from_codes(base.codes(), base.scale, base.zero_point, base.scheme, lin.bias.detach(), perm)
    # stored column j is input feature perm[j]
    assert torch.equal(q.dequantize()[:, perm], base.dequantize())
    x = torch.randn(3, 192)
    assert rel_err(q(x), expected(q, x)) < 1e-5
    assert "act_order=True" in repr(q)


def test_state_dict_round_trip():
    for scheme in ALL:
        q = QuantLinear.from_linear(make_linear(seed=1), scheme)
        sd = q.state_dict()
        assert "qweight" in sd and "scale" in sd and "bias" in sd
        fresh = QuantLinear(192, 40, scheme, bias=True)
        fresh.load_state_dict(sd)
        x = torch.randn(4, 192)
        assert torch.equal(fresh(x), q(x))
    # a state dict of another scheme does not load silently
    sd = QuantLinear.from_linear(make_linear(), Int4WeightOnly(64)).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch|Unexpected key"):
        QuantLinear(192, 40, Int4WeightOnly(32, symmetric=True)).load_state_dict(sd)


def test_repr_and_backend():
    q = QuantLinear.from_linear(make_linear(), Int8WeightOnly())
    r = repr(q)
    assert "scheme=Int8WeightOnly(group_size=-1, symmetric=True)" in r
    assert f"backend={qkernels.explain('int8_weight_only_mm', 'cpu').backend}" in r
    assert q.backend() in ("cpu", "reference")


def test_to_device_and_forced_backend(monkeypatch):
    q = QuantLinear.from_linear(make_linear(), Int4WeightOnly(64)).to("cpu")
    x = torch.randn(2, 192)
    out = q(x)
    monkeypatch.setenv("QKERNELS_BACKEND", "reference")
    assert q.backend() == "reference"
    assert rel_err(q(x), out) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("scheme", ALL, ids=repr)
def test_cuda_matches_cpu(scheme):
    q = QuantLinear.from_linear(make_linear(), scheme)
    x = torch.randn(7, 192, dtype=torch.float16)
    qc = q.to("cuda")
    assert qc.qweight.is_cuda
    out = qc(x.cuda()).cpu()
    assert rel_err(out, expected(q.cpu(), x)) < TOL[torch.float16] * 4


@pytest.mark.parametrize("scheme", [Fp8WeightOnly(), Fp8Dynamic("tensor"), Fp4("mxfp4")], ids=repr)
def test_float_schemes_build(scheme):
    """The fp8/fp4 schemes build like the integer ones (their numerics: tests/test_nn_float_schemes.py)."""
    q = QuantLinear.from_linear(make_linear(K=256), scheme)
    assert q.kind in ("fp8", "fp4") and q.qweight.dtype == torch.uint8
    assert rel_err(q.dequantize(), make_linear(K=256).weight) < 0.2
    assert QuantLinear(256, 64, scheme).in_features == 256


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"in_features=200 padded to whole groups of 67 \(201\) is odd"):
        QuantLinear.from_linear(make_linear(K=200), Int4WeightOnly(67))
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear, got Conv1d"):
        QuantLinear.from_linear(nn.Conv1d(3, 3, 1), Int8WeightOnly())
    with pytest.raises(TypeError, match="scheme must be a qkernels.nn scheme"):
        QuantLinear.from_linear(make_linear(), "int4")
    q = QuantLinear.from_linear(make_linear(), Int4WeightOnly(64))
    with pytest.raises(ValueError, match="K=100"):
        q(torch.randn(2, 100))
    with pytest.raises(TypeError, match="x must have dtype"):
        q(torch.ones(2, 192, dtype=torch.int32))
    with pytest.raises(ValueError, match="must be a permutation"):
        QuantLinear.from_codes(q.codes(), q.scale, q.zero_point, q.scheme, None, torch.zeros(192, dtype=torch.long))
    with pytest.raises(ValueError, match=r"scale must have shape \(40, 3\)"):
        QuantLinear.from_codes(q.codes(), q.scale[:, :2], q.zero_point, q.scheme)
    with pytest.raises(ValueError, match="int4 codes must be in"):
        QuantLinear.from_codes(q.codes() * 2, q.scale, q.zero_point, q.scheme)


def test_compile_fullgraph():
    torch._dynamo.reset()
    schemes = [Int4WeightOnly(32), Int8WeightOnly(), Int8WeightOnly(32, False), Int8Dynamic()]
    model = nn.Sequential(*[QuantLinear.from_linear(make_linear(64, 64, seed=i), s) for i, s in enumerate(schemes)])
    perm = torch.randperm(64)
    model.append(QuantLinear.from_codes(model[0].codes(), model[0].scale, model[0].zero_point, model[0].scheme,
                                        None, perm))
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, fullgraph=True)(x)  # fullgraph: any graph break is an error
    assert rel_err(out, ref) < 1e-5


# ---- tensor-parallel shards (single process; the gloo test is tests/test_nn_distributed.py) ------------------
@pytest.mark.parametrize("scheme", WEIGHT_ONLY + [Int8Dynamic()], ids=repr)
@pytest.mark.parametrize("world", [2, 4])
def test_shards_recombine(scheme, world):
    q = QuantLinear.from_linear(make_linear(K=256, N=48), scheme)
    x = torch.randn(5, 256)
    full = q(x)
    cols = [q.shard(r, world, 0) for r in range(world)]
    assert torch.equal(torch.cat([c.dequantize() for c in cols], 0), q.dequantize())
    assert torch.allclose(torch.cat([c(x) for c in cols], -1), full, atol=1e-5)
    k = 256 // world  # a whole number of groups for every scheme here
    rows = [q.shard(r, world, 1) for r in range(world)]
    assert all(r.in_features == k and (r.bias is not None) == (i == 0) for i, r in enumerate(rows))
    assert torch.equal(torch.cat([r.dequantize() for r in rows], 1), q.dequantize())
    out = sum(r(x[:, i * k:(i + 1) * k]) for i, r in enumerate(rows))
    tol = 0.02 if isinstance(scheme, Int8Dynamic) else 1e-5  # W8A8 shards quantize their own slice of x
    assert rel_err(out, full) < tol


def test_shard_bad_args():
    q = QuantLinear.from_linear(make_linear(K=192, N=40), Int4WeightOnly(64))
    with pytest.raises(ValueError, match="out_features=40 must be divisible by world_size=3"):
        q.shard(0, 3, 0)
    with pytest.raises(ValueError, match="whole groups of 64"):
        q.shard(0, 6, 1)
    with pytest.raises(ValueError, match="rank must be in"):
        q.shard(2, 2, 0)
    with pytest.raises(ValueError, match="dim must be 0"):
        q.shard(0, 2, 2)
    qp = QuantLinear.from_codes(q.codes(), q.scale, q.zero_point, q.scheme, None, torch.randperm(192))
    with pytest.raises(NotImplementedError, match="act-order"):
        qp.shard(0, 2, 1)


@settings(max_examples=15, deadline=None)
@given(N=st.integers(1, 24), groups=st.integers(1, 4), gs=st.sampled_from([2, 8, 32]), M=st.integers(1, 9),
       sym=st.booleans())
def test_property_int4_any_shape(N, groups, gs, M, sym):
    lin = make_linear(K=groups * gs, N=N, seed=N)
    q = QuantLinear.from_linear(lin, Int4WeightOnly(gs, sym))
    x = torch.randn(M, groups * gs)
    assert rel_err(q(x), expected(q, x)) < 1e-5
