"""int4_weight_only_mm with an x shorter than the weight: a ragged last group (K = 576 with group 128 is stored as
Kp = 640 columns) takes x unpadded, its missing columns counting as zeros. The CPU kernel skips the padding columns'
k steps instead of padding x (csrc/cpu/int_gemm.cpp); what must hold: the same bits as the call on x zero-padded
to Kp on every CPU path, the reference's semantics, clear errors for an x that does not fit, opcheck (fake kernel),
gradients of x's shape, and QuantLinear layers with a ragged group taking the direct path with unchanged outputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qkernels
from qkernels.nn import Int4WeightOnly, QuantLinear
from qkernels.reference import int_gemm as ref

from .conftest import GEMM_RTOL, needs_extension, rel_err

pytestmark = needs_extension


def i4(*args):
    return torch.ops.qkernels.int4_weight_only_mm.default(*args)


def _weight(N, Kp, g, zero_points, gen):
    # random codes in the padding columns too: with x's missing columns zero they must not matter
    q = torch.randint(0, 256, (N, Kp // 2), dtype=torch.uint8, generator=gen)
    s = torch.rand(N, Kp // g, generator=gen) + 0.01
    z = torch.randint(-8, 17, (N, Kp // g), dtype=torch.int32, generator=gen) if zero_points else None
    return q, s, z


def _x(M, K, dtype, gen, special):
    x = torch.randn(M, K, generator=gen)
    if special:  # magnitudes over 6 decades (the int16 blocks' rounding), and the row guard's cases: NaN, inf, huge
        x *= torch.logspace(-3, 3, K)[torch.randperm(K, generator=gen)]  # (rescaled) and tiny rows
    if special and M >= 4:
        x[0, 3] = float("nan")
        x[1, 5] = float("inf")
        x[2] *= 2.0 ** 100
        x[3] *= 2.0 ** -100
    return x.to(dtype)


# Every CPU path: int16 activations (bf16/fp16 at M <= 24), the fp32 64-k and 32-k register kernels, the
# dequantize + sgemm path (M = 30), the portable loops; Kx multiples of 64 (steps skipped), of 8 but not 64
# (the int16 scratch pads), odd (x padded in C++), a group of 32 (32-k kernel only).
PATHS = {
    "default": {},
    "fp32_kernels": {"QKERNELS_CPU_I16": "0"},
    "k32": {"QKERNELS_CPU_W4_K64": "0"},
    "scalar": {"QKERNELS_CPU_ISA": "scalar"},
}
SHAPES = [(576, 640, 128), (600, 640, 128), (575, 640, 128), (320, 384, 128), (80, 96, 32), (200, 256, 64)]


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("Kx,Kp,g", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 2, 5, 30])
def test_ragged_x_gives_the_bits_of_padded_x(path, Kx, Kp, g, dtype, M, monkeypatch):
    for k, v in PATHS[path].items():
        monkeypatch.setenv(k, v)
    gen = torch.Generator().manual_seed(Kx * 31 + M)
    N = 37  # a tail of row blocks that are not whole tiles
    for signed, zero_points in [(True, False), (False, True)]:
        q, s, z = _weight(N, Kp, g, zero_points, gen)
        x = _x(M, Kx, dtype, gen, special=True)
        out = i4(x, q, s, z, g, signed)
        padded = i4(F.pad(x, (0, Kp - Kx)), q, s, z, g, signed)
        assert out.dtype == dtype and out.shape == (M, N)
        assert torch.equal(out.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32),
                           padded.view(-1).view(torch.int16 if dtype != torch.float32 else torch.int32)), (signed,)


@pytest.mark.parametrize("Kx,Kp,g", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("M", [1, 7, 30])
def test_ragged_x_against_the_reference(Kx, Kp, g, dtype, M):
    gen = torch.Generator().manual_seed(Kx + M)
    q, s, z = _weight(48, Kp, g, True, gen)
    x = _x(M, Kx, dtype, gen, special=False)
    want = ref.int4_weight_only_mm(x, q, s, z, g, False)
    # the reference itself: the padding columns dropped == x padded with zeros
    assert torch.equal(want, ref.int4_weight_only_mm(F.pad(x, (0, Kp - Kx)), q, s, z, g, False))
    out = qkernels.int4_weight_only_mm(x, q, s, z, g, signed=False)
    assert rel_err(out, want) < GEMM_RTOL[dtype]
    # leading dims and the forced reference backend take the ragged x as well
    out3 = qkernels.int4_weight_only_mm(x.reshape(1, M, Kx), q, s, z, g, signed=False, backend="reference")
    assert torch.equal(out3.reshape(M, -1), want)


def test_ragged_x_skips_nothing_it_needs():
    # only the padding columns' codes change: the output must not (they meet zeros); a real column's code changes it
    gen = torch.Generator().manual_seed(5)
    q, s, z = _weight(8, 640, 128, True, gen)
    x = torch.randn(1, 576, generator=gen, dtype=torch.float32).bfloat16()
    base = i4(x, q, s, z, 128, False)
    q2 = q.clone()
    q2[:, 288:] ^= 0x5A
    assert torch.equal(i4(x, q2, s, z, 128, False), base)
    q3 = q.clone()
    q3[:, 287] ^= 0x50  # element 575's nibble, the last one x holds
    assert not torch.equal(i4(x, q3, s, z, 128, False), base)


@pytest.mark.parametrize("Kx", [512, 511, 641, 300])
def test_x_that_does_not_fit_the_weight_is_refused(Kx):
    q, s, z = _weight(4, 640, 128, True, torch.Generator().manual_seed(0))
    x = torch.randn(2, Kx)
    with pytest.raises(ValueError, match=r"packed_w must have shape \[N, K/2\] with K="):
        qkernels.int4_weight_only_mm(x, q, s, z, 128)
    with pytest.raises(RuntimeError, match=r"x may be shorter than the weight only within its last group|"
                                           r"packed_w must have shape"):
        i4(x, q, s, z, 128, True)


def test_group_size_must_divide_the_weights_k():
    q, s, _ = _weight(4, 640, 128, False, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"group_size must be a positive divisor of K=640, got 300"):
        qkernels.int4_weight_only_mm(torch.randn(1, 576), q, s[:, :2], None, 300)
    with pytest.raises(RuntimeError, match=r"group_size 300 must be positive and divide K=640"):
        i4(torch.randn(1, 576), q, s[:, :2], None, 300, True)


def test_opcheck_ragged_x():
    gen = torch.Generator().manual_seed(1)
    q, s, z = _weight(12, 640, 128, True, gen)
    for dtype in (torch.float32, torch.bfloat16):
        torch.library.opcheck(torch.ops.qkernels.int4_weight_only_mm.default,
                              (torch.randn(3, 576, generator=gen).to(dtype), q, s, z, 128, True))


def test_ragged_x_gradient_has_x_shape():
    gen = torch.Generator().manual_seed(2)
    q, s, z = _weight(16, 640, 128, True, gen)
    x = torch.randn(3, 576, generator=gen, requires_grad=True)
    xp = F.pad(x.detach(), (0, 64)).requires_grad_()
    go = torch.randn(3, 16, generator=gen)
    qkernels.int4_weight_only_mm(x, q, s, z, 128).backward(go)
    qkernels.int4_weight_only_mm(xp, q, s, z, 128).backward(go)
    assert x.grad.shape == x.shape
    assert torch.equal(x.grad, xp.grad[:, :576])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [False, True])
def test_quantlinear_ragged_group_runs_direct_with_unchanged_output(dtype, symmetric):
    # SmolLM2's K = 576 with group 128: stored as 640 columns; the layer now hands x to the kernel unpadded
    lin = torch.nn.Linear(576, 96, bias=True)
    layer = QuantLinear.from_linear(lin, Int4WeightOnly(group_size=128, symmetric=symmetric))
    assert layer.padded_in_features == 640 and layer._direct
    layer = layer.to(dtype) if dtype != torch.float32 else layer
    for shape in [(1, 576), (2, 3, 576), (30, 576)]:
        x = torch.randn(*shape).to(dtype)
        with torch.no_grad():
            y = layer(x)
            # what the layer computed before: x padded, then the op, then the bias
            x2 = F.pad(x.reshape(-1, 576), (0, 64))
            want = i4(x2, layer.qweight, layer.scale, layer.zero_point, 128, True).reshape(*shape[:-1], 96)
            want = want + layer.bias.to(dtype)
        assert torch.equal(y, want)
        w = layer.dequantize(torch.float64)
        assert rel_err(y, F.linear(x.double(), w, layer.bias.double())) < 1e-2


def test_compiled_ragged_layer_traces_fullgraph_and_matches():
    # what CompiledDecoder traces: the layer's checked path hands the unpadded x to the op under torch.compile
    torch._dynamo.reset()
    layer = QuantLinear.from_linear(torch.nn.Linear(576, 32, bias=False), Int4WeightOnly(group_size=128))
    x = torch.randn(1, 576).bfloat16()
    with torch.no_grad():
        out = torch.compile(layer, fullgraph=True)(x)
        want = i4(F.pad(x, (0, 64)), layer.qweight, layer.scale, layer.zero_point, 128, True)
    assert torch.equal(out, want)
