"""QuantLinear with the fp8 / fp4 schemes (Fp8WeightOnly, Fp8Dynamic, Fp4): codes bit-exact vs the reference casts,
forward vs the reference GEMM path, error vs float, quantize_ on a tiny transformers Llama, save/load, compile,
shards, bad input."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qkernels
from qkernels.nn import Fp4, Fp8Dynamic, Fp8WeightOnly, Int8WeightOnly, QuantLinear
from .formats_fixtures import IDS, logits, quant_names, tiny_llama  # noqa: F401
from qkernels.nn.linear import FP8_WEIGHT_DTYPE

from .conftest import GEMM_RTOL_TABLE, rel_err, requires_sm
from .test_nn_linear import make_linear as make_int_linear

FP8 = [Fp8WeightOnly(), Fp8Dynamic("row"), Fp8Dynamic("tensor"), Fp8Dynamic("block")]
FP4 = [Fp4("mxfp4"), Fp4("nvfp4"), Fp4("nvfp4", weight_only=True)]
SCHEMES = FP8 + FP4
# relative error of the layer vs the reference path: the same fp8/fp4 codes (the casts are bit-exact), the layer
# accumulates in fp32 and rounds once to x's dtype, the reference accumulates in fp64
TOL = GEMM_RTOL_TABLE["layer"]
# RTN error of the whole layer vs the float F.linear on random Gaussian data (weights and, for W8A8/W4A4,
# activations rounded): e4m3 has 3 mantissa bits (~2.5% rms per tensor), e2m1 1 bit (~10-15%)
FLOAT_ERR = {"fp8_weight_only": 0.04, "fp8_dynamic": 0.05, "fp4": 0.25}


def make_linear(K=256, N=128, bias=True, seed=0):
    """test_nn_linear's random Linear, with shapes every fp8 / fp4 block grid divides."""
    return make_int_linear(K, N, bias, seed)


def expected(q: QuantLinear, x):
    """The reference path: the plain-PyTorch ops (fp64 accumulation) on the layer's own codes."""
    s = q.scheme
    bias = None if q.bias is None else q.bias
    if isinstance(s, Fp8WeightOnly) or getattr(s, "weight_only", False):
        out = F.linear(x.double(), q.dequantize(torch.float64))
        return out if bias is None else out + bias.double()
    if isinstance(s, Fp8Dynamic):
        gran, block = q._fp8_act_args()
        a_q, a_s = qkernels.quantize_fp8(x, FP8_WEIGHT_DTYPE, gran, block or 128, backend="reference")
        return qkernels.fp8_mm(a_q, a_s, q.codes(), q.scale, torch.float64, bias, backend="reference")
    a_p, a_s, a_g = qkernels.quantize_fp4(x, s.format, backend="reference")
    return qkernels.fp4_mm(a_p, a_s, q.qweight, q.scale, torch.float64, bias, format=s.format, a_global_scale=a_g,
                           b_global_scale=q.global_scale, backend="reference")


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("lead", [(1,), (7,), (2, 3)])
def test_forward_matches_reference(scheme, dtype, lead):
    lin = make_linear()
    q = QuantLinear.from_linear(lin, scheme)
    x = torch.randn(*lead, 256).to(dtype)
    out = q(x)
    assert out.shape == (*lead, 128) and out.dtype == dtype
    assert rel_err(out, expected(q, x)) < TOL[dtype]
    ref = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    err = rel_err(out, ref)
    assert 0 < err < FLOAT_ERR[scheme.name]


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_codes_bit_exact_vs_reference(scheme):
    lin = make_linear(bias=False, seed=1)
    q = QuantLinear.from_linear(lin, scheme)
    w = lin.weight.detach()
    if q.kind == "fp8":
        gran, block = q._fp8_weight_args()
        codes, s = qkernels.quantize_fp8(w, FP8_WEIGHT_DTYPE, gran, block or 128, backend="reference")
        assert torch.equal(q.qweight, codes.view(torch.uint8)) and torch.equal(q.scale, s)
        assert q.codes().dtype == FP8_WEIGHT_DTYPE
        ref_w = qkernels.dequantize_fp8(codes, s, torch.float32, gran, block, backend="reference")
        # RTN with 3 mantissa bits: every weight within 2^-4 relative of its decode (normal range)
        big = w.abs() > 1e-2
        assert ((q.dequantize() - w).abs()[big] <= w.abs()[big] * 2**-4 + 1e-7).all()
    else:
        packed, s, g = qkernels.quantize_fp4(w, scheme.format, backend="reference")
        assert torch.equal(q.qweight, packed) and torch.equal(q.scale, s.view(torch.uint8))
        assert (g is None) == (q.global_scale is None) and (g is None or torch.equal(q.global_scale, g))
        ref_w = qkernels.dequantize_fp4(packed, s, g, scheme.format, backend="reference")
    assert torch.equal(q.dequantize(), ref_w)


