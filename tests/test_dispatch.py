"""The dispatch table's decisions per (op, device), with mocked device capabilities."""

from __future__ import annotations

import pytest
import torch

import qkernels
from qkernels import dispatch

INT_OPS = ["choose_qparams_affine", "quantize_affine", "dequantize_affine", "pack_int4", "unpack_int4",
           "int4_weight_only_mm", "int8_weight_only_mm", "quantize_per_token_int8", "int8_dynamic_mm",
           "int8_dynamic_int4_mm"]


@pytest.mark.parametrize("op", INT_OPS)
def test_cpu_picks_cpp_kernel(op):
    with dispatch.mock_device("cpu"):
        d = qkernels.explain(op)
    assert d.backend == "cpu" and "C++" in d.reason


@pytest.mark.parametrize("device", ["sm80", "sm90", "sm100"])
@pytest.mark.parametrize("op", ["int4_weight_only_mm", "int8_weight_only_mm"])
def test_gemm_on_ampere_and_newer_uses_cuda_kernel_when_compiled(device, op):
    with dispatch.mock_device(device):
        assert qkernels.explain(op, assume_compiled=True).backend == "cuda"


def test_gemm_below_sm80_falls_back():
    with dispatch.mock_device("sm75"):
        d = qkernels.explain("int4_weight_only_mm", assume_compiled=True)
    assert d.backend in ("triton", "reference")
    assert any(b == "cuda" and "sm80" in why for b, why in d.rejected)


def test_rocm_never_uses_cuda_kernels():
    with dispatch.mock_device("gfx942"):
        d = qkernels.explain("int4_weight_only_mm", assume_compiled=True)
    assert d.backend != "cuda"
    assert str(d).startswith("int4_weight_only_mm on rocm gfx942")


def test_env_override_and_errors(monkeypatch):
    monkeypatch.setenv("QKERNELS_BACKEND", "reference")
    with dispatch.mock_device("cpu"):
        d = qkernels.explain("pack_int4")
    assert d.backend == "reference" and d.forced
    monkeypatch.setenv("QKERNELS_BACKEND", "cuda")
    with dispatch.mock_device("cpu"), pytest.raises(RuntimeError, match="backend 'cuda' was forced for pack_int4"):
        qkernels.explain("pack_int4")
    monkeypatch.setenv("QKERNELS_BACKEND", "gpu")
    with pytest.raises(ValueError, match="QKERNELS_BACKEND must be one of"):
        qkernels.explain("pack_int4")


def test_env_override_changes_what_runs(monkeypatch):
    q = torch.randint(-8, 8, (4, 8), dtype=torch.int8)
    monkeypatch.setenv("QKERNELS_BACKEND", "reference")
    calls = []
    orig = qkernels.reference.OPS["pack_int4"]
    monkeypatch.setitem(qkernels.reference.OPS, "pack_int4", lambda t: calls.append(1) or orig(t))
    qkernels.pack_int4(q)
    assert calls == [1]


CTXS = [{}, dict(dtype=torch.float32, M=1, K=4096, N=4096, group_size=128), dict(dtype=torch.bfloat16, M=64, K=96,
        N=8, group_size=32, format="nvfp4", element="e1m2", a_blocks=(1, 128), b_blocks=(128, 128))]


@pytest.mark.parametrize("op", sorted(dispatch.TABLE))
def test_cpu_fast_path_agrees_with_choose(op, monkeypatch):
    """ops/_call.py skips choose() for CPU tensors where dispatch.cpu_fast_path says the answer is always the C++
    kernel; that must be what choose() itself picks, for any context, with or without triton installed. Without
    the compiled extension no op may take the fast path."""
    if not qkernels.HAS_EXTENSION:
        assert not dispatch.cpu_fast_path(op), op
    elif dispatch.cpu_fast_path(op):
        for ctx in CTXS:
            assert dispatch.choose(op, torch.device("cpu"), **dict(ctx)).backend == "cpu", (op, ctx)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert dispatch.choose(op, torch.device("cpu"), **dict(CTXS[1])).backend == "cpu"
    else:
        assert op.startswith("gguf_"), f"{op}: expected the CPU fast path for every op with a plain C++ CPU rule"


def test_cpu_fast_path_still_honours_overrides(monkeypatch):
    """The fast path must not bypass QKERNELS_BACKEND, backend= or mock_device: in each of those cases choose() runs
    (and decides); only a plain CPU call skips it."""
    q = torch.randint(-8, 8, (4, 8), dtype=torch.int8)
    chosen = []
    orig_choose = dispatch.choose
    monkeypatch.setattr(dispatch, "choose", lambda *a, **k: chosen.append(a[0]) or orig_choose(*a, **k))
    want = qkernels.reference.OPS["pack_int4"](q)
    assert torch.equal(qkernels.pack_int4(q), want) and chosen == []  # plain CPU call: fast path
    assert torch.equal(qkernels.pack_int4(q, backend="cpu"), want) and chosen == ["pack_int4"]
    with dispatch.mock_device("cpu"):
        qkernels.pack_int4(q)
    assert chosen == ["pack_int4"] * 2
    monkeypatch.setenv("QKERNELS_BACKEND", "reference")
    calls = []
    orig = qkernels.reference.OPS["pack_int4"]
    monkeypatch.setitem(qkernels.reference.OPS, "pack_int4", lambda t: calls.append(1) or orig(t))
    qkernels.pack_int4(q)
    assert chosen == ["pack_int4"] * 3 and calls == [1]


def test_unknown_op_and_device():
    with pytest.raises(ValueError, match="op must be one of"):
        qkernels.explain("int3_mm")
    with pytest.raises(ValueError, match="device must be"):
        dispatch.parse_device("tpu")


def test_triton_on_cpu_only_when_forced(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with dispatch.mock_device("cpu"):
        assert qkernels.explain("int4_weight_only_mm").backend == "cpu"


@pytest.mark.parametrize("device", ["sm90", "gfx942"])
def test_w4a8_on_gpus_is_the_triton_composite(device):
    """int8_dynamic_int4_mm has no CUDA kernel: never the cuda backend, even with a compiled extension assumed."""
    with dispatch.mock_device(device):
        d = qkernels.explain("int8_dynamic_int4_mm", assume_compiled=True)
    assert d.backend in ("triton", "reference") and all(b != "cuda" for b, _ in d.rejected)
