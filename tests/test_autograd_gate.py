"""The C++ Autograd gate of the GEMM ops (csrc/autograd_gate.cpp): no Python on the no-grad path, the registered
formula (on the ``with_grad`` overload, qkernels/ops/autograd.py) when an input requires grad."""

import pytest
import torch

import qkernels
from qkernels.ops.autograd import GEMMS

from .conftest import needs_extension

pytestmark = needs_extension


@pytest.mark.parametrize("op", sorted(GEMMS))
def test_every_gemm_has_the_gate_and_the_overload(op):
    dump = torch._C._dispatch_dump(f"qkernels::{op}")
    autograd = [line for line in dump.splitlines() if line.startswith("Autograd")]
    assert len(autograd) == 1 and "autograd_gate.cpp" in autograd[0], dump
    overload = getattr(torch.ops.qkernels, op).with_grad
    assert str(overload._schema).split("(", 1)[1] == str(getattr(torch.ops.qkernels, op).default._schema).split("(", 1)[1]


def test_no_gemm_outside_the_list_has_the_gate():
    for name in torch._C._dispatch_get_all_op_names():
        if name.startswith("qkernels::") and name.split("::")[1] not in GEMMS:
            assert "autograd_gate.cpp" not in torch._C._dispatch_dump(name), name


def _int4_args(requires_grad: bool):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 64, generator=g)
    q, s, zp = qkernels.quantize_affine(w, 4, 32, False)
    x = torch.randn(3, 64, generator=g, requires_grad=requires_grad)
    return (x, qkernels.pack_int4(q), s, zp, 32, True)


def test_gate_routes_by_grad_need(monkeypatch):
    op = torch.ops.qkernels.int4_weight_only_mm.default
    calls = []
    import qkernels.ops.autograd as ag

    real = ag._grads
    monkeypatch.setattr(ag, "_grads", lambda *a: calls.append(1) or real(*a))
    args = _int4_args(True)
    with torch.no_grad():
        y0 = op(*args)
    assert y0.grad_fn is None and not y0.requires_grad
    y1 = op(*_int4_args(False))  # grad mode on, nothing requires grad
    assert y1.grad_fn is None
    y = op(*args)
    assert "with_grad" in type(y.grad_fn).__name__
    assert torch.equal(y.detach(), y0)
    y.sum().backward()
    assert calls == [1]
    w = qkernels.dequantize_affine(qkernels.unpack_int4(args[1], True), args[2], args[3], 32)
    torch.testing.assert_close(args[0].grad, torch.ones(3, 8) @ w.float(), rtol=1e-5, atol=1e-5)


def test_with_grad_overload_opcheck():
    torch.library.opcheck(torch.ops.qkernels.int4_weight_only_mm.with_grad, _int4_args(True))