def test_storage_layout():
    K, N = 256, 128
    shapes = {
        Fp8WeightOnly(): {"qweight": (torch.uint8, (N, K)), "scale": (torch.float32, (N, 1))},
        Fp8Dynamic("tensor"): {"qweight": (torch.uint8, (N, K)), "scale": (torch.float32, ())},
        Fp8Dynamic("block"): {"qweight": (torch.uint8, (N, K)), "scale": (torch.float32, (1, 2))},
        Fp4("mxfp4"): {"qweight": (torch.uint8, (N, K // 2)), "scale": (torch.uint8, (N, K // 32))},
        Fp4("nvfp4"): {"qweight": (torch.uint8, (N, K // 2)), "scale": (torch.uint8, (N, K // 16)),
                       "global_scale": (torch.float32, ())},
    }
    for scheme, want in shapes.items():
        sd = QuantLinear(K, N, scheme, bias=False).state_dict()
        assert {k: (v.dtype, tuple(v.shape)) for k, v in sd.items()} == want, scheme


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_state_dict_dtype_cast_and_repr(scheme):
    q = QuantLinear.from_linear(make_linear(seed=2), scheme)
    x = torch.randn(4, 256)
    fresh = QuantLinear(256, 128, scheme, bias=True)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), q(x))
    # a model cast to bf16 after quantization: the uint8 codes stay codes (float8 buffers would have been cast)
    qb = QuantLinear.from_linear(make_linear(seed=2), scheme).to(torch.bfloat16)
    assert torch.equal(qb.qweight, q.qweight) and qb.qweight.dtype == torch.uint8
    xb = x.bfloat16()  # same input: the difference is the bf16 bias and scales only
    assert rel_err(qb(xb), q(xb)) < 1e-2
    r = repr(q)
    assert f"scheme={scheme!r}" in r and f"op={q.op}" in r and f"backend={q.backend()}" in r
    assert q.backend() in ("cpu", "reference")


def test_backend_choice_for_gpus():
    """The layer asks the dispatch table with the shapes/dtypes its forward passes (mocked capabilities)."""
    q = QuantLinear(256, 128, Fp8Dynamic("tensor"))
    d = qkernels.dispatch.choose("fp8_mm", "cpu", a_dtype=FP8_WEIGHT_DTYPE, b_dtype=FP8_WEIGHT_DTYPE,
                                 granularity="tensor", K=256, N=128)
    assert q.backend() == d.backend
    assert q._fp8_mm_granularity() == "tensor" and q.op == "fp8_mm"
    assert QuantLinear(256, 128, Fp8WeightOnly()).op == "fp8_weight_only_mm"
    assert QuantLinear(256, 128, Fp4("mxfp4")).op == "fp4_mm"
    assert QuantLinear(256, 128, Fp4("mxfp4", weight_only=True)).op == "fp4_weight_only_mm"


def test_from_float_codes_round_trip():
    for scheme in SCHEMES:
        q = QuantLinear.from_linear(make_linear(seed=3), scheme)
        if q.kind == "fp8":
            scale = q.scale.reshape(-1) if q.scale.dim() == 2 and q.scale.shape[1] == 1 else q.scale
            r = QuantLinear.from_float_codes(q.codes(), scale, scheme, q.bias)
        else:
            sdt = qkernels.ops.float4.SCALE_DTYPES[scheme.format]
            r = QuantLinear.from_float_codes(q.qweight, q.scale.view(sdt), scheme, q.bias, q.global_scale)
        assert all(torch.equal(a, b) for a, b in zip(q.state_dict().values(), r.state_dict().values()))
        assert list(q.state_dict()) == list(r.state_dict())


def test_non_contiguous_input_no_bias_and_empty():
    for scheme in SCHEMES:
        q = QuantLinear.from_linear(make_linear(bias=False), scheme)
        x = torch.randn(5, 512)[:, ::2]
        assert not x.is_contiguous()
        assert rel_err(q(x), expected(q, x)) < 1e-5
        assert q.bias is None and "bias=False" in repr(q)
        for dtype in (torch.float32, torch.bfloat16):
            empty = q(torch.randn(2, 0, 256, dtype=dtype))
            assert empty.shape == (2, 0, 128) and empty.dtype == dtype


def test_non_finite_activations_propagate():
    """NaN in one token: that token's outputs are NaN (its activation scale / block scale is NaN), the others are
    unaffected for per-token / per-block activation scales."""
    for scheme in [Fp8WeightOnly(), Fp8Dynamic("row"), Fp4("mxfp4")]:
        q = QuantLinear.from_linear(make_linear(), scheme)
        x = torch.randn(3, 256)
        x[1, 5] = float("nan")
        out = q(x)
        assert out[1].isnan().any(), scheme
        assert torch.isfinite(out[[0, 2]]).all(), scheme
        assert rel_err(out[[0, 2]], q(x[[0, 2]])) < 1e-6


# ---- quantize_ on a tiny transformers Llama, save/load, compile --------------------------------------------------

# logits relative error vs the float model (2 layers of random weights; W4A4 rounds every activation too)
LLAMA_ERR = {"fp8_weight_only": 0.08, "fp8_dynamic": 0.1, "fp4": 0.45}  # measured: 0.049, 0.044-0.067, 0.16-0.32


@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_quantize_llama_save_load(tmp_path, scheme, caplog):
    # hidden 128 / intermediate 256 so that 128x128 blocks fit q/o/gate/up/down; k/v (out 64) are skipped by "block"
    model = tiny_llama(hidden=128, intermediate=256)
    ref = logits(model)
    with caplog.at_level(logging.WARNING, logger="qkernels.nn"):
        qkernels.quantize_(model, scheme)
    names = quant_names(model)
    blocky = scheme == Fp8Dynamic("block")
    assert len(names) == (10 if blocky else 14)
    if blocky:
        assert type(model.model.layers[0].self_attn.k_proj) is nn.Linear
        assert any("skipping model.layers.0.self_attn.k_proj" in r.getMessage() and "divisible by 128" in
                   r.getMessage() for r in caplog.records)
    out = logits(model)
    err = rel_err(out, ref)
    assert 0 < err < LLAMA_ERR[scheme.name]
    qkernels.save_quantized(model, str(tmp_path))
    cfg = json.load(open(tmp_path / "config.json"))
    assert cfg["quantization_config"]["layers"]["model.layers.0.self_attn.q_proj"]["scheme"] == scheme.to_dict()
    loaded = qkernels.load_quantized(str(tmp_path))
    assert quant_names(loaded) == names
    assert torch.equal(logits(loaded), out)
    for n in names:
        a, b = model.get_submodule(n).state_dict(), loaded.get_submodule(n).state_dict()
        assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_compile_fullgraph():
    torch._dynamo.reset()
    model = nn.Sequential(*[QuantLinear.from_linear(make_linear(128, 128, seed=i), s) for i, s in enumerate(SCHEMES)])
    x = torch.randn(3, 128)
    with torch.no_grad():
        ref = model(x)
        # aot_eager: dynamo capture (graph breaks raise with fullgraph) plus the fake kernels, no C++ codegen
        out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    assert rel_err(out, ref) < 1e-6


# ---- tensor-parallel shards --------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_shards_recombine(scheme):
    q = QuantLinear.from_linear(make_linear(K=512, N=256), scheme)
    x = torch.randn(5, 512)
    full = q(x)
    world = 2
    cols = [q.shard(r, world, 0) for r in range(world)]
    assert torch.equal(torch.cat([c.dequantize() for c in cols], 0), q.dequantize())
    assert rel_err(torch.cat([c(x) for c in cols], -1), full) < 1e-6
    rows = [q.shard(r, world, 1) for r in range(world)]
    assert torch.equal(torch.cat([r.dequantize() for r in rows], 1), q.dequantize())
    assert [r.bias is not None for r in rows] == [True, False]
    out = sum(r(x[:, i * 256:(i + 1) * 256]) for i, r in enumerate(rows))
    # weight-only: exact up to fp32 summation order; W8A8 / W4A4 shards quantize their own slice of x
    tol = 1e-5 if "weight_only" in scheme.name or getattr(scheme, "weight_only", False) else \
        {"fp8_dynamic": 0.03, "fp4": 0.15}[scheme.name]
    assert rel_err(out, full) < tol
    with pytest.raises(ValueError, match="divisible by world_size=3"):
        q.shard(0, 3, 0)


def test_shard_block_boundaries():
    q = QuantLinear.from_linear(make_linear(K=256, N=128), Fp8Dynamic("block"))
    with pytest.raises(ValueError, match="whole 128x128 scale blocks"):
        q.shard(0, 2, 0)
    q = QuantLinear.from_linear(make_linear(K=64, N=16), Fp4("mxfp4"))
    with pytest.raises(ValueError, match="whole mxfp4 blocks of 32"):
        q.shard(0, 4, 1)


# ---- bad input ----------------------------------------------------------------------------------------------------
def test_bad_inputs():
    q = QuantLinear.from_linear(make_linear(), Fp8Dynamic("row"))
    with pytest.raises(ValueError, match=r"x must have shape \[\.\.\., K\] with K=256.*got \(2, 100\)"):
        q(torch.randn(2, 100))
    with pytest.raises(TypeError, match="x must have dtype"):
        q(torch.ones(2, 256, dtype=torch.int32))
    with pytest.raises(ValueError, match="block granularity needs in/out features divisible by 128"):
        QuantLinear.from_linear(make_linear(K=192, N=128), Fp8Dynamic("block"))
    with pytest.raises(ValueError, match="not divisible by the nvfp4 block size 16"):
        QuantLinear(40, 8, Fp4("nvfp4"))
    with pytest.raises(ValueError, match="act_order .* integer schemes only"):
        QuantLinear(256, 8, Fp8WeightOnly(), act_order=True)
    lin = make_linear()
    with torch.no_grad():
        lin.weight[3, 4] = float("inf")
    for scheme in (Fp8WeightOnly(), Fp4("mxfp4")):
        with pytest.raises(ValueError, match="NaN or inf"):
            QuantLinear.from_linear(lin, scheme)
    with pytest.raises(ValueError, match=r"qweight must be float8_e4m3fn or uint8 of shape \(128, 256\)"):
        q.set_float_quantized(q.codes().float(), q.scale)
    with pytest.raises(ValueError, match=r"scale must have shape \(128, 1\)"):
        QuantLinear.from_float_codes(q.codes(), q.scale[:64], Fp8Dynamic("row"))
    with pytest.raises(TypeError, match="from_float_codes takes an fp8/fp4 scheme"):
        QuantLinear.from_float_codes(q.codes(), q.scale, Int8WeightOnly())
    with pytest.raises(TypeError, match="use set_float_quantized"):
        q.set_quantized(torch.zeros(128, 256, dtype=torch.int8), q.scale, None)
    q4 = QuantLinear.from_linear(make_linear(), Fp4("nvfp4"))
    with pytest.raises(ValueError, match="global_scale must be given"):
        QuantLinear.from_float_codes(q4.qweight, q4.scale, Fp4("nvfp4"))
    with pytest.raises(TypeError, match=r"scale must be float8_e8m0fnu \(or its uint8 bits\)"):
        QuantLinear.from_float_codes(q4.qweight, q4.scale.float()[:, :8], Fp4("mxfp4"))


@pytest.mark.gpu
@requires_sm(8, 9)
@pytest.mark.parametrize("scheme", SCHEMES, ids=repr)
def test_cuda_matches_reference(scheme):
    q = QuantLinear.from_linear(make_linear(), scheme)
    x = torch.randn(16, 256, dtype=torch.bfloat16)
    qc = q.to("cuda")
    out = qc(x.cuda()).cpu()
    assert rel_err(out, expected(q, x)) < 2e-2
