"""benchmarks/bench_cpu_gemm's torchao rows: they compute the same product as the other rows, count the bytes torchao
keeps, and a missing torchao (or a config without a CPU format) becomes a 'missing' row with the reason instead of an
error or a silently absent row. Tiny shapes, timing stubbed: this checks the harness, not the speed."""

import sys

import pytest
import torch
import torch.nn.functional as F

from benchmarks import bench_cpu_gemm as bench

from .conftest import rel_err

ROWS = {"torchao Int8WeightOnlyConfig (bf16 x)", "torchao Int8WeightOnlyConfig g128 (bf16 x)",
        "torchao IntxWeightOnlyConfig int4 g128 (bf16 x)", "torchao Int4WeightOnlyConfig g128 (bf16 x)"}
N, K = 48, 256


def _w():
    torch.manual_seed(0)
    return torch.randn(N, K) * 0.02


def test_torchao_rows_compute_the_product():
    pytest.importorskip("torchao.quantization")
    w = _w()
    methods, missing = bench.torchao_methods(w, compiled=True)
    compiled = {n for n in methods if "torch.compile" in n}
    assert compiled == {n.replace("(bf16 x)", "(bf16 x, torch.compile)") for n in bench._TORCHAO_COMPILED}
    assert set(methods) - compiled | set(missing) == ROWS and not set(methods) & set(missing)
    # the weight-only configs with a CPU path in torchao >= 0.14 must run, not be reported missing
    assert {"torchao Int8WeightOnlyConfig (bf16 x)", "torchao IntxWeightOnlyConfig int4 g128 (bf16 x)"} <= set(methods)
    for why in missing.values():
        assert why.startswith("torchao ") and "Config" in why
    x = torch.randn(3, K)
    want = F.linear(x, w)
    for name, (make, run, nbytes) in methods.items():
        W = make()
        assert W[0] is not make()[0]  # every call gives its own copy for the rotation
        out = run(x, x.bfloat16(), W).float()
        err = rel_err(out, want)
        assert err < (0.02 if "Int8" in name else 0.15), (name, err)
        if name in compiled:  # the compiled graph computes what the eager module does
            eager = methods[name.replace(", torch.compile", "")][1](x, x.bfloat16(), W).float()
            assert rel_err(out, eager) < 1e-2, name
        # codes + scales (+ zero points) as torchao stores them: int8 codes, also for IntxWeightOnlyConfig's int4
        # (kept unpacked, one byte per weight), and at most 8 bytes of scale and zero point per row or group
        groups = 1 if name == "torchao Int8WeightOnlyConfig (bf16 x)" else K // 128
        assert N * K < nbytes <= N * K + N * groups * 8, (name, nbytes)


def _stub_timing(monkeypatch):
    monkeypatch.setattr(bench, "memcpy_bandwidth", lambda device: 1.0)
    monkeypatch.setattr(bench, "time_cpu_interleaved", lambda fns: {n: (fn(0), 1e-3)[1] for n, fn in fns.items()})


def test_missing_torchao_gives_missing_rows(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    methods, missing = bench.torchao_methods(_w())
    assert methods == {} and set(missing) == ROWS
    assert all("torchao not importable" in why for why in missing.values())
    _stub_timing(monkeypatch)
    rows = bench.main(["--shapes", f"{N}x{K}", "--ms", "1,2", "--methods", "torchao"])
    got = {(r["M"], r["method"]): r for r in rows}
    assert set(got) == {(m, n) for m in (1, 2) for n in ROWS | {"fp32 F.linear"}}
    for n in ROWS:
        assert got[(1, n)]["time_us"] == "missing" and "torchao not importable" in got[(1, n)]["note"]
    assert "missing" in capsys.readouterr().out


def test_main_times_the_torchao_rows(monkeypatch):
    pytest.importorskip("torchao.quantization")
    _stub_timing(monkeypatch)
    rows = bench.main(["--shapes", f"{N}x{K}", "--ms", "1", "--methods", "Int8WeightOnly", "--no-torchao-compile"])
    by_name = {r["method"]: r for r in rows}
    assert set(by_name) == {"fp32 F.linear", "torchao Int8WeightOnlyConfig (bf16 x)",
                            "torchao Int8WeightOnlyConfig g128 (bf16 x)"}
    assert by_name["torchao Int8WeightOnlyConfig (bf16 x)"]["time_us"] == "1000"
